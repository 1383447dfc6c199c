"""Recipe `lm` through the CLI on its tiny config: loss falls, checkpoints load, resume continues."""
from pathlib import Path

import polymodal
from polymodal.cli import main
from polymodal.eval.lm import world_qa_accuracy

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "lm" / "tiny.yaml"


def _losses(out_dir: Path) -> list[float]:
    import json

    return [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_lm_recipe_trains_and_resumes(tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(CONFIG), f"train.out_dir={out}", "train.steps=20", "train.log_every=1"]) == 0
    losses = _losses(out)
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert (out / "loss.png").stat().st_size > 0 and (out / "recipe.yaml").exists()

    assert main(["train", str(CONFIG), f"train.out_dir={out}", "train.steps=25", "train.resume=true",
                 "train.log_every=1"]) == 0
    assert len(_losses(out)) == 25

    model, tokenizer = polymodal.load(out / "checkpoints" / "step-0000025")
    table = world_qa_accuracy(model, tokenizer, num_scenes=3, max_new_tokens=3)
    assert 0.0 <= table["all"] <= 1.0


def test_unknown_override_is_named(tmp_path, capsys):
    assert main(["train", str(CONFIG), "train.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err

