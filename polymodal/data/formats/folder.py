"""Image folders, one subfolder per class: `root/<class name>/<image file>`.

The layout of ImageNet-style classification sets and the simplest way to bring labeled images.
Classes are the subfolder names in sorted order (class index = position), so the mapping is the
same on every machine. Hidden files are ignored; other files that are not images by extension,
and images that are symlinks pointing outside the root, are skipped with a counted warning.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from polymodal.data.image import resolve_under
from polymodal.data.loading import DataError, SkipCounter

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class FolderRecord:
    """One labeled image: resolved path, class index and class name."""

    image: Path
    label: int
    class_name: str


class ImageFolderReader:
    """Iterate `FolderRecord`s of a one-folder-per-class tree, classes sorted, files sorted.

    Args:
        root: the folder holding one subfolder per class.
        strict: raise `DataError` on the first bad file instead of skipping it.

    Attributes:
        classes: class names; `classes[label]` is the name of class `label`.
        skipped: `SkipCounter` of the last iteration.
    """

    def __init__(self, root: str | Path, strict: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: image folder root does not exist or is not a folder")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise DataError(f"{self.root}: no class subfolders")
        self.strict = strict
        self.skipped = SkipCounter(self.root, strict)

    def __iter__(self) -> Iterator[FolderRecord]:
        self.skipped = SkipCounter(self.root, self.strict)
        for label, name in enumerate(self.classes):
            for path in sorted((self.root / name).iterdir()):
                if path.name.startswith("."):
                    continue
                where = f"{name}/{path.name}"
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    self.skipped.skip(where, f"not an image file extension ({'/'.join(IMAGE_SUFFIXES)})")
                    continue
                try:
                    full = resolve_under(self.root, Path(name) / path.name)
                except DataError as err:
                    self.skipped.skip(where, err)
                    continue
                yield FolderRecord(image=full, label=label, class_name=name)
