"""COCO captions: `{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}`.

The layout of `captions_train2017.json` and of most captioning sets that copied it. The reader
yields one `CocoRecord` per image with all its captions (for evaluation, where every reference
caption counts), or with `per_caption=True` one `CaptionPair` per caption (for training, where
each caption is a separate sample).

Bad entries (an image without id/file name, a duplicate id, an annotation pointing at an
unknown image or with an empty caption, an image with no caption, a file name escaping the
image root or missing, a value of the wrong type in any field) are skipped with a counted
warning naming the file and entry. A file whose top level is not an object with list-valued
"images" and "annotations" is an error, not a skip: nothing in it can be trusted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from polymodal.data.image import check_image_file, resolve_under
from polymodal.data.loading import DataError, SkipCounter, check_text, describe, read_json, short_repr


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
                    raise DataError(f"duplicate image id {short_repr(image_id)}")
            except DataError as err:
                counter.skip(f"images[{i}]", err)
                continue
            images[image_id] = path
        captions: dict[int | str, list[str]] = {image_id: [] for image_id in images}
        for i, ann in enumerate(data["annotations"]):
            try:
                image_id, caption = _parse_annotation(ann, captions)
            except DataError as err:
                counter.skip(f"annotations[{i}]", err)
                continue
            captions[image_id].append(caption)
        for image_id, path in images.items():
            if not captions[image_id]:
                counter.skip(f"image id {short_repr(image_id)}", "has no caption")
            elif self.per_caption:
                for caption in captions[image_id]:
                    yield CaptionPair(image_id=image_id, image=path, caption=caption)
            else:
                yield CocoRecord(image_id=image_id, image=path, captions=captions[image_id])

    def _parse_image(self, entry: object) -> tuple[int | str, Path]:
        """Validate one `images[]` entry; returns (id, resolved path)."""
        if not isinstance(entry, dict) or not _is_id(entry.get("id")):
            raise DataError(f"not an object with an int or string 'id': {describe(entry)}")
        if isinstance(entry["id"], str):
            check_text(entry["id"], "'id'")
        name = entry.get("file_name")
        if not isinstance(name, str) or not name:
            raise DataError(f"'file_name' must be a non-empty string, got {describe(name)}")
        path = resolve_under(self.image_root, check_text(name, "'file_name'"))
        if self.check_files:
            check_image_file(path)
        return entry["id"], path


def _is_id(value: object) -> bool:
    """COCO ids are ints or strings; bools are ints to Python but `True` would alias id 1."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _parse_annotation(ann: object, captions: dict) -> tuple[int | str, str]:
    """Validate one `annotations[]` entry against the valid image ids; returns (image id, caption)."""
    if not isinstance(ann, dict) or "image_id" not in ann:
        raise DataError(f"not an object with an 'image_id': {describe(ann)}")
    image_id = ann["image_id"]
    # Checked before the lookup: a list or dict image_id is unhashable and would crash it.
    if not _is_id(image_id) or image_id not in captions:
        raise DataError(f"image_id {short_repr(image_id)} is not a (valid) image")
    caption = ann.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise DataError(f"'caption' must be a non-empty string, got {describe(caption)}")
    return image_id, check_text(caption, "'caption'")


def _load(path: Path) -> dict:
    """Read and shape-check the top level of a COCO captions file."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level must be an object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: field {key!r} must be a list")
    return data
