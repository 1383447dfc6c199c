"""Image–text pairs in JSON Lines (`{"image": ..., "text": ...}` per line) or CSV (header row).

The lowest-effort way to bring a captioning / contrastive data set: one row per pair, image paths
relative to an image root. Column names are configurable (`image_key`, `text_key`); for JSONL a
`"caption"` field is accepted when there is no `text_key` field, as many dumps use it. A bad row
(invalid JSON or CSV, a missing column or a value of the wrong type, empty text, undecodable
bytes, a path escaping the root, a missing, empty or non-regular image file) is skipped with a
counted warning naming the file and line, or raises in strict mode.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from polymodal.data.image import check_image_file, resolve_under
from polymodal.data.loading import DataError, SkipCounter, check_text, describe, iter_jsonl, short_repr, skip_bad
from polymodal.errors import UsageError


@dataclass
class PairRecord:
    """One image–text pair: resolved image path and its text."""

    image: Path
    text: str


class PairsReader:
    """Iterate `PairRecord`s from a `.jsonl` or `.csv` file (chosen by suffix).

    Args:
        path: the pairs file.
        image_root: folder image paths are relative to (default: the file's folder).
        image_key / text_key: field or column names.
        strict: raise `DataError` on the first bad row instead of skipping it.
        check_files: skip rows whose image file does not exist.

    Attributes:
        skipped: `SkipCounter` of the last iteration.
    """

    def __init__(
        self,
        path: str | Path,
        image_root: str | Path | None = None,
        image_key: str = "image",
        text_key: str = "text",
        strict: bool = False,
        check_files: bool = True,
    ):
        self.path = Path(path)
        if self.path.suffix not in (".jsonl", ".csv"):
            raise UsageError(f"PairsReader: {self.path} must end in .jsonl or .csv")
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.image_key, self.text_key = image_key, text_key
        self.strict = strict
        self.check_files = check_files
        self.skipped = SkipCounter(self.path, strict)

    def __iter__(self) -> Iterator[PairRecord]:
        self.skipped = SkipCounter(self.path, self.strict)
        rows = iter_jsonl(self.path, self.skipped) if self.path.suffix == ".jsonl" else self._csv_rows()
        yield from skip_bad(rows, self._parse, self.skipped)

    def _csv_rows(self) -> Iterator[tuple[str, dict]]:
        """("line N", row dict) pairs of the CSV file; the header names the columns.

        Undecodable bytes are kept (as lone surrogates) so that they cost only their row, through
        `check_text`; a row the csv module cannot parse (e.g. a field over its size limit) is a
        counted skip too. A missing or unusable header is an error: no row can be read without it.
        """
        try:
            handle = open(self.path, encoding="utf-8", errors="surrogateescape", newline="")
        except FileNotFoundError as err:
            raise DataError(f"{self.path}: file not found") from err
        except OSError as err:
            raise DataError(f"{self.path}: cannot read file: {err.strerror or err}") from err
        with handle:
            reader = csv.DictReader(handle)
            try:
                columns = reader.fieldnames
            except csv.Error as err:
                raise DataError(f"{self.path}: line 1: unreadable CSV header: {err}") from err
            if columns is None:
                raise DataError(f"{self.path}: empty file; expected a header row naming the columns")
            for column in (self.image_key, self.text_key):
                if column not in columns:
                    raise DataError(f"{self.path}: header {short_repr(columns)} has no column {column!r}")
            last = reader.line_num
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as err:
                    # The csv module does not advance line_num past a row it rejects.
                    self.skipped.skip(f"line {last + 1}", f"malformed CSV row: {err}")
                    last = max(reader.line_num, last + 1)
                    continue
                last = reader.line_num
                # line_num is the physical line just read, so quoted multi-line texts count right.
                yield f"line {last}", row

    def _parse(self, row: object) -> PairRecord:
        """Validate one row; raises `DataError` naming the bad field."""
        if not isinstance(row, dict):
            raise DataError(f"row is a {type(row).__name__}, expected an object")
        image = row.get(self.image_key)
        text = row.get(self.text_key, row.get("caption") if self.text_key == "text" else None)
        for name, value in ((self.image_key, image), (self.text_key, text)):
            if value is None:
                raise DataError(f"field {name!r} is missing")
        if not isinstance(image, str) or not image:
            raise DataError(f"field {self.image_key!r} must be a non-empty path string, got {describe(image)}")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"field {self.text_key!r} must be a non-empty string, got {describe(text)}")
        full = resolve_under(self.image_root, check_text(image, f"field {self.image_key!r}"))
        if self.check_files:
            check_image_file(full)
        return PairRecord(image=full, text=check_text(text, f"field {self.text_key!r}"))
