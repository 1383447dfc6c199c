"""Recipe `clip` through the CLI on its tiny config: loss falls, the checkpoint loads and evaluates."""
import json
from pathlib import Path

import polymodal.models.contrastive  # noqa: F401  (registers the family for checkpoint loading)
from polymodal.checkpoint import load_checkpoint
from polymodal.cli import main
from polymodal.eval.contrastive import world_retrieval, world_zero_shot

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "clip" / "tiny.yaml"


def test_tiny_clip_recipe_trains_and_evaluates(tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(CONFIG), f"train.out_dir={out}", "train.steps=24", "train.log_every=1"]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 24 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.2
    model, tokenizer = load_checkpoint(out / "checkpoints" / "step-0000024")
    assert model.family == "clip" and model.config.text.eos_token_id == tokenizer.eos_token_id
    zero_shot = world_zero_shot(model, tokenizer, "val", n=8)
    assert set(zero_shot) == {"zero_shot_color", "zero_shot_shape", "zero_shot_position"}
    retrieval = world_retrieval(model, tokenizer, "val", n=8)
    assert 0.0 <= retrieval["t2i_R@1"] <= retrieval["t2i_R@5"] <= 1.0
