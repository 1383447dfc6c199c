"""World export round trips: each reader reads back exactly the captions, messages and pixels."""

import argparse

import numpy as np
import pytest

from polymodal.data.export import FORMATS, add_cli, export_world, run_export, scene_id
from polymodal.data.formats import (
    CocoCaptionsReader,
    ImageFolderReader,
    LlavaReader,
    WebDatasetReader,
)
from polymodal.data.image import load_image
from polymodal.data.world import SHAPES, World

N = 12


def _scenes(**kwargs):
    return list(World("train", image_size=32, seed=3, **kwargs).scenes(N))


def test_llava_round_trip(tmp_path):
    path = export_world("llava", tmp_path, N, image_size=32, seed=3)
    reader = LlavaReader(path)
    records = list(reader)
    assert reader.skipped.count == 0 and len(records) == N
    for record, scene in zip(records, _scenes()):
        assert record.id == scene_id(scene)
        assert record.messages == scene.conversation()
        assert record.messages[0]["content"].startswith("<image>\n")
        assert np.array_equal(np.asarray(load_image(record.images[0])), scene.render())


def test_coco_round_trip(tmp_path):
    path = export_world("coco", tmp_path, N, image_size=32, seed=3)
    records = list(CocoCaptionsReader(path, image_root=tmp_path / "images"))
    scenes = _scenes()
    assert [r.image_id for r in records] == [s.index for s in scenes]
    for record, scene in zip(records, scenes):
        assert record.captions == scene.captions()
        assert np.array_equal(np.asarray(load_image(record.image)), scene.render())
    pairs = list(CocoCaptionsReader(path, image_root=tmp_path / "images", per_caption=True))
    assert [p.caption for p in pairs] == [c for s in scenes for c in s.captions()]


def test_webdataset_round_trip(tmp_path):
    pattern = export_world("webdataset", tmp_path, N, image_size=32, seed=3, shard_size=5)
    assert pattern.endswith("shard-{000000..000002}.tar")
    records = list(WebDatasetReader(pattern))
    scenes = _scenes()
    assert [r.key for r in records] == [scene_id(s) for s in scenes]
    for record, scene in zip(records, scenes):
        assert record.text == scene.caption("short")
        assert record.meta["captions"] == scene.captions()
        assert record.meta["conversation"] == scene.conversation()
        assert record.meta["scene"] == scene.to_dict()
        assert np.array_equal(np.asarray(record.image), scene.render())
    # Sharded over two ranks, the export is still read exactly once.
    keys = [r.key for rank in range(2) for r in WebDatasetReader(pattern, rank=rank, world_size=2)]
    assert sorted(keys) == sorted(scene_id(s) for s in scenes)


def test_folder_round_trip(tmp_path):
    root = export_world("folder", tmp_path, N, image_size=32, seed=3)
    reader = ImageFolderReader(root)
    assert reader.classes == sorted(SHAPES)
    scenes = {scene_id(s): s for s in _scenes(num_objects=(1, 1))}
    records = list(reader)
    assert len(records) == N and reader.skipped.count == 0
    for record in records:
        scene = scenes[record.image.stem]
        assert record.class_name == scene.objects[0].shape
        assert reader.classes[record.label] == record.class_name
        assert np.array_equal(np.asarray(load_image(record.image)), scene.render())


def test_cli_handler_and_registration(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="polymodal")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["world", "export", "--format", "coco", "--out", str(tmp_path), "--n", "3", "--image-size", "16"]
    )
    assert args.func is run_export
    args.func(args)
    assert "wrote 3 train scenes as coco" in capsys.readouterr().out
    assert len(list(CocoCaptionsReader(tmp_path / "captions.json", image_root=tmp_path / "images"))) == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["world", "export", "--format", "parquet", "--out", "x"])
    with pytest.raises(ValueError, match="format 'parquet' is not one of"):
        export_world("parquet", tmp_path, 1)
    assert set(FORMATS) == {"llava", "coco", "webdataset", "folder"}
