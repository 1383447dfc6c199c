"""polymodal.data.sources: random access to WebDataset shards (cut ones included), caption and
conversation items of a user's files, and weighted mixtures."""
from __future__ import annotations

from pathlib import Path

import pytest

from polymodal.data.export import export_world
from polymodal.data.formats import WebDatasetReader
from polymodal.data.sources import Mixture, SourceConfig, WebDatasetIndex, conversation_items, image_text_items
from polymodal.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return export_world("webdataset", tmp_path_factory.mktemp("wds") / "out", 10, image_size=32, shard_size=5)


def test_index_serves_the_samples_the_stream_reads(shards):
    index = WebDatasetIndex(shards)
    streamed = list(WebDatasetReader(shards))
    assert len(index) == len(streamed) == 10
    for i, record in enumerate(streamed):
        assert index.samples[i].key == record.key and index[i]["txt"].decode() == record.text


def test_a_cut_shard_keeps_the_samples_before_the_cut_and_names_the_offset(shards, tmp_path):
    first = sorted(Path(shards.split("{")[0]).parent.glob("*.tar"))[0]
    cut = tmp_path / "cut.tar"
    data = first.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    index = WebDatasetIndex(str(cut))
    assert 0 < len(index) < 5 and index.skipped.count == 1
    assert "cut.tar: tar stream at byte" in index.skipped.reasons[0]
    with pytest.raises(DataError, match=r"cut.tar: tar stream at byte \d+"):
        WebDatasetIndex(str(cut), strict=True)


def test_items_of_exported_files(tmp_path):
    coco = export_world("coco", tmp_path / "coco", 4, image_size=32)
    items = image_text_items(SourceConfig("coco", coco, str(tmp_path / "coco" / "images")))
    assert len(items) == 4 and items[0].image().size == (32, 32) and len(items[0].captions) > 1
    chats = conversation_items(SourceConfig("coco", coco, str(tmp_path / "coco" / "images")), ["Describe it."])
    assert chats[1].messages[0]["content"] == "<image>\nDescribe it."
    assert chats[1].messages[1]["content"] == items[1].captions[1]  # caption i % len of item i
    folder = export_world("folder", tmp_path / "folder", 6, image_size=32)
    named = image_text_items(SourceConfig("folder", folder))
    assert all(any(c.startswith("a photo of a") for c in item.captions) for item in named)
    with pytest.raises(DataError, match="holds no usable records"):
        image_text_items(SourceConfig("coco", coco))  # images looked up beside the JSON: none found


def test_mixture_spreads_each_source_by_its_weight():
    mixture = Mixture([4, 6], [2.0, 0.5])
    assert len(mixture) == 8 + 3
    located = [mixture.locate(i) for i in range(len(mixture))]
    assert [j for k, j in located if k == 0] == [0, 0, 1, 1, 2, 2, 3, 3]  # every item twice
    assert [j for k, j in located if k == 1] == [0, 2, 4]  # every other item
    with pytest.raises(IndexError):
        mixture.locate(11)


def test_source_configs_are_checked():
    with pytest.raises(ConfigError, match=r"data.mix\[0\].weight must be a positive number"):
        SourceConfig("llava", "a.json", weight=0).check(("llava",), "data.mix[0]")
    with pytest.raises(ConfigError, match="built in; it takes no path"):
        SourceConfig("world", "a.json").check(("world",), "data")
