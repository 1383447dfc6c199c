"""Per-rank data: each rank trains on its own share of the same global batch.

Every rank builds the same resumable stream (same arguments, same seed), so every rank knows
the global batch at each position; `shard_stream` makes each rank build only its share:
- `ShuffledBatches` (map-style readers: the LM and MM-LLM recipes, user files): rank r collates
  the items `indices[r::world]` of the global batch; the sampler's permutation is global, so the
  ranks read disjoint items that cover the data set once per epoch (a distributed sampler);
- `IndexedBatches` (the shapes-world streams, `PairBatches`): batch i is split by rows, rank r
  keeping the r-th of `world` equal parts (the rows must divide evenly: contrastive losses need
  the same local batch on every rank). A batch_fn that can build one rank's share itself says so
  with `for_rank(rank, world)` -> the rank's batch_fn (the unified recipe packs only its own
  documents of batch i: a packed row mixes documents, so rows do not split the global batch).
The stream's position stays the global position, identical on every rank, so the one saved
`data` state resumes every rank exactly, at the same or at another world size.

`GlobalBatchObjective` makes the gradient the one of the global batch: a rank's loss is a mean
over its own units (target tokens, rows), and ranks hold different numbers of them, so each
rank's loss is weighted by its share (w_r * world / sum w) before DDP/FSDP average the
gradients; the reported loss is the global mean, identical on every rank. With this, N
processes follow the loss curve of one process on the same global batch.

Streaming `WebDatasetReader`s deal whole shards to ranks and DataLoader workers themselves
(`polymodal.distributed.current_world()` gives them the rank and world size).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.distributed as dist

from polymodal.errors import ConfigError, UsageError
from polymodal.sequence import IGNORE_INDEX, PackedBatch
from polymodal.train.data import IndexedBatches, ShuffledBatches

PACKED_ROW_FIELDS = ("token_ids", "document_ids", "positions", "segment_ids", "bidirectional", "labels",
                     "masked_labels")


class RankItems:
    """collate wrapper: the global batch's item indices -> this rank's share `indices[rank::world]`."""

    def __init__(self, collate: Callable[[list[int]], Any], rank: int, world: int) -> None:
        self.collate, self.rank, self.world = collate, rank, world

    def __call__(self, indices: list[int]) -> Any:
        return self.collate(list(indices)[self.rank::self.world])


class RankRows:
    """batch_fn wrapper: batch i -> the rank's equal share of its rows (see `split_rows`)."""

    def __init__(self, batch_fn: Callable[[int], Any], rank: int, world: int) -> None:
        self.batch_fn, self.rank, self.world = batch_fn, rank, world

    def __call__(self, index: int) -> Any:
        return split_rows(self.batch_fn(index), self.rank, self.world)


def shard_stream(data: Any, rank: int, world: int) -> Any:
    """Make `data` yield this rank's share of each global batch (in place; returns it).

    ShuffledBatches: items dealt `indices[rank::world]`; the global batch size must be at least
    `world`. IndexedBatches: the batch_fn's own `for_rank(rank, world)` when it has one, else rows
    split evenly. Anything else is refused: an arbitrary iterable cannot be split without reading
    everything on every rank.
    """
    if world == 1:
        return data
    if isinstance(data, ShuffledBatches):
        if data.batch_size < world:
            raise ConfigError(f"the global batch holds {data.batch_size} items, fewer than the {world} processes; "
                              "raise the recipe's batch size (docs_per_batch / batch_size)")
        data.collate = RankItems(data.collate, rank, world)
        return data
    if isinstance(data, IndexedBatches):
        for_rank = getattr(data.batch_fn, "for_rank", None)
        data.batch_fn = for_rank(rank, world) if callable(for_rank) else RankRows(data.batch_fn, rank, world)
        return data
    raise UsageError(f"training data of type {type(data).__name__} cannot be sharded across {world} processes; "
                     "give the recipe a ShuffledBatches or IndexedBatches stream (polymodal.train.data)")


def split_rows(batch: Any, rank: int, world: int) -> Any:
    """The rank-th of `world` equal row blocks of a batch: a tensor (rows first), a dict / list /
    tuple of them (non-tensors kept), or a `PackedBatch` without payload segments.

    Raises `ConfigError` when the rows do not divide by `world`."""
    if isinstance(batch, PackedBatch):
        return _packed_rows(batch, rank, world)
    if isinstance(batch, torch.Tensor):
        if batch.ndim == 0:
            return batch
        rows = batch.shape[0]
        if rows % world:
            raise ConfigError(f"a batch of {rows} rows does not split over {world} processes; make the recipe's "
                              f"batch size a multiple of {world}")
        per = rows // world
        return batch[rank * per:(rank + 1) * per]
    if isinstance(batch, dict):
        return {key: split_rows(value, rank, world) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(split_rows(v, rank, world) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(split_rows(v, rank, world) for v in batch)
    return batch


def _packed_rows(batch: PackedBatch, rank: int, world: int) -> PackedBatch:
    """Rows of a packed batch; documents never span rows, so a row block is a valid batch."""
    if batch.placements:
        raise UsageError("a packed batch with image/payload segments cannot be split by rows; build it from "
                         "documents with ShuffledBatches so each rank packs its own documents")
    rows = batch.token_ids.shape[0]
    if rows < world:
        raise ConfigError(f"a packed batch of {rows} rows cannot feed {world} processes; pack more documents per batch")
    bounds = [rows * r // world for r in range(world + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    fields = {name: getattr(batch, name)[lo:hi] for name in PACKED_ROW_FIELDS}
    kept = [(row - lo, start) for row, start in batch.document_rows if lo <= row < hi]
    return dataclasses.replace(batch, **fields, placements=[], document_rows=kept)


def batch_weight(batch: Any) -> int:
    """How many units a batch's loss averages over: target tokens of a `PackedBatch` (next-token
    labels, else masked-token labels, else real positions), rows of anything else."""
    if isinstance(batch, PackedBatch):
        for labels in (batch.labels, batch.masked_labels):
            count = int((labels != IGNORE_INDEX).sum())
            if count:
                return count
        return batch.num_tokens
    from polymodal.train.step import batch_size

    return batch_size(batch) or 1


class GlobalBatchObjective:
    """objective(model, batch) -> loss, re-weighted so that data-parallel gradient averaging gives
    the gradient of the global batch's loss (see the module docstring).

    A dict of losses (one per optimizer) is weighted term by term. One all-reduce of
    (weight, weight x loss per term) per micro-batch; the returned value is the global loss,
    its gradient that of this rank's weighted share.
    """

    def __init__(self, objective: Callable[[Any, Any], Any], weight: Callable[[Any], int] = batch_weight) -> None:
        self.objective, self.weight = objective, weight

    def __call__(self, model: Any, batch: Any) -> Any:
        loss = self.objective(model, batch)
        terms = loss if isinstance(loss, dict) else {"": loss}
        world = dist.get_world_size()
        weight = float(self.weight(batch))
        losses = torch.stack([value.detach().double() for value in terms.values()])  # (terms,)
        sums = torch.cat([losses.new_tensor([weight]), losses * weight])  # (1 + terms,), on the loss's device
        dist.all_reduce(sums)
        total = sums[0]
        weighted = {}
        for (name, value), summed in zip(terms.items(), sums[1:]):
            scaled = value * (weight * world / total).to(value.dtype)
            # scaled - scaled.detach() is exactly 0 with scaled's gradient: the value is the global mean.
            weighted[name] = scaled - scaled.detach() + (summed / total).to(value.dtype)
        return weighted if isinstance(loss, dict) else weighted[""]
