"""COCO captions: `{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}`.

The layout of `captions_train2017.json` and of most captioning sets that copied it. The reader
yields one `CocoRecord` per image with all its captions (for evaluation, where every reference
caption counts), or with `per_caption=True` one `CaptionPair` per caption (for training, where
each caption is a separate sample).

Bad entries (an image without id/file name, a duplicate id, an annotation pointing at an
unknown image or with an empty caption, an image with no caption, a file name escaping the
image root or missing) are skipped with a counted warning naming the file and entry.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from polymodal.data.image import resolve_under
from polymodal.data.loading import DataError, SkipCounter, read_json


@dataclass
class CocoRecord:
    """One COCO image: its id, resolved path and captions in file order."""

    image_id: int | str
    image: Path
    captions: list[str] = field(default_factory=list)


@dataclass
class CaptionPair:
    """One (image, caption) training pair; `image_id` links back to the COCO image."""

    image_id: int | str
    image: Path
    caption: str


class CocoCaptionsReader:
    """Iterate `CocoRecord`s (or `CaptionPair`s with `per_caption=True`) of a COCO captions file.

    Args:
        path: the captions JSON file.
        image_root: folder the `file_name`s are relative to (default: the file's folder).
        per_caption: yield one `CaptionPair` per caption instead of one record per image.
        strict: raise `DataError` on the first bad entry instead of skipping it.
        check_files: skip images whose file does not exist.

    Attributes:
        skipped: `SkipCounter` of the last iteration.
    """

    def __init__(
        self,
        path: str | Path,
        image_root: str | Path | None = None,
        per_caption: bool = False,
        strict: bool = False,
        check_files: bool = True,
    ):
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.per_caption = per_caption
        self.strict = strict
        self.check_files = check_files
        self.skipped = SkipCounter(self.path, strict)

    def __iter__(self) -> Iterator[CocoRecord | CaptionPair]:
        self.skipped = counter = SkipCounter(self.path, self.strict)
        data = _load(self.path)
        images: dict[int | str, Path] = {}
        for i, entry in enumerate(data["images"]):
            try:
                image_id, path = self._parse_image(entry)
                if image_id in images:
                    raise DataError(f"duplicate image id {image_id!r}")
            except DataError as err:
                counter.skip(f"images[{i}]", err)
                continue
            images[image_id] = path
        captions: dict[int | str, list[str]] = {image_id: [] for image_id in images}
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or "image_id" not in ann:
                counter.skip(f"annotations[{i}]", "not an object with an 'image_id'")
            elif ann["image_id"] not in captions:
                counter.skip(f"annotations[{i}]", f"image_id {ann['image_id']!r} is not a (valid) image")
            elif not isinstance(ann.get("caption"), str) or not ann["caption"].strip():
                counter.skip(f"annotations[{i}]", "'caption' must be a non-empty string")
            else:
                captions[ann["image_id"]].append(ann["caption"])
        for image_id, path in images.items():
            if not captions[image_id]:
                counter.skip(f"image id {image_id!r}", "has no caption")
            elif self.per_caption:
                for caption in captions[image_id]:
                    yield CaptionPair(image_id=image_id, image=path, caption=caption)
            else:
                yield CocoRecord(image_id=image_id, image=path, captions=captions[image_id])

    def _parse_image(self, entry: object) -> tuple[int | str, Path]:
        """Validate one `images[]` entry; returns (id, resolved path)."""
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), (int, str)):
            raise DataError("not an object with an int or string 'id'")
        name = entry.get("file_name")
        if not isinstance(name, str) or not name:
            raise DataError("'file_name' must be a non-empty string")
        path = resolve_under(self.image_root, name)
        if self.check_files and not path.is_file():
            raise DataError(f"image file {path} not found")
        return entry["id"], path


def _load(path: Path) -> dict:
    """Read and shape-check the top level of a COCO captions file."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level must be an object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: field {key!r} must be a list")
    return data
