"""Frozen-encoder feature caching: run a frozen vision tower or VAE encoder over a data set once,
store its outputs as WebDataset shards, and train on the cached features instead of pixels.

A frozen encoder computes the same features every epoch; for an MM-LLM with a frozen ViT, or a
latent diffusion model with a frozen VAE, that forward is a large share of each step. Each rank
encodes its share of the items (`items[rank::world]`) and writes its own shards,
`<prefix>-r<rank>-<n>.tar`, each sample holding
    <key>.safetensors   the features, tensor "features" (safetensors: no pickle either way)
    <key>.json          the item's metadata (captions, labels: whatever the caller passes)
`read_cached_features` streams them back, dealing shards to ranks as `WebDatasetReader` does.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from polymodal.data.formats.tarstream import iter_shard
from polymodal.data.loading import DataError, SkipCounter
from polymodal.errors import UsageError

FEATURES_MEMBER, META_MEMBER = "safetensors", "json"


def cache_features(encode: Callable[[torch.Tensor], torch.Tensor], items: Sequence, out_dir: str | Path, *,
                   prefix: str = "features", shard_size: int = 1000, batch_size: int = 64, rank: int = 0,
                   world: int = 1) -> list[Path]:
    """Encode this rank's items and write them as WebDataset shards; returns the shards written.

    encode: inputs (B, ...) -> features (B, ...), called under `torch.no_grad()`.
    items[i] -> (key: str, inputs: tensor (...), meta: JSON-ready dict); keys must be unique and
    free of dots (WebDataset splits member names at the first dot).
    """
    if shard_size < 1 or batch_size < 1:
        raise UsageError(f"cache_features: shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
    if not 0 <= rank < world:
        raise UsageError(f"cache_features: rank={rank} must be in [0, world={world})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = range(rank, len(items), world)
    shards: list[Path] = []
    tar = None
    for start in range(0, len(mine), batch_size):
        chunk = [items[i] for i in mine[start:start + batch_size]]
        for key, _, _ in chunk:
            if "." in key:
                raise UsageError(f"cache_features: key {key!r} contains a dot")
        with torch.no_grad():
            features = encode(torch.stack([inputs for _, inputs, _ in chunk])).detach().cpu()  # (B, ...)
        for offset, ((key, _, meta), row) in enumerate(zip(chunk, features)):
            if (start + offset) % shard_size == 0:
                if tar is not None:
                    tar.close()
                shards.append(out_dir / f"{prefix}-r{rank:05d}-{len(shards):06d}.tar")
                tar = tarfile.open(shards[-1], "w")
            _add(tar, f"{key}.{FEATURES_MEMBER}", save_tensors({"features": row.contiguous()}))
            _add(tar, f"{key}.{META_MEMBER}", json.dumps(meta).encode("utf-8"))
    if tar is not None:
        tar.close()
    return shards


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def read_cached_features(shards: Sequence[str | Path], rank: int = 0, world: int = 1,
                         strict: bool = True) -> Iterator[tuple[str, torch.Tensor, dict]]:
    """Yield (key, features, meta) from this rank's shards (`shards[rank::world]`, sorted by name).

    A sample without both members, or with unreadable ones, raises `DataError` naming shard and
    key (or is skipped and counted with strict=False)."""
    names = sorted(str(s) for s in shards)
    if world > len(names):
        raise UsageError(f"read_cached_features: {world} ranks but only {len(names)} shard(s)")
    counter = SkipCounter(", ".join(names[:2]), strict)
    for shard in names[rank::world]:
        for sample in iter_shard(shard, counter):
            try:
                if sample.problem is not None:
                    raise DataError(sample.problem)
                if FEATURES_MEMBER not in sample.members or META_MEMBER not in sample.members:
                    raise DataError(f"needs .{FEATURES_MEMBER} and .{META_MEMBER} members, "
                                    f"has {sorted(sample.members)}")
                features = load_tensors(sample.members[FEATURES_MEMBER])["features"]
                meta = json.loads(sample.members[META_MEMBER])
            except (DataError, ValueError, KeyError) as err:
                counter.skip(f"{shard}: key {sample.key}", err)
                continue
            yield sample.key, features, meta
