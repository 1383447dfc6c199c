"""Per-rank data: disjoint shares that cover the data once per epoch, one global position that
resumes every rank (at the same or another world size), WebDataset shards across ranks and
DataLoader workers, and frozen-feature caches read back by rank."""
from __future__ import annotations

import io
import tarfile

import pytest
import torch
from PIL import Image

from polymodal.data.formats.webdataset import WebDatasetReader
from polymodal.distributed.features import cache_features, read_cached_features
from polymodal.distributed.sharding import batch_weight, shard_stream, split_rows
from polymodal.errors import ConfigError, UsageError
from polymodal.sequence import IGNORE_INDEX, Document, pack_documents
from polymodal.train.data import IndexedBatches, ShuffledBatches

ITEMS, BATCH = 30, 6


def _ranks(world: int, state: dict | None = None) -> list[ShuffledBatches]:
    streams = [shard_stream(ShuffledBatches(ITEMS, BATCH, list, seed=3), rank, world) for rank in range(world)]
    for stream in streams:
        if state is not None:
            stream.load_state_dict(state)
    return streams


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_read_disjoint_shares_that_cover_each_epoch_once(world):
    streams = _ranks(world)
    reference = ShuffledBatches(ITEMS, BATCH, list, seed=3)
    seen = []
    for _ in range(reference.batches_per_epoch()):
        shares = [next(s) for s in streams]
        assert sorted(i for share in shares for i in share) == sorted(next(reference))  # the global batch
        assert len({i for share in shares for i in share}) == sum(len(share) for share in shares)  # disjoint
        seen += [i for share in shares for i in share]
    assert sorted(seen) == list(range(ITEMS))  # once per epoch
    assert len({tuple(sorted(s.state_dict().items())) for s in streams}) == 1  # one global position


def test_each_rank_resumes_exactly_and_another_world_size_continues_the_same_global_batches():
    streams = _ranks(2)
    for _ in range(7):  # into the second epoch
        for s in streams:
            next(s)
    state = streams[0].state_dict()
    after = [[next(s) for _ in range(3)] for s in streams]
    assert [[next(s) for _ in range(3)] for s in _ranks(2, state)] == after
    merged = [sorted(a + b) for a, b in zip(*after)]
    four = [[next(s) for _ in range(3)] for s in _ranks(4, state)]
    assert [sorted(i for rank in four for i in rank[k]) for k in range(3)] == merged


def test_indexed_batches_split_rows_evenly():
    def batch(i: int) -> dict:
        return {"pixel_values": torch.arange(8).float() + 10 * i, "ids": torch.arange(16).view(8, 2), "name": "x"}

    shares = [next(shard_stream(IndexedBatches(batch, start=2), rank, 4)) for rank in range(4)]
    assert torch.equal(torch.cat([s["pixel_values"] for s in shares]), batch(2)["pixel_values"])
    assert shares[1]["ids"].tolist() == [[4, 5], [6, 7]] and shares[3]["name"] == "x"
    with pytest.raises(ConfigError, match="8 rows does not split over 3 processes"):
        next(shard_stream(IndexedBatches(batch), 0, 3))


def test_packed_batches_split_by_rows_and_weigh_their_targets():
    docs = [Document.from_tokens(list(range(1, n + 1))) for n in (5, 7, 3, 6)]
    packed = pack_documents(docs, max_tokens=8)
    rows = packed.token_ids.shape[0]
    parts = [split_rows(packed, rank, 2) for rank in range(2)]
    assert sum(p.token_ids.shape[0] for p in parts) == rows
    assert sum(batch_weight(p) for p in parts) == batch_weight(packed) == int((packed.labels != IGNORE_INDEX).sum())
    assert sum(len(p.document_rows) for p in parts) == len(docs)


def test_unshardable_streams_and_tiny_batches_are_refused():
    with pytest.raises(UsageError, match="list cannot be sharded across 2 processes"):
        shard_stream([1, 2, 3], 0, 2)
    with pytest.raises(ConfigError, match="global batch holds 2 items, fewer than the 4 processes"):
        shard_stream(ShuffledBatches(10, 2, list), 0, 4)
    assert shard_stream([1], 0, 1) == [1]  # one process: nothing to split


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_shards(folder, shards: int, per_shard: int) -> list[str]:
    paths, image = [], _png()
    for s in range(shards):
        path = folder / f"shard-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for k in range(per_shard):
                for name, data in ((f"{s:02d}{k:02d}.png", image), (f"{s:02d}{k:02d}.txt", b"a red square")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def test_webdataset_shards_cover_the_data_once_across_ranks_and_workers(tmp_path):
    shards = _write_shards(tmp_path, shards=8, per_shard=3)
    keys = []
    for rank in range(2):
        reader = WebDatasetReader(shards, rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=2,
                                             collate_fn=lambda record: record.key)
        keys += list(loader)
    assert sorted(keys) == sorted(f"{s:02d}{k:02d}" for s in range(8) for k in range(3))


def test_cached_features_are_written_per_rank_and_read_back_by_rank(tmp_path):
    items = [(f"item{i}", torch.full((3,), float(i)), {"caption": f"c{i}"}) for i in range(10)]

    def encode(x: torch.Tensor) -> torch.Tensor:  # (B, 3) -> (B, 2)
        return torch.stack([x.sum(-1), -x[:, 0]], dim=-1)

    shards = [p for rank in range(2)
              for p in cache_features(encode, items, tmp_path, shard_size=2, batch_size=3, rank=rank, world=2)]
    assert len(shards) == 6  # 5 items per rank, 2 per shard
    read = {}
    for rank in range(3):
        for key, features, meta in read_cached_features(shards, rank, 3):
            assert key not in read
            read[key] = (features, meta)
    assert sorted(read) == sorted(key for key, _, _ in items)
    assert torch.equal(read["item7"][0], torch.tensor([21.0, -7.0])) and read["item7"][1] == {"caption": "c7"}
    with pytest.raises(UsageError, match="contains a dot"):
        cache_features(encode, [("a.b", torch.zeros(3), {})], tmp_path / "bad")
