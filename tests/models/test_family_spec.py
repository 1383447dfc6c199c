"""A family is one `register(Family(...))`: a throwaway family declared in this test alone is
trained by `polymodal train`, evaluated by `polymodal eval`, loaded by `polymodal.load`, refused by
tasks it did not declare, and round-trips through a checkpoint, without any other file knowing it."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import polymodal
from polymodal.checkpoint import load_checkpoint, save_checkpoint
from polymodal.cli import main
from polymodal.errors import UnsupportedTaskError
from polymodal.models.registry import Family, Recipe, get_recipe, register, require_task, unregister
from polymodal.recipes.runner import TrainingJob
from polymodal.train.data import IndexedBatches
from polymodal.train.loop import TrainConfig

NAME = "test_throwaway_regressor"


@dataclass
class RegressorConfig:
    """y = W x + b on `width` inputs."""

    width: int = 3


class Regressor(nn.Linear):
    """x (B, width) -> (B, 1)."""

    family = NAME

    def __init__(self, config: RegressorConfig) -> None:
        super().__init__(config.width, 1)
        self.config = config


@dataclass
class RegressorRecipeConfig:
    """The throwaway recipe: a model config, a target slope, training."""

    recipe: str = "test_throwaway_fit"
    model: RegressorConfig = field(default_factory=RegressorConfig)
    slope: float = 2.0
    train: TrainConfig = field(default_factory=TrainConfig)


def _points(width: int, slope: float, index: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, width, generator=torch.Generator().manual_seed(index))
    return x, slope * x.sum(1, keepdim=True)


def mse(model: Regressor, batch) -> torch.Tensor:
    """The family's objective: mean squared error of a batch (x, y)."""
    x, y = batch
    return F.mse_loss(model(x), y)


def setup(config: RegressorRecipeConfig) -> TrainingJob:
    """The recipe: fresh regressor, batches of random points on the target plane."""
    model = Regressor(config.model)
    return TrainingJob(model, IndexedBatches(lambda i: _points(config.model.width, config.slope, i)), mse)


def evaluate(model, tokenizer, data: str = "world", split: str = "test", n: int = 100, progress: bool = True):
    """The family's evaluation: the mean squared error on `n` held-out points of slope 2."""
    with torch.no_grad():
        return {"mse": float(mse(model, _points(model.config.width, 2.0, 10_000, n)))}


@pytest.fixture
def family():
    """Register the throwaway family for one test, and remove it after."""
    here = f"{__name__}"
    spec = register(Family(NAME, RegressorConfig, Regressor, RegressorConfig,
                           lambda model: _points(model.config.width, 2.0, 0), objective=mse, tasks=("embed",),
                           recipes=(Recipe("test_throwaway_fit", f"{here}:RegressorRecipeConfig", f"{here}:setup"),),
                           evaluate=f"{here}:evaluate"))
    yield spec
    unregister(NAME)


def test_a_family_declared_in_one_place_trains_evaluates_loads_and_round_trips(family, tmp_path, capsys):
    recipe = tmp_path / "fit.yaml"
    recipe.write_text("recipe: test_throwaway_fit\nmodel: {width: 4}\ntrain: {steps: 200, lr: 0.1, weight_decay: 0.0, schedule: constant, log_every: 1}\n")
    out = tmp_path / "run"
    assert main(["train", str(recipe), f"train.out_dir={out}"]) == 0
    assert get_recipe("test_throwaway_fit")[0] is family
    # The one output layout every recipe leaves.
    for name in ("final/config.json", "checkpoints/latest", "metrics.jsonl", "loss.png", "recipe.yaml"):
        assert (out / name).exists(), name
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.1 * losses[0]

    capsys.readouterr()
    assert main(["eval", str(out / "final"), "--n", "50", "--json", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["mse"] < 0.05
    assert "mse" in capsys.readouterr().out

    model, tokenizer = polymodal.load(out / "final")
    assert type(model) is Regressor and model.config == RegressorConfig(width=4) and tokenizer is None
    torch.testing.assert_close(model.weight, torch.full((1, 4), 2.0), atol=0.1, rtol=0)
    save_checkpoint(model, tmp_path / "again")
    again, _ = load_checkpoint(tmp_path / "again")
    assert torch.equal(again.weight, model.weight) and torch.equal(again.bias, model.bias)

    require_task(model, "embed")
    with pytest.raises(UnsupportedTaskError, match=f"'{NAME}' model .* cannot chat; it can: embed"):
        require_task(model, "chat")
    assert main(["complete", str(out / "final"), "hello"]) == 2
    assert "cannot complete" in capsys.readouterr().err


def test_a_second_registration_of_a_name_or_recipe_is_refused(family):
    with pytest.raises(ValueError, match="already registered"):
        register(family)
    twin = Family("test_throwaway_twin", RegressorConfig, Regressor, RegressorConfig, lambda m: None,
                  recipes=(Recipe("test_throwaway_fit", "x:y", "x:z"),))
    with pytest.raises(ValueError, match="recipe 'test_throwaway_fit' .* already registered by family"):
        register(twin)
    with pytest.raises(ValueError, match="unknown tasks"):
        Family("test_throwaway_bad", RegressorConfig, Regressor, RegressorConfig, lambda m: None, tasks=("fly",))
