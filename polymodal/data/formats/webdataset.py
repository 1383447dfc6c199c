"""WebDataset tar shards: per key, one image (`.jpg`/`.png`/...) plus `.txt` and/or `.json`.

Large data sets (LAION, DataComp, CC12M as released by img2dataset) come as many tar shards that
are read sequentially, never randomly: that is what makes them fast on network storage. The
reader streams them with the `webdataset` library and decodes images with our safe decoder.

Sharding: shards are dealt to ranks first (`shards[rank::world_size]`, given explicitly so the
reader needs no initialized process group), then to the DataLoader workers of each rank
(`webdataset.split_by_worker`), so every sample is read exactly once per epoch across the job.
Give at least `world_size * num_workers` shards, or some workers idle.

A corrupt shard or sample (truncated tar, undecodable image, missing caption, invalid JSON) is
skipped with a counted warning naming the shard and key, or raises in strict mode.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice

import torch
import webdataset as wds
from PIL import Image

from polymodal.data.image import DEFAULT_MAX_PIXELS, decode_image
from polymodal.data.loading import DataError, SkipCounter

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
    ):
        super().__init__()
        self.urls = list(wds.shardlists.expand_urls(shards)) if isinstance(shards, str) else [str(s) for s in shards]
        if not self.urls:
            raise ValueError(f"WebDatasetReader: no shards in {shards!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"WebDatasetReader: rank={rank} must be in [0, world_size={world_size})")
        if world_size > len(self.urls):
            raise ValueError(
                f"WebDatasetReader: world_size={world_size} exceeds the {len(self.urls)} shard(s); "
                "some ranks would get no data"
            )
        more = f" (+{len(self.urls) - 2} more)" if len(self.urls) > 2 else ""
        self.source = shards if isinstance(shards, str) else ", ".join(self.urls[:2]) + more
        self.rank = rank
        self.world_size = world_size
        self.strict = strict
        self.max_pixels = max_pixels
        self.skipped = SkipCounter(self.source, strict)
        self._last_tar_error: object = None

    def __iter__(self) -> Iterator[WebDatasetRecord]:
        self.skipped = SkipCounter(self.source, self.strict)
        self._last_tar_error = None
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.urls),
            self._split_by_rank,
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=self._tar_error),
            self._decode_samples,
        )
        return iter(pipeline)

    def _split_by_rank(self, src: Iterable[dict]) -> Iterator[dict]:
        """Pipeline stage keeping this rank's shards (webdataset's split_by_node, explicit rank)."""
        return islice(src, self.rank, None, self.world_size)

    def _tar_error(self, exn: Exception) -> bool:
        """webdataset handler for unreadable shards/members: count and continue (or raise if strict)."""
        # webdataset reports one tar error twice (member loop, then shard loop with the url
        # appended to args); count it once.
        first = exn.args[0] if exn.args else exn
        if first != self._last_tar_error:
            self._last_tar_error = first
            self.skipped.skip("tar stream", exn)
        return True

    def _decode_samples(self, src: Iterable[dict]) -> Iterator[WebDatasetRecord]:
        """Pipeline stage turning raw member dicts into records, skipping bad samples."""
        for sample in src:
            key, shard = sample.get("__key__", "?"), sample.get("__url__", "?")
            try:
                yield self._decode(sample, key, shard)
            except DataError as err:
                self.skipped.skip(f"{shard}: key {key}", err)

    def _decode(self, sample: dict, key: str, shard: str) -> WebDatasetRecord:
        """Decode one sample's members; raises `DataError` naming what is wrong."""
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            members = sorted(k for k in sample if not k.startswith("__"))
            raise DataError(f"no image member (.{'/.'.join(IMAGE_EXTENSIONS)}); members: {members}")
        if "txt" not in sample and "json" not in sample:
            raise DataError("no .txt or .json member")
        image = decode_image(sample[ext], f"{shard}:{key}.{ext}", self.max_pixels)
        try:
            text = sample["txt"].decode("utf-8") if "txt" in sample else None
        except UnicodeDecodeError as err:
            raise DataError(f".txt member is not UTF-8: {err}") from err
        meta = None
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise DataError(f".json member is not valid JSON: {err}") from err
            if not isinstance(meta, dict):
                raise DataError(f".json member is a {type(meta).__name__}, expected an object")
        return WebDatasetRecord(key=key, image=image, text=text, meta=meta, shard=shard)
