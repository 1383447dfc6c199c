"""Skip counting, deterministic DataLoader workers, and bounded memory while streaming."""

import io
import json
import logging
import random
import tarfile
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from polymodal.data.formats import LlavaReader, WebDatasetReader
from polymodal.data.loading import (
    DataError,
    SkipCounter,
    make_generator,
    seed_worker,
    skip_bad,
)


def _parse(raw):
    if raw < 0:
        raise DataError(f"negative value {raw}")
    return raw * 10


def test_skip_bad_counts_logs_and_strict_raises(caplog):
    counter = SkipCounter("numbers.txt")
    items = [(f"record {i}", v) for i, v in enumerate([1, -2, 3, -4])]
    with caplog.at_level(logging.WARNING, logger="polymodal.data"):
        assert list(skip_bad(items, _parse, counter)) == [10, 30]
    assert counter.count == 2
    assert counter.reasons == ["numbers.txt: record 1: negative value -2", "numbers.txt: record 3: negative value -4"]
    assert "2 skipped so far" in caplog.text
    with pytest.raises(DataError, match="numbers.txt: record 1: negative value -2"):
        list(skip_bad(items, _parse, SkipCounter("numbers.txt", strict=True)))
    # Anything that is not a DataError is a bug, never skipped.
    with pytest.raises(TypeError):
        list(skip_bad([("record 0", "x")], lambda raw: raw + 1, SkipCounter("s")))


class _RandomAugment(Dataset):
    """Each item draws from Python's random, numpy and torch, like a random augmentation."""

    def __len__(self):
        return 16

    def __getitem__(self, index):
        return torch.tensor(
            [index, random.random(), float(np.random.rand()), float(torch.rand(()))], dtype=torch.float64
        )


def _epoch(seed):
    loader = DataLoader(
        _RandomAugment(),
        batch_size=4,
        shuffle=True,
        num_workers=2,
        worker_init_fn=seed_worker,
        generator=make_generator(seed),
    )
    return torch.cat(list(loader))


def test_two_workers_give_the_same_data_twice():
    first, second = _epoch(0), _epoch(0)
    assert torch.equal(first, second)
    assert sorted(first[:, 0].tolist()) == list(range(16))
    # The workers' numpy streams differ (forked workers would otherwise repeat each other's draws).
    assert len(set(first[:, 2].tolist())) == 16
    assert not torch.equal(first, _epoch(1))


def _tar_of_images(path, count, size=32):
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                buffer, format="PNG", compress_level=1
            )
            for name, data in [(f"{i:06d}.png", buffer.getvalue()), (f"{i:06d}.txt", f"sample {i}".encode())]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _traced_stream(records, checkpoint):
    """Consume records, touching every pixel; returns (memory at checkpoint, memory at end, peak)."""
    tracemalloc.start()
    try:
        at_checkpoint, total = None, 0
        for i, record in enumerate(records):
            total += int(np.asarray(record.image).sum()) if hasattr(record, "image") else len(record.messages)
            if i == checkpoint:
                at_checkpoint = tracemalloc.get_traced_memory()[0]
        end, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total > 0
    return at_checkpoint, end, peak


def test_streaming_an_epoch_does_not_grow_memory(tmp_path):
    count = 2000
    _tar_of_images(tmp_path / "s.tar", count)
    decoded_bytes = count * 32 * 32 * 3
    at_checkpoint, end, peak = _traced_stream(WebDatasetReader([str(tmp_path / "s.tar")]), checkpoint=200)
    # Nothing decoded is kept: memory after 2000 samples is that after 200 (within 256 KiB), and
    # the peak is a small fraction of what caching all decoded images would take.
    assert end - at_checkpoint < 256 * 1024
    assert peak < decoded_bytes / 4

    line = {"id": 0, "conversations": [{"from": "human", "value": "hi " * 50}, {"from": "gpt", "value": "yo " * 50}]}
    with open(tmp_path / "chat.jsonl", "w") as handle:
        handle.writelines(json.dumps({**line, "id": i}) + "\n" for i in range(count))
    at_checkpoint, end, peak = _traced_stream(LlavaReader(tmp_path / "chat.jsonl"), checkpoint=200)
    assert end - at_checkpoint < 256 * 1024
    assert peak < (tmp_path / "chat.jsonl").stat().st_size / 4
