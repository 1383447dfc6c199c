"""Boxes as text (the Qwen-VL convention, arXiv:2308.12966) and box overlap.

A box is written into questions and answers as

    <box>(x1,y1),(x2,y2)</box>

where (x1, y1) is the box's first (top-left) pixel and (x2, y2) its last (bottom-right) pixel,
each coordinate normalised to an integer in [0, 999]: n = floor(1000 * p / size) for pixel index p
of an image `size` pixels along that axis. A phrase the box belongs to may precede it as
`<ref>phrase</ref>`. The normalisation makes the text independent of the image resolution; for
images of up to 1000 pixels a side, text -> pixels inverts it exactly (p = ceil(n * size / 1000):
n <= 1000 p / size < n + 1 puts p in [n size / 1000, n size / 1000 + 1), which holds one integer).

Pixel boxes everywhere else in the library are (x0, y0, x1, y1) with exclusive x1 / y1 (as
`Scene.boxes` and the scorer's `ParsedObject.bbox`); the functions here take and return those.
The markers are plain text: a tokenizer without them as special tokens spells them out.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

from polymodal.errors import DataError

BOX_START, BOX_END = "<box>", "</box>"
REF_START, REF_END = "<ref>", "</ref>"
BOX_SCALE = 1000  # normalised coordinates are integers in [0, BOX_SCALE)

PixelBox = tuple[int, int, int, int]

_BOX = re.compile(r"<box>\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*</box>")
_REF_BOX = re.compile(r"<ref>(.*?)</ref>\s*" + _BOX.pattern)


def _normalise(pixel: int, size: int) -> int:
    return min(BOX_SCALE - 1, max(0, (BOX_SCALE * pixel) // size))


def _pixel(value: int, size: int) -> int:
    return min(size - 1, max(0, math.ceil(value * size / BOX_SCALE)))


def _check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise DataError(f"boxes: image width and height must be >= 1, got {width} x {height}")


def box_to_text(box: Sequence[int], width: int, height: int) -> str:
    """A pixel box (x0, y0, x1, y1), x1/y1 exclusive, on a width x height image -> "<box>(x1,y1),(x2,y2)</box>"."""
    _check_size(width, height)
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise DataError(f"box_to_text: box {tuple(box)} is empty or outside a {width} x {height} image")
    corners = (_normalise(x0, width), _normalise(y0, height), _normalise(x1 - 1, width), _normalise(y1 - 1, height))
    return f"{BOX_START}({corners[0]},{corners[1]}),({corners[2]},{corners[3]}){BOX_END}"


def _to_pixels(match: re.Match, offset: int, width: int, height: int) -> PixelBox:
    n = [int(match.group(offset + i)) for i in range(4)]
    # A corner past the scale is read as the last coordinate; a reversed box is put in order.
    x_a, x_b = sorted((_pixel(min(n[0], BOX_SCALE - 1), width), _pixel(min(n[2], BOX_SCALE - 1), width)))
    y_a, y_b = sorted((_pixel(min(n[1], BOX_SCALE - 1), height), _pixel(min(n[3], BOX_SCALE - 1), height)))
    return (x_a, y_a, x_b + 1, y_b + 1)


def boxes_in_text(text: str, width: int, height: int) -> list[PixelBox]:
    """Every `<box>` of `text`, in order, as pixel boxes (x0, y0, x1, y1), x1/y1 exclusive, on a
    width x height image. Malformed boxes are skipped (a model's reply may be cut off)."""
    _check_size(width, height)
    return [_to_pixels(m, 1, width, height) for m in _BOX.finditer(text)]


def refs_in_text(text: str, width: int, height: int) -> list[tuple[str, PixelBox]]:
    """Every `<ref>phrase</ref><box>...</box>` pair of `text`, in order: (phrase stripped, pixel box)."""
    _check_size(width, height)
    return [(m.group(1).strip(), _to_pixels(m, 2, width, height)) for m in _REF_BOX.finditer(text)]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1) with exclusive x1/y1 (areas in pixels);
    0.0 when they do not overlap or both are empty."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area - inter
    return inter / union if union > 0 else 0.0
