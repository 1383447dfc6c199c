"""Real data in every recipe: the world exported as LLaVA JSON or WebDataset shards trains exactly as
the world source does; COCO, image folders, JSONL pairs and mixtures feed the recipes through the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from polymodal.cli import main
from polymodal.data.export import export_world
from polymodal.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SCENES = 12
# The world's chats as `world export` writes them (Scene.conversation's defaults), 32 px images.
CHATS = ["stage=instruct", "data.turns=3", "data.describe=0.5", f"data.num_scenes={SCENES}", "data.docs_per_batch=4",
         "train.steps=6", "train.log_every=1", "train.seed=0"]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train_mmllm(out: Path, *overrides: str) -> list[float]:
    assert main(["train", str(CONFIGS / "mmllm" / "tiny_align.yaml"), f"train.out_dir={out}", *CHATS, *overrides]) == 0
    return _losses(out)


@pytest.fixture(scope="module")
def world_losses(tmp_path_factory):
    return _train_mmllm(tmp_path_factory.mktemp("world") / "run")


@pytest.mark.parametrize("fmt", ["llava", "webdataset"])
def test_the_exported_world_trains_exactly_as_the_world_source(fmt, world_losses, tmp_path):
    target = export_world(fmt, tmp_path / "data", SCENES, image_size=32, shard_size=5)
    losses = _train_mmllm(tmp_path / "run", f"data.source={fmt}", f"data.path={target}")
    assert losses == world_losses  # the same scenes, images, chats and order: the same loss curve


def test_coco_captions_and_a_weighted_mix_train_the_align_stage(tmp_path):
    coco = export_world("coco", tmp_path / "coco", 8, image_size=32)
    llava = export_world("llava", tmp_path / "llava", 8, image_size=32)
    base = ["data.docs_per_batch=4", "train.steps=3"]
    assert main(["train", str(CONFIGS / "mmllm" / "tiny_align.yaml"), f"train.out_dir={tmp_path / 'a'}",
                 "data.source=coco", f"data.path={coco}", f"data.image_root={tmp_path / 'coco' / 'images'}", *base]) == 0
    mix = f"data.mix=[{{source: llava, path: {llava}, weight: 2}}, {{source: world}}]"
    assert main(["train", str(CONFIGS / "mmllm" / "tiny_align.yaml"), f"train.out_dir={tmp_path / 'b'}", mix,
                 "data.num_scenes=8", *base]) == 0
    assert len(_losses(tmp_path / "b")) == 3


@pytest.mark.parametrize("fmt", ["coco", "webdataset", "folder", "pairs"])
def test_contrastive_recipe_reads_a_users_files(fmt, tmp_path):
    if fmt == "pairs":
        images = Path(export_world("folder", tmp_path / "images", 8, image_size=32))
        rows = [{"image": str(p.relative_to(tmp_path)), "text": f"a {p.parent.name}"} for p in images.rglob("*.png")]
        target = tmp_path / "pairs.jsonl"
        target.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        target = export_world(fmt, tmp_path / "data", 8, image_size=32, shard_size=4)
    root = [f"data.image_root={tmp_path / 'data' / 'images'}"] if fmt == "coco" else []  # COCO keeps images apart
    out = tmp_path / "run"
    assert main(["train", str(CONFIGS / "clip" / "tiny.yaml"), f"train.out_dir={out}", f"data.source={fmt}",
                 f"data.path={target}", *root, "data.batch_size=4", "train.steps=3", "train.log_every=1"]) == 0
    assert len(_losses(out)) == 3 and (out / "final" / "config.json").exists()


def test_sources_are_validated_by_name(tmp_path, capsys):
    from polymodal.data.sources import SourceConfig
    from polymodal.recipes.clip import ClipDataConfig
    from polymodal.recipes.mmllm import MMLLMDataConfig

    with pytest.raises(ConfigError, match=r"data.source must be one of \['world', 'llava'"):
        MMLLMDataConfig(source="parquet")
    with pytest.raises(ConfigError, match="data.path is required for source 'llava'"):
        MMLLMDataConfig(source="llava")
    with pytest.raises(ConfigError, match="cannot be mixed"):
        ClipDataConfig(mix=[SourceConfig(source="world")])
    assert main(["train", str(CONFIGS / "mmllm" / "tiny_align.yaml"), f"train.out_dir={tmp_path / 'x'}",
                 "data.source=llava", f"data.path={tmp_path / 'missing.json'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.json" in err
