"""Image folders, one subfolder per class: `root/<class name>/<image file>`.

The layout of ImageNet-style classification sets and the simplest way to bring labeled images.
Classes are the subfolder names in sorted order (class index = position), so the mapping is the
same on every machine. A `classes.txt` in the root (one name per line, in label order) fixes
the classes instead, so a class with no images yet keeps its index without an empty folder
(`polymodal world export --format folder` writes one); a folder it does not list is an error.
Hidden files are ignored; other files that are not images by extension,
images that are symlinks pointing outside the root (or in a loop), entries named like images
that are directories or empty files, and class folders that cannot be listed are skipped with
a counted warning naming the class folder and file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from polymodal.data.image import check_image_file, resolve_under
from polymodal.data.loading import DataError, SkipCounter, short_repr

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CLASS_LIST = "classes.txt"


@dataclass
class FolderRecord:
    """One labeled image: resolved path, class index and class name."""

    image: Path
    label: int
    class_name: str


class ImageFolderReader:
    """Iterate `FolderRecord`s of a one-folder-per-class tree, classes sorted, files sorted.

    Args:
        root: the folder holding one subfolder per class (and optionally `classes.txt`).
        strict: raise `DataError` on the first bad file instead of skipping it.

    Attributes:
        classes: class names; `classes[label]` is the name of class `label`.
        skipped: `SkipCounter` of the last iteration.
    """

    def __init__(self, root: str | Path, strict: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: image folder root does not exist or is not a folder")
        try:
            entries = list(self.root.iterdir())
        except OSError as err:
            raise DataError(f"{self.root}: cannot list the image folder root: {err.strerror or err}") from err
        folders = sorted(p.name for p in entries if p.is_dir() and not p.name.startswith("."))
        self.classes = _declared_classes(self.root / CLASS_LIST, folders)
        if not self.classes:
            raise DataError(f"{self.root}: no class subfolders")
        self.strict = strict
        self.skipped = SkipCounter(self.root, strict)

    def __iter__(self) -> Iterator[FolderRecord]:
        self.skipped = SkipCounter(self.root, self.strict)
        for label, name in enumerate(self.classes):
            for path in self._list(name):
                if path.name.startswith("."):
                    continue
                where = f"{name}/{path.name}"
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    self.skipped.skip(where, f"not an image file extension ({'/'.join(IMAGE_SUFFIXES)})")
                    continue
                try:
                    full = check_image_file(resolve_under(self.root, Path(name) / path.name))
                except DataError as err:
                    self.skipped.skip(where, err)
                    continue
                yield FolderRecord(image=full, label=label, class_name=name)

    def _list(self, name: str) -> list[Path]:
        """The entries of class folder `name`, sorted; an unlistable folder is a counted skip."""
        try:
            return sorted((self.root / name).iterdir())
        except FileNotFoundError:
            return []  # a class declared in classes.txt that has no images
        except OSError as err:
            self.skipped.skip(f"{name}/", f"cannot list the class folder: {err.strerror or err}")
            return []


def _declared_classes(path: Path, folders: list[str]) -> list[str]:
    """The classes in label order: `path`'s lines if it exists, else the sorted `folders`.

    Raises:
        DataError: naming `path` and the line, for an unreadable file, a name that is not a
            plain folder name, a duplicate, or a class folder the file does not list.
    """
    if not path.is_file():
        return folders
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the class list: {err}") from err
    classes: list[str] = []
    for lineno, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            continue
        if "/" in name or "\\" in name or name.startswith(".") or name in classes:
            reason = "a duplicate" if name in classes else "not a plain folder name"
            raise DataError(f"{path}: line {lineno}: class {short_repr(name)} is {reason}")
        classes.append(name)
    unlisted = [f for f in folders if f not in classes]
    if unlisted:
        raise DataError(f"{path}: class folder(s) {short_repr(unlisted)} are not listed; add them or move them away")
    return classes
