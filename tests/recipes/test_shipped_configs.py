"""Every recipe YAML under configs/ loads into the config dataclass its family's recipe declares (no unknown keys, valid values)."""
from pathlib import Path

import pytest
import yaml

from polymodal.config import load_config
from polymodal.models.registry import get_recipe, resolve

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_config_loads(path):
    recipe = yaml.safe_load(path.read_text())["recipe"]
    config = load_config(resolve(get_recipe(recipe)[1].config), path)
    assert config.recipe == recipe
