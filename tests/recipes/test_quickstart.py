"""The quickstart end to end on a few steps: both stages, the evaluation table, the PNGs, reproducibility."""
import json

import pytest

from polymodal.errors import DestinationExistsError
from polymodal.quickstart import quickstart, stage_config

FEW_STEPS = ["train.steps=4", "train.warmup_steps=1", "data.docs_per_batch=4"]


def test_quickstart_smoke_is_reproducible(tmp_path, capsys):
    table = quickstart(out=tmp_path / "qs", eval_scenes=1, overrides=FEW_STEPS)
    assert {"val/color", "val/shape", "val/all", "compositional/all", "val/cider", "color", "all"} <= set(table)
    assert all(0.0 <= v <= 1.0 for k, v in table.items() if not k.endswith("cider"))
    _check_table_against_the_questions_asked(table, eval_scenes=1)
    out = tmp_path / "qs"
    assert (out / "loss.png").stat().st_size > 0 and (out / "examples.png").stat().st_size > 0
    assert (out / "instruct" / "final" / "config.json").exists()
    printed = capsys.readouterr().out
    assert "polymodal chat" in printed and "compositional" in printed
    again = quickstart(out=tmp_path / "again", eval_scenes=1, overrides=FEW_STEPS)
    assert again == table  # fixed, seeded steps: the same figures every time

    def losses(root):
        return [json.loads(line)["loss"] for stage in ("align", "instruct")
                for line in (root / stage / "metrics.jsonl").read_text().splitlines()]

    assert losses(out) == losses(tmp_path / "again")


def _check_table_against_the_questions_asked(table, eval_scenes):
    """Oracle: the questions of the scenes each column asks (the world is deterministic). An exact
    match rate of a type with n questions is a whole number of hits over n; "<column>/all" is the
    question-weighted mean of the per-type rates; the unprefixed figures are the val column's."""
    from collections import Counter

    from polymodal.data.world import World
    from polymodal.quickstart import EVAL_COLUMNS

    size = stage_config("instruct").model.image_size
    for column, (split, objects) in EVAL_COLUMNS.items():
        scenes = World(split, image_size=size, num_objects=objects).scenes(eval_scenes)
        counts = Counter(qa.qtype for scene in scenes for qa in scene.questions())
        assert {k.split("/")[1] for k in table if k.startswith(f"{column}/")} == {*counts, "all", "bleu4", "cider"}
        hits = {q: table[f"{column}/{q}"] * n for q, n in counts.items()}
        assert all(h == pytest.approx(round(h)) for h in hits.values()), hits
        assert table[f"{column}/all"] == pytest.approx(sum(hits.values()) / sum(counts.values()))
    assert {k: v for k, v in table.items() if "/" not in k} == \
        {k.removeprefix("val/"): v for k, v in table.items() if k.startswith("val/")}


def test_an_earlier_run_is_refused_and_overwrite_keeps_what_polymodal_did_not_write(tmp_path):
    out = tmp_path / "qs"
    quickstart(out=out, eval_scenes=1, overrides=["train.steps=1", "data.docs_per_batch=2"])
    with pytest.raises(DestinationExistsError, match="earlier quickstart output.*--overwrite"):
        quickstart(out=out, eval_scenes=1, overrides=["train.steps=1"])
    (out / "notes.txt").write_text("mine")
    quickstart(out=out, eval_scenes=1, overwrite=True, overrides=["train.steps=1", "data.docs_per_batch=2"])
    assert (out / "notes.txt").read_text() == "mine" and (out / "instruct" / "final").is_dir()


def test_stage_configs_read_the_shipped_yaml():
    align, instruct = stage_config("align", "runs/x"), stage_config("instruct", "runs/x")
    assert align.train.out_dir == "runs/x/align" and instruct.init_from == "runs/x/align/final"
    assert (align.stage, instruct.stage) == ("align", "instruct")
    assert align.model == instruct.model and align.model.vision_tower == "gridpool"


def test_the_longer_world_recipe_is_the_quickstart_trained_longer():
    """configs/mmllm/world_*.yaml say they are the quickstart's model and data: keep them so."""
    from pathlib import Path

    from polymodal.config import load_config
    from polymodal.recipes.mmllm import MMLLMRecipeConfig

    configs = Path(__file__).resolve().parents[2] / "configs" / "mmllm"
    for stage in ("align", "instruct"):
        longer, quick = load_config(MMLLMRecipeConfig, configs / f"world_{stage}.yaml"), stage_config(stage)
        assert (longer.data, longer.trainable) == (quick.data, quick.trainable)
        assert longer.train.steps > quick.train.steps
        if stage == "align":  # the instruct stage continues from the align checkpoint (init_from)
            assert longer.model == quick.model
