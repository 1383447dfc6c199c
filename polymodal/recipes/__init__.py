"""Training recipes: plain functions run by `polymodal train CONFIG.yaml [key=value ...]`.

A recipe YAML names its recipe in a top-level `recipe:` key; everything else is that recipe's
config dataclass. Recipes are scripts-as-functions (torchtune style), not trainer subclasses.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import yaml


def _lm(path, overrides):
    from polymodal.recipes.lm import run_lm_recipe

    return run_lm_recipe(path, overrides)


RECIPES: dict[str, Callable] = {"lm": _lm}


def run_recipe(config_path: str | Path, overrides: Sequence[str] = ()):
    """Run the recipe named in `config_path`'s `recipe:` key with the given overrides."""
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe config {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    name = data.get("recipe")
    if name not in RECIPES:
        raise ValueError(f"{path}: `recipe:` must be one of {sorted(RECIPES)}, got {name!r}")
    return RECIPES[name](path, overrides)
