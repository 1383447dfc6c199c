"""Every recipe YAML under configs/ loads into its recipe's config dataclass (no unknown keys, valid values)."""
from pathlib import Path

import pytest
import yaml

from polymodal.config import load_config
from polymodal.recipes.clip import ClipRecipeConfig
from polymodal.recipes.lm import LMRecipeConfig
from polymodal.recipes.mmllm import MMLLMRecipeConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CONFIG_CLASSES = {"lm": LMRecipeConfig, "clip": ClipRecipeConfig, "mmllm": MMLLMRecipeConfig}


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_config_loads(path):
    recipe = yaml.safe_load(path.read_text())["recipe"]
    config = load_config(CONFIG_CLASSES[recipe], path)
    assert config.recipe == recipe
