"""Resumable batch streams: coverage of epochs and exact state round trips."""
from __future__ import annotations

import json

import pytest

from polymodal.train.data import IndexedBatches, ResumableBatches, ShuffledBatches


def test_shuffled_epochs_cover_every_item_once_in_new_orders():
    stream = ShuffledBatches(10, 3, collate=list, seed=5)
    assert stream.batches_per_epoch() == 3
    epoch0 = [next(stream) for _ in range(3)]
    epoch1 = [next(stream) for _ in range(3)]
    for epoch in (epoch0, epoch1):
        items = [i for batch in epoch for i in batch]
        assert len(items) == len(set(items)) == 9 and all(len(b) == 3 for b in epoch)
    assert epoch0 != epoch1
    assert stream.epoch == 1


def test_shuffled_keep_last_partial_batch():
    stream = ShuffledBatches(10, 4, collate=list, seed=0, drop_last=False)
    sizes = [len(next(stream)) for _ in range(3)]
    assert sizes == [4, 4, 2] and stream.batches_per_epoch() == 3


def test_shuffled_state_round_trip_mid_epoch():
    stream = ShuffledBatches(17, 4, collate=list, seed=2)
    for _ in range(6):
        next(stream)
    state = json.loads(json.dumps(stream.state_dict()))  # must survive JSON
    expected = [next(stream) for _ in range(7)]
    restored = ShuffledBatches(17, 4, collate=list, seed=2)
    restored.load_state_dict(state)
    assert [next(restored) for _ in range(7)] == expected
    assert isinstance(restored, ResumableBatches)


def test_shuffled_rejects_state_of_another_stream():
    state = ShuffledBatches(17, 4, collate=list, seed=2).state_dict()
    with pytest.raises(ValueError, match="seed=2"):
        ShuffledBatches(17, 4, collate=list, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        ShuffledBatches(3, 4, collate=list)


def test_indexed_state_round_trip():
    stream = IndexedBatches(lambda i: i * i)
    assert [next(stream) for _ in range(3)] == [0, 1, 4]
    restored = IndexedBatches(lambda i: i * i)
    restored.load_state_dict(stream.state_dict())
    assert next(restored) == 9
    with pytest.raises(ValueError, match="index"):
        restored.load_state_dict({})
