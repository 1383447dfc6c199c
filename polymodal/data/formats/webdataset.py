"""WebDataset tar shards: per key, one image (`.jpg`/`.png`/...) plus `.txt` and/or `.json`.

Large data sets (LAION, DataComp, CC12M as released by img2dataset) come as many tar shards that
are read sequentially, never randomly: that is what makes them fast on network storage. The
reader streams each local shard with `tarstream.iter_shard` (the `webdataset` library only
expands brace patterns: its own tar reader drops the tail of a truncated shard silently, and its
`pipe:` URLs would run shell commands) and decodes images with our safe decoder.

Sharding: shards are dealt to ranks first (`shards[rank::world_size]`, given explicitly so the
reader needs no initialized process group), then to the DataLoader workers of each rank
(`shards[worker::num_workers]`), so every sample is read exactly once per epoch across the job.
Give at least `world_size * num_workers` shards, or some workers idle.

A corrupt shard or sample (a truncated or corrupt tar, reported with the byte offset where it
broke; an undecodable image, a missing caption, invalid JSON, a member name without a key, a
link member) is skipped with a counted warning naming the shard and key, or raises in strict mode.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import webdataset as wds
from PIL import Image

from polymodal.data.formats.tarstream import DEFAULT_MAX_MEMBER_BYTES, TarSample, iter_shard
from polymodal.data.image import DEFAULT_MAX_PIXELS, decode_image
from polymodal.data.loading import DataError, SkipCounter, loads_json
from polymodal.errors import UsageError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class WebDatasetRecord:
    """One decoded WebDataset sample.

    Attributes:
        key: the sample key (file name without extension, inside the tar).
        image: RGB image.
        text: the `.txt` member decoded as UTF-8, or None if absent.
        meta: the `.json` member parsed, or None if absent.
        shard: the shard the sample came from.
    """

    key: str
    image: Image.Image
    text: str | None
    meta: dict | None
    shard: str


class WebDatasetReader(torch.utils.data.IterableDataset):
    """Stream `WebDatasetRecord`s from tar shards, split across ranks and DataLoader workers.

    Args:
        shards: a brace pattern ("data/shard-{000000..000009}.tar") or a list of shard paths.
        rank: this process's rank in the job (0-based).
        world_size: number of ranks; must not exceed the number of shards.
        strict: raise `DataError` on the first bad shard or sample instead of skipping it.
        max_pixels: decompression-bomb limit passed to the image decoder.
        max_member_bytes: largest tar member read into memory; a larger one skips its sample.

    Attributes:
        skipped: `SkipCounter` of the last iteration in this process (one per worker).
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        rank: int = 0,
        world_size: int = 1,
        strict: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    ):
        super().__init__()
        self.urls = list(wds.shardlists.expand_urls(shards)) if isinstance(shards, str) else [str(s) for s in shards]
        if not self.urls:
            raise UsageError(f"WebDatasetReader: no shards in {shards!r}")
        if not 0 <= rank < world_size:
            raise UsageError(f"WebDatasetReader: rank={rank} must be in [0, world_size={world_size})")
        if world_size > len(self.urls):
            raise UsageError(
                f"WebDatasetReader: world_size={world_size} exceeds the {len(self.urls)} shard(s); "
                "some ranks would get no data"
            )
        more = f" (+{len(self.urls) - 2} more)" if len(self.urls) > 2 else ""
        self.source = shards if isinstance(shards, str) else ", ".join(self.urls[:2]) + more
        self.rank = rank
        self.world_size = world_size
        self.strict = strict
        self.max_pixels = max_pixels
        self.max_member_bytes = max_member_bytes
        self.skipped = SkipCounter(self.source, strict)

    def __iter__(self) -> Iterator[WebDatasetRecord]:
        self.skipped = SkipCounter(self.source, self.strict)
        for shard in self._my_shards():
            for sample in iter_shard(shard, self.skipped, self.max_member_bytes):
                try:
                    yield self._decode(sample)
                except DataError as err:
                    self.skipped.skip(f"{shard}: key {sample.key}", err)

    def _my_shards(self) -> list[str]:
        """This rank's shards (`urls[rank::world_size]`), then this DataLoader worker's share of them."""
        shards = self.urls[self.rank :: self.world_size]
        worker = torch.utils.data.get_worker_info()
        return shards if worker is None else shards[worker.id :: worker.num_workers]

    def _decode(self, sample: TarSample) -> WebDatasetRecord:
        """Decode one sample's members; raises `DataError` naming what is wrong."""
        if sample.problem is not None:
            raise DataError(sample.problem)
        members = sample.members
        ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        if ext is None:
            raise DataError(f"no image member (.{'/.'.join(IMAGE_EXTENSIONS)}); members: {sorted(members)}")
        if "txt" not in members and "json" not in members:
            raise DataError("no .txt or .json member")
        image = decode_image(members[ext], f"{sample.shard}:{sample.key}.{ext}", self.max_pixels)
        try:
            text = members["txt"].decode("utf-8") if "txt" in members else None
        except UnicodeDecodeError as err:
            raise DataError(f".txt member is not UTF-8: {err}") from err
        meta = None
        if "json" in members:
            try:
                meta = loads_json(members["json"])
            except DataError as err:
                raise DataError(f".json member: {err}") from err.__cause__
            if not isinstance(meta, dict):
                raise DataError(f".json member is a {type(meta).__name__}, expected an object")
        return WebDatasetRecord(key=sample.key, image=image, text=text, meta=meta, shard=sample.shard)
