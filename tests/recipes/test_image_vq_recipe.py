"""The `image_vq` recipe end to end: `polymodal train configs/image_vq/tiny.yaml` (falling loss,
the output layout, eval.json), `polymodal.load` of the final tokenizer and `polymodal eval`."""
from __future__ import annotations

import json

import numpy as np
import torch

from polymodal.api import load
from polymodal.cli import main
from polymodal.recipes.runner import run_recipe

TINY = "configs/image_vq/tiny.yaml"


def test_tiny_recipe_trains_saves_evaluates_and_loads(tmp_path):
    out = tmp_path / "run"
    result = run_recipe(TINY, [f"train.out_dir={out}", "usage_every=10"])
    losses = result.result.losses
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    for name in ("final/config.json", "final/model.safetensors", "metrics.jsonl", "loss.png", "recipe.yaml",
                 "reconstructions.png", "eval.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "eval.json").read_text())
    assert set(metrics) == {"psnr", "ssim", "codebook_usage", "codes_per_image"}
    assert metrics["psnr"] > 5 and 0 < metrics["codebook_usage"] <= 1 and metrics["codes_per_image"] == 16

    loaded = load(out / "final").model
    assert loaded.family == "image_vq" and loaded.config == result.model.config
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(loaded.encode(pixels), result.model.encode(pixels))

    report = tmp_path / "eval.json"
    assert main(["eval", str(out / "final"), "--split", "val", "--n", "8", "--json", str(report)]) == 0
    assert json.loads(report.read_text()) == metrics  # the recipe's evaluation is the family's
