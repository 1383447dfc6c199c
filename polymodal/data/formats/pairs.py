"""Image–text pairs in JSON Lines (`{"image": ..., "text": ...}` per line) or CSV (header row).

The lowest-effort way to bring a captioning / contrastive data set: one row per pair, image paths
relative to an image root. Column names are configurable (`image_key`, `text_key`); for JSONL a
`"caption"` field is accepted when there is no `text_key` field, as many dumps use it. A bad row
(invalid JSON, missing column, empty text, path escaping the root, missing image) is skipped
with a counted warning naming the file and line, or raises in strict mode.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from polymodal.data.image import resolve_under
from polymodal.data.loading import DataError, SkipCounter, iter_jsonl, skip_bad


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
            raise ValueError(f"PairsReader: {self.path} must end in .jsonl or .csv")
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
        """("line N", row dict) pairs of the CSV file; the header names the columns."""
        if not self.path.is_file():
            raise DataError(f"{self.path}: file not found")
        with open(self.path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            for column in (self.image_key, self.text_key):
                if reader.fieldnames is None or column not in reader.fieldnames:
                    raise DataError(f"{self.path}: header {reader.fieldnames} has no column {column!r}")
            for row in reader:
                # line_num is the physical line just read, so quoted multi-line texts count right.
                yield f"line {reader.line_num}", row

    def _parse(self, row: object) -> PairRecord:
        """Validate one row; raises `DataError` naming the bad field."""
        if not isinstance(row, dict):
            raise DataError(f"row is a {type(row).__name__}, expected an object")
        image = row.get(self.image_key)
        text = row.get(self.text_key, row.get("caption") if self.text_key == "text" else None)
        if not isinstance(image, str) or not image:
            raise DataError(f"field {self.image_key!r} must be a non-empty path string")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"field {self.text_key!r} must be a non-empty string")
        full = resolve_under(self.image_root, image)
        if self.check_files and not full.is_file():
            raise DataError(f"image file {full} not found")
        return PairRecord(image=full, text=text)
