"""Shared loading mechanics: counted skipping of bad samples and deterministic worker seeding.

Every reader in `polymodal.data.formats` streams records from files a user brought. Real data is
dirty (a missing image, one malformed JSON line among a million), so a reader never crashes on a
single bad sample and never drops it silently either: it asks a `SkipCounter` to record the skip,
which logs a warning naming the file and the record (index or key) and counts it. With
`strict=True` the same call raises `DataError` instead, for users who want a clean dataset or a
failing CI job.

Counts live in the process that read the sample: with a multi-worker DataLoader each worker
counts its own skips (the warnings are logged from every worker, so nothing is lost).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

logger = logging.getLogger("polymodal.data")

T = TypeVar("T")
R = TypeVar("R")


class DataError(ValueError):
    """A sample, record or data file is malformed; the message names the file and the record."""


class SkipCounter:
    """Counts and logs skipped samples of one source, or raises when `strict`.

    Args:
        source: what is being read (a file path or shard pattern), used in every message.
        strict: raise `DataError` on the first bad sample instead of skipping it.
        log: logger that receives one warning per skipped sample.

    Attributes:
        count: number of samples skipped so far.
        reasons: the last few skip messages (at most `keep`), for reports and tests.
    """

    def __init__(self, source: str, strict: bool = False, log: logging.Logger = logger, keep: int = 20):
        self.source = str(source)
        self.strict = strict
        self.log = log
        self.keep = keep
        self.count = 0
        self.reasons: list[str] = []

    def skip(self, where: str, reason: object) -> None:
        """Record that the sample at `where` (e.g. "record 17", "key 000003") was bad.

        Raises:
            DataError: in strict mode, naming the source, the sample and the reason.
        """
        message = f"{self.source}: {where}: {reason}"
        if self.strict:
            if isinstance(reason, BaseException):
                raise DataError(message) from reason
            raise DataError(message)
        self.count += 1
        if len(self.reasons) < self.keep:
            self.reasons.append(message)
        self.log.warning("skipping bad sample (%d skipped so far) in %s", self.count, message)


def skip_bad(items: Iterable[tuple[str, T]], parse: Callable[[T], R], counter: SkipCounter) -> Iterator[R]:
    """Yield `parse(raw)` for each `(where, raw)` pair, skipping samples whose parse raises `DataError`.

    Only `DataError` (which `ImageError` subclasses) is treated as bad data; any other exception
    is a bug and propagates. Parsers therefore validate explicitly and raise `DataError`.
    """
    for where, raw in items:
        try:
            out = parse(raw)
        except DataError as err:
            counter.skip(where, err)
            continue
        yield out


def read_json(path: str | Path) -> object:
    """Parse a whole JSON file; a missing or unparsable file raises `DataError` naming it.

    A file that does not parse cannot be partly trusted, so this is an error, never a skip.
    """
    try:
        with open(path, "rb") as handle:
            return json.load(handle)
    except FileNotFoundError as err:
        raise DataError(f"{path}: file not found") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON: {err}") from err


def iter_jsonl(path: str | Path, counter: SkipCounter) -> Iterator[tuple[str, object]]:
    """Stream `("line N", record)` pairs from a JSON Lines file; blank lines are ignored.

    A line that is not valid UTF-8 JSON is reported to `counter` (skipped and counted, or raised
    in strict mode) without stopping the stream.

    Raises:
        DataError: if the file does not exist.
    """
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                counter.skip(f"line {lineno}", f"not valid JSON: {err}")
                continue
            yield f"line {lineno}", raw


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn` making `random` and `numpy` deterministic per worker.

    PyTorch already seeds each worker's torch RNG with `base_seed + worker_id`, where the base
    seed comes from the DataLoader's `generator`; Python's `random` and numpy are not reseeded
    (forked workers would share the parent's numpy state and draw identical augmentations).
    Deriving both from `torch.initial_seed()` ties them to the same base seed.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_generator(seed: int) -> torch.Generator:
    """A torch Generator seeded with `seed`, to pass as `DataLoader(generator=...)`.

    It fixes the shuffling order and the base seed of the workers, so together with
    `worker_init_fn=seed_worker` two runs with the same seed see the same batches.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator
