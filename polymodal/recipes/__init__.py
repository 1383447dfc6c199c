"""Training recipes: plain functions run by `polymodal train CONFIG.yaml [key=value ...]`.

A recipe YAML names its recipe in a top-level `recipe:` key; everything else is that recipe's
config dataclass. Recipes are scripts-as-functions (torchtune style), not trainer subclasses.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Sequence

import yaml


# recipe name -> "module:function(path, overrides)", imported lazily.
RECIPES: dict[str, str] = {
    "lm": "polymodal.recipes.lm:run_lm_recipe",
    "clip": "polymodal.recipes.clip:run_clip_recipe",
    "mmllm": "polymodal.recipes.mmllm:run_mmllm_recipe",
}


def run_recipe(config_path: str | Path, overrides: Sequence[str] = ()):
    """Run the recipe named in `config_path`'s `recipe:` key with the given overrides."""
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe config {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    name = data.get("recipe")
    if name not in RECIPES:
        raise ValueError(f"{path}: `recipe:` must be one of {sorted(RECIPES)}, got {name!r}")
    module, function = RECIPES[name].split(":")
    return getattr(importlib.import_module(module), function)(path, overrides)
