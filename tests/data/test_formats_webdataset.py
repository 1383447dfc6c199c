"""WebDataset shard reader: decoding, rank/worker sharding, bad samples and corrupt shards."""

import io
import json
import tarfile

import numpy as np
import pytest
from torch.utils.data import DataLoader

from polymodal.data.formats import WebDatasetReader
from polymodal.data.loading import DataError


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_shard(path, members):
    """Write a tar with `members`: list of (name, bytes)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path, make_photo):
    """4 shards of 5 samples each; returns (pattern, {key: (pixels, text, meta)})."""
    expected = {}
    for s in range(4):
        members = []
        for i in range(5):
            key = f"{s:02d}{i:03d}"
            image = make_photo(12, 10, s * 10 + i)
            meta = {"index": s * 5 + i, "captions": [f"caption {key}", "other"]}
            members += [(f"{key}.png", _png_bytes(image)), (f"{key}.txt", f"caption {key}".encode())]
            members.append((f"{key}.json", json.dumps(meta).encode()))
            expected[key] = (np.asarray(image), f"caption {key}", meta)
        _write_shard(tmp_path / f"shard-{s:06d}.tar", members)
    return str(tmp_path / "shard-{000000..000003}.tar"), expected


def test_reads_every_sample_exactly(shards):
    pattern, expected = shards
    reader = WebDatasetReader(pattern)
    records = list(reader)
    assert [r.key for r in records] == sorted(expected)
    for record in records:
        pixels, text, meta = expected[record.key]
        assert np.array_equal(np.asarray(record.image), pixels)
        assert record.text == text and record.meta == meta
        assert record.shard.endswith(".tar")
    assert reader.skipped.count == 0


def _key(record):
    return record.key


@pytest.mark.parametrize("world_size", [1, 2])
def test_split_across_ranks_and_workers(shards, world_size):
    pattern, expected = shards
    per_rank = []
    for rank in range(world_size):
        loader = DataLoader(
            WebDatasetReader(pattern, rank=rank, world_size=world_size), batch_size=None, num_workers=2, collate_fn=_key
        )
        per_rank.append(list(loader))
    everything = [key for keys in per_rank for key in keys]
    assert sorted(everything) == sorted(expected)  # every sample once across the job
    assert all(len(keys) == len(expected) // world_size for keys in per_rank)


def test_rank_arguments_validated(shards):
    pattern, _ = shards
    with pytest.raises(ValueError, match="world_size=5 exceeds the 4 shard"):
        WebDatasetReader(pattern, rank=0, world_size=5)
    with pytest.raises(ValueError, match="rank=2"):
        WebDatasetReader(pattern, rank=2, world_size=2)


def test_bad_samples_skipped_and_strict_raises(tmp_path, make_photo, caplog):
    good = _png_bytes(make_photo(8, 8))
    path = tmp_path / "bad.tar"
    _write_shard(
        path,
        [
            ("a.png", good), ("a.txt", b"fine"),
            ("b.png", good[: len(good) // 2]), ("b.txt", b"truncated image"),
            ("c.png", good),
            ("d.txt", b"no image"),
            ("e.png", good), ("e.json", b"{not json"),
            ("f.png", good), ("f.txt", b"\xff\xfe bad utf8"),
            ("g.png", good), ("g.txt", b"also fine"),
        ],
    )  # fmt: skip
    reader = WebDatasetReader([str(path)])
    with caplog.at_level("WARNING", logger="polymodal.data"):
        assert [r.text for r in reader] == ["fine", "also fine"]
    assert reader.skipped.count == 5
    for key in "bcdef":
        assert f"bad.tar: key {key}" in caplog.text
    with pytest.raises(DataError, match=r"bad.tar: key b: .*bad.tar:b.png: cannot decode"):
        list(WebDatasetReader([str(path)], strict=True))


def test_truncated_shard_keeps_earlier_samples(tmp_path, make_photo):
    members = [(f"{i:03d}.png", _png_bytes(make_photo(32, 32, i))) for i in range(6)]
    members = [m for i, m in enumerate(members) for m in (m, (f"{i:03d}.txt", b"t"))]
    path = tmp_path / "cut.tar"
    _write_shard(path, members)
    with tarfile.open(path) as tar:
        member = tar.getmember("003.png")
    # Cut inside a member's data: a cut at a member boundary (or inside a header) just looks like
    # the end of the archive to tarfile, and only shows as a sample missing its .txt.
    path.write_bytes(path.read_bytes()[: member.offset_data + member.size // 2])
    reader = WebDatasetReader([str(path)])
    records = list(reader)
    assert 1 <= len(records) < 6 and reader.skipped.count >= 1
    assert any("tar stream" in reason for reason in reader.skipped.reasons)
    assert all("cut.tar" in reason for reason in reader.skipped.reasons)
    with pytest.raises(DataError, match="cut.tar"):
        list(WebDatasetReader([str(path)], strict=True))
