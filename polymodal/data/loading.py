"""Shared loading mechanics: counted skipping of bad samples and deterministic worker seeding.

Every reader in `polymodal.data.formats` streams records from files a user brought. Real data is
dirty (a missing image, one malformed JSON line among a million), so a reader never crashes on a
single bad sample and never drops it silently either: it asks a `SkipCounter` to record the skip,
which logs a warning naming the file and the record (index or key) and counts it. With
`strict=True` the same call raises `DataError` instead, for users who want a clean dataset or a
failing CI job.

Every message is one line naming the file and the record, line, key or byte offset at fault;
bad values in it are clipped (`describe`, `clip`), since a hostile record can hold 100 kB strings.
JSON is parsed through `loads_json`, which turns every parse failure, including nesting too
deep for Python's parser, into a `DataError`.

Counts live in the process that read the sample: with a multi-worker DataLoader each worker
counts its own skips (the warnings are logged from every worker, so nothing is lost).
"""

from __future__ import annotations

import json
import logging
import random
import reprlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from polymodal.errors import DataError

# DataError lives in polymodal.errors (one hierarchy for every user-facing error); it is re-exported
# here because every reader and many callers import it from this module.
__all__ = [
    "DataError", "SkipCounter", "check_text", "clip", "describe", "iter_jsonl", "loads_json", "make_generator",
    "read_json", "seed_worker", "short_repr", "skip_bad",
]  # fmt: skip

logger = logging.getLogger("polymodal.data")

T = TypeVar("T")
R = TypeVar("R")


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
        """Record that the sample at `where` (e.g. "record 17", "shard-000001.tar: key 000003") was bad.

        Raises:
            DataError: in strict mode, naming the source, the sample and the reason.
        """
        # A reader of many files names the file in `where`; one file is not named twice.
        named = where == self.source or where.startswith(f"{self.source}: ")
        message = one_line(f"{where}: {reason}" if named else f"{self.source}: {where}: {reason}")
        if self.strict:
            if isinstance(reason, BaseException):
                raise DataError(message) from reason
            raise DataError(message)
        self.count += 1
        if len(self.reasons) < self.keep:
            self.reasons.append(message)
        self.log.warning("skipping bad sample (%d skipped so far) in %s", self.count, message)


def one_line(message: str) -> str:
    """`message` as one printable line: line breaks and undecodable bytes (lone surrogates from
    file names or lenient JSON) escaped, so one problem is one log line and printing never fails."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return clip(message.replace("\r", "\\r").replace("\n", "\\n"), 2000)


def clip(text: object, limit: int = 300) -> str:
    """`str(text)`, its middle elided if longer than `limit` (a path from a hostile record can be
    100 kB; its start and end are what identify it)."""
    text = str(text)
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"


# Bad values are quoted in messages, but a 10 MB string or a 100000-deep list must not be.
_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlevel = 60, 60, 3


def short_repr(value: object) -> str:
    """`repr(value)` clipped to a few dozen characters and three nesting levels, for messages."""
    return _SHORT.repr(value)


def describe(value: object) -> str:
    """A bad value for an error message: its type and `short_repr` (e.g. "list [1, 2, 3, 4, ...]")."""
    return f"{type(value).__name__} {short_repr(value)}"


def check_text(value: object, field: str, nonempty: bool = False) -> str:
    """Return `value` if it is a string of valid Unicode text, else raise `DataError` naming `field`.

    Strings decoded leniently (`read_json`) carry undecodable bytes as lone surrogates, and JSON
    can spell lone surrogates (`"\\ud800"`); neither can be encoded as UTF-8 later (tokenizers,
    logs), so such a field makes its record bad rather than crashing a later stage.
    """
    if not isinstance(value, str):
        raise DataError(f"{field} must be a string, got {describe(value)}")
    if nonempty and not value.strip():
        raise DataError(f"{field} must be a non-empty string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(f"{field} is not valid UTF-8 text (bad character at position {err.start})") from err
    return value


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


def loads_json(data: bytes | str, errors: str = "strict") -> object:
    """Parse one JSON document; anything unparsable raises `DataError` (callers add the file name).

    `errors="surrogateescape"` keeps invalid UTF-8 bytes inside strings as lone surrogates instead
    of failing the whole document; `check_text` then rejects just the record that uses them.
    """
    try:
        if isinstance(data, bytes):
            encoding = json.detect_encoding(data)
            data = data.decode(encoding, errors if encoding.startswith("utf-8") else "strict")
        return json.loads(data)
    except RecursionError as err:
        # Python's parser recurses once per nesting level: `[[[[...` 100000 deep exhausts the stack.
        raise DataError("JSON nested too deeply to parse (more levels than Python's recursion limit)") from err
    except ValueError as err:
        # JSONDecodeError, UnicodeDecodeError, and the int-digits limit ("1" * 5000) are ValueErrors.
        raise DataError(f"not valid JSON: {err}") from err


def read_json(path: str | Path) -> object:
    """Parse a whole JSON file; a missing, unreadable or unparsable file raises `DataError` naming it.

    A file that does not parse cannot be partly trusted, so this is an error, never a skip. Invalid
    UTF-8 inside strings is not a parse failure: it costs only the record using it (`check_text`).
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as err:
        raise DataError(f"{path}: file not found") from err
    except OSError as err:
        raise DataError(f"{path}: cannot read file: {err.strerror or err}") from err
    try:
        return loads_json(data, errors="surrogateescape")
    except DataError as err:
        raise DataError(f"{path}: {err}") from err.__cause__


def iter_jsonl(path: str | Path, counter: SkipCounter) -> Iterator[tuple[str, object]]:
    """Stream `("line N", record)` pairs from a JSON Lines file; blank lines are ignored.

    A line that is not valid UTF-8 JSON (or is nested too deeply) is reported to `counter` (skipped
    and counted, or raised in strict mode) without stopping the stream.

    Raises:
        DataError: if the file does not exist or cannot be opened.
    """
    try:
        handle = open(path, "rb")
    except FileNotFoundError as err:
        raise DataError(f"{path}: file not found") from err
    except OSError as err:
        raise DataError(f"{path}: cannot read file: {err.strerror or err}") from err
    with handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                raw = loads_json(line)
            except DataError as err:
                counter.skip(f"line {lineno}", err)
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
