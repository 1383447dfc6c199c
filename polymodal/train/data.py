"""Resumable batch streams: the contract that makes a resumed training run exact.

The training loop draws batches with `next(data)`. To resume a run bit-identically it must put
the stream back where it was, so a resumable stream is an iterator with two more methods:

    state_dict() -> dict         the position, as plain JSON data (ints, strings, lists)
    load_state_dict(dict)        jump to a position taken from an equal stream

Contract: build the stream again with the same arguments, load the state taken after k batches,
and the following `next()` calls return exactly the batches the original stream returned after
its k-th one. Hence a batch must be a pure function of the stream's arguments and its position:
any randomness (shuffling, augmentation) has to be seeded from the position, never drawn from
global RNGs or carried in hidden state. The state is small and JSON-ready because it is stored
in the checkpoint's `trainer_state.json`.

Two adapters cover the usual cases:
- `IndexedBatches(batch_fn)`: batch i is `batch_fn(i)`; the position is i.
- `ShuffledBatches(dataset_len, batch_size, collate, seed)`: epoch-wise seeded permutations of a
  map-style dataset; the position is (epoch, offset into the epoch's permutation).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class ResumableBatches(Protocol):
    """An endless or finite batch iterator whose position can be saved and restored (see module doc)."""

    def __iter__(self) -> Iterator[Any]: ...

    def __next__(self) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class IndexedBatches:
    """Endless stream where batch i is `batch_fn(i)`, for i = 0, 1, 2, ...

    `batch_fn` must be a pure function of i (seed any randomness from i), which makes the stream
    resumable from the single integer i.
    """

    def __init__(self, batch_fn: Callable[[int], Any], start: int = 0) -> None:
        self.batch_fn = batch_fn
        self.index = start

    def __iter__(self) -> IndexedBatches:
        return self

    def __next__(self) -> Any:
        batch = self.batch_fn(self.index)
        self.index += 1
        return batch

    def state_dict(self) -> dict:
        """{"index": i}: the index of the next batch."""
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        """Continue from the position saved by `state_dict`."""
        self.index = int(_field(state, "index", "IndexedBatches"))


class ShuffledBatches:
    """Endless stream of shuffled mini-batches over a map-style dataset of `dataset_len` items.

    Each epoch visits the items in a permutation drawn from `numpy.random.default_rng([seed,
    epoch])`, so the order of any epoch is a pure function of (seed, epoch). Batches hold
    `batch_size` indices given to `collate(indices) -> batch`; with `drop_last` (default) the
    epoch's last partial batch is skipped so every batch has the same size.
    Position: (epoch, offset), the offset counting items already served in this epoch.
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        collate: Callable[[list[int]], Any],
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"ShuffledBatches: batch_size must be >= 1, got {batch_size}")
        if dataset_len < (batch_size if drop_last else 1):
            raise ValueError(
                f"ShuffledBatches: dataset_len={dataset_len} is too small for one batch of batch_size={batch_size}"
            )
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.collate = collate
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.offset = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        """The visiting order of `epoch`: a permutation of range(dataset_len)."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.dataset_len)

    def batches_per_epoch(self) -> int:
        """How many batches one pass over the dataset yields."""
        full, rest = divmod(self.dataset_len, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> ShuffledBatches:
        return self

    def __next__(self) -> Any:
        remaining = self.dataset_len - self.offset
        if remaining <= 0 or (self.drop_last and remaining < self.batch_size):
            self.epoch += 1
            self.offset = 0
            self._order = self._permutation(self.epoch)
        indices = self._order[self.offset:self.offset + self.batch_size].tolist()
        self.offset += len(indices)
        return self.collate(indices)

    def state_dict(self) -> dict:
        """{"epoch", "offset"} plus the arguments that define the order, checked on load."""
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed,
                "dataset_len": self.dataset_len, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the seed/length/batch size must match this stream's."""
        for key in ("seed", "dataset_len", "batch_size"):
            saved = _field(state, key, "ShuffledBatches")
            if saved != getattr(self, key):
                raise ValueError(
                    f"ShuffledBatches: saved data state has {key}={saved}, this stream has "
                    f"{key}={getattr(self, key)}; the resumed order would differ"
                )
        self.epoch = int(_field(state, "epoch", "ShuffledBatches"))
        self.offset = int(_field(state, "offset", "ShuffledBatches"))
        self._order = self._permutation(self.epoch)


def _field(state: dict, key: str, owner: str) -> Any:
    """`state[key]`, or an error naming the stream class and the missing key."""
    try:
        return state[key]
    except (KeyError, TypeError):
        raise ValueError(f"{owner}.load_state_dict: the saved data state {state!r} lacks {key!r}") from None


def is_resumable(data: Any) -> bool:
    """Whether `data` follows the resumable-stream protocol (has state_dict/load_state_dict)."""
    return callable(getattr(data, "state_dict", None)) and callable(getattr(data, "load_state_dict", None))
