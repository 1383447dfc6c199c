"""The exact scorer: parse an image back into shapes-world objects and grade it (GenEval-style).

Parsing, step by step (tolerances are arguments or module constants):
1. Color segmentation. Each pixel takes the nearest named color (Euclidean RGB distance) and is
   foreground only if that distance is <= `tolerance` (DEFAULT_TOLERANCE = 75). Backgrounds are
   gray and every named color is >= 99 from the gray axis, so a background pixel passes only
   if noise pushes it > 24 levels towards a color: rare, isolated pixels, dropped in step 2.
   75 is generous on purpose: object pixels survive gaussian noise up to std ~25.
2. Connected components (8-connected) of the foreground, holes filled; each component takes the
   majority color of its pixels (so edge pixels that blur or noise moved to a neighbouring
   color stay in their object). Components smaller than MIN_AREA_FRACTION (0.3) of the
   smallest object the world renders at this image size are dropped as speckle.
3. Shape and size by analysis-by-synthesis. Every (shape, size class[, rotation]) hypothesis
   whose predicted area is within a factor AREA_RATIO (2) of the component's is rasterised by
   the renderer's own `shape_raster`, placed on the component's centroid, shifted by up to one
   pixel (the renderer snaps centers to pixel centers) and compared by IoU; the best hypothesis
   wins and its IoU is reported as `fit` (1.0 on rendered ground truth). Rotations are searched
   in steps of `rotation_step` (5 degrees) within +-`max_rotation` (0 by default: the default
   world is upright).
4. The grid cell comes from the centroid.
On rendered ground truth the parse is exact: every (shape, size) pair rasterises differently
at every image size from 28 px up (tested), and objects never touch. Gaussian noise (holes,
ragged edges) and blur (shrunken, mixed edges) lower the scores gradually; see
benchmarks/bench_world.py for measured rates.

`score_image` matches expected objects to parsed ones by an assignment maximising agreement
(cell 4, shape 2, color 2, size 1) and reports per-object flags.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from polymodal.data.world.objects import (
    COLORS,
    GRID,
    SHAPES,
    SIZE_FRACTIONS,
    WorldObject,
    cell_of,
)
from polymodal.data.world.render import UNIT_AREAS, shape_raster
from polymodal.data.world.scene import Scene

DEFAULT_TOLERANCE = 75.0
MIN_AREA_FRACTION = 0.3
AREA_RATIO = 2.0
_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (K, 3)
_PALETTE_NORM = (_PALETTE**2).sum(axis=1)  # (K,)
_COLOR_NAMES = tuple(COLORS)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_SHIFTS_UPRIGHT = ((0, 0), (0, -1), (0, 1))
_SHIFTS_ROTATED = tuple((dx, dy) for dx in (0, -1, 1) for dy in (0, -1, 1))


class ParsedObject(NamedTuple):
    """An object found in an image.

    center: normalised (x, y) centroid; bbox: pixel (x0, y0, x1, y1), x1/y1 exclusive;
    area: pixels (holes filled); fit: IoU of the mask with the best-fitting rendered shape.
    """

    shape: str
    color: str
    size: str
    cell: tuple[int, int]
    center: tuple[float, float]
    bbox: tuple[int, int, int, int]
    area: int
    fit: float


def as_rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """An (H, W, 3) uint8 array from a PIL image or an (H, W, 3) uint8/float array in [0, 255]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return arr


def segment_colors(image: np.ndarray, tolerance: float = DEFAULT_TOLERANCE) -> np.ndarray:
    """Per-pixel color index (H, W) int: index into COLORS, or -1 for background."""
    pix = image.reshape(-1, 3).astype(np.float32)  # (HW, 3)
    # |x - p|^2 = |x|^2 - 2 x.p + |p|^2; float32 is exact here (every term < 2**24).
    d2 = (pix * pix).sum(axis=1, keepdims=True) - 2 * pix @ _PALETTE.T + _PALETTE_NORM  # (HW, K)
    nearest = d2.argmin(axis=1)
    nearest[d2[np.arange(len(pix)), nearest] > tolerance**2] = -1
    return nearest.reshape(image.shape[:2])


def _cell_pixels(height: int, width: int) -> float:
    """Cell width in pixels (geometric mean of the axes for non-square images)."""
    return float(np.sqrt(height * width)) / GRID


def _hypotheses(max_rotation: float, rotation_step: float) -> list[float]:
    if max_rotation <= 0:
        return [0.0]
    steps = int(np.ceil(max_rotation / rotation_step))
    return [float(a) for a in np.linspace(-steps * rotation_step, steps * rotation_step, 2 * steps + 1)]


def _overlap(template: np.ndarray, tx: int, ty: int, target: np.ndarray, mx: int, my: int) -> int:
    """Pixels set in both masks, the template's top-left at (tx, ty), the target's at (mx, my)."""
    x0, y0 = max(tx, mx), max(ty, my)
    x1 = min(tx + template.shape[1], mx + target.shape[1])
    y1 = min(ty + template.shape[0], my + target.shape[0])
    if x1 <= x0 or y1 <= y0:
        return 0
    a = template[y0 - ty : y1 - ty, x0 - tx : x1 - tx]
    b = target[y0 - my : y1 - my, x0 - mx : x1 - mx]
    return int(np.count_nonzero(a & b))


def _fit_shape(
    mask: np.ndarray, origin: tuple[int, int], cell_px: float, rotations: list[float]
) -> tuple[str, str, float]:
    """Best (shape, size, IoU) for a component mask (h, w) whose top-left pixel is origin (x, y).

    Each hypothesis's cached raster is placed so its centroid lands on the component's, then
    moved by up to one pixel (vertically for upright shapes, both ways for rotated ones) because
    the renderer snaps centers to pixel centers and a raster's centroid is off by a fraction.
    """
    ys, xs = np.nonzero(mask)
    area = len(xs)
    cx, cy = origin[0] + xs.mean(), origin[1] + ys.mean()  # pixel-index coordinates
    best = ("circle", "small", -1.0)
    for size, frac in SIZE_FRACTIONS.items():
        half = frac * cell_px / 2
        for shape in SHAPES:
            if not 1 / AREA_RATIO <= area / (UNIT_AREAS[shape] * half**2) <= AREA_RATIO:
                continue
            for rotation in rotations if shape != "circle" else (0.0,):  # a circle has no angle
                template, count, (ox, oy) = shape_raster(shape, half, rotation)
                h = template.shape[0] // 2
                ix, iy = round(cx - ox), round(cy - oy)
                shifts = _SHIFTS_ROTATED if rotation else _SHIFTS_UPRIGHT
                for dx, dy in shifts:
                    inter = _overlap(template, ix + dx - h, iy + dy - h, mask, origin[0], origin[1])
                    iou = inter / (count + area - inter)
                    if iou > best[2]:
                        best = (shape, size, iou)
    return best


def parse_image(
    image: np.ndarray | Image.Image,
    tolerance: float = DEFAULT_TOLERANCE,
    max_rotation: float = 0.0,
    rotation_step: float = 5.0,
) -> list[ParsedObject]:
    """Objects found in an RGB image (H, W, 3), in reading order (cell, then x).

    See the module docstring for the algorithm and tolerances. Components whose best shape
    hypothesis is outside every size class's area range are still reported, with the shape
    of best IoU among all hypotheses scored (at worst "circle", "small", fit -1).
    """
    arr = as_rgb_array(image)
    height, width = arr.shape[:2]
    cell_px = _cell_pixels(height, width)
    smallest = min(UNIT_AREAS.values()) * (min(SIZE_FRACTIONS.values()) * cell_px / 2) ** 2
    min_area = max(2.0, MIN_AREA_FRACTION * smallest)
    rotations = _hypotheses(max_rotation, rotation_step)
    labels = segment_colors(arr, tolerance)
    # Components of the foreground (any named color), each colored by majority vote: edge
    # pixels that blur or noise pushed to a neighbouring color stay part of their object.
    components, _ = ndimage.label(labels >= 0, structure=_EIGHT_CONNECTED)
    found = []
    for c, box in enumerate(ndimage.find_objects(components), start=1):
        inside = components[box] == c
        if np.count_nonzero(inside) < min_area:
            continue
        color = int(np.bincount(labels[box][inside], minlength=len(COLORS)).argmax())
        mask = ndimage.binary_fill_holes(inside)
        area = int(np.count_nonzero(mask))
        origin = (box[1].start, box[0].start)
        shape, size, fit = _fit_shape(mask, origin, cell_px, rotations)
        ys, xs = np.nonzero(mask)
        cx, cy = (origin[0] + xs.mean() + 0.5) / width, (origin[1] + ys.mean() + 0.5) / height
        bbox = (origin[0], origin[1], box[1].stop, box[0].stop)
        found.append(
            ParsedObject(shape, _COLOR_NAMES[color], size, cell_of(cx, cy), (float(cx), float(cy)), bbox, area, fit)
        )
    found.sort(key=lambda o: (o.cell, o.center[0]))
    return found


def _agreement(e: WorldObject, p: ParsedObject) -> int:
    return 4 * (tuple(e.cell) == p.cell) + 2 * (e.shape == p.shape) + 2 * (e.color == p.color) + (e.size == p.size)


def score_image(
    image: np.ndarray | Image.Image,
    expected: Scene | Sequence[WorldObject],
    tolerance: float = DEFAULT_TOLERANCE,
    max_rotation: float | None = None,
) -> dict:
    """Grade an image against the objects it should show.

    max_rotation None searches the rotations the expected objects use (0 for upright scenes).
    Returns {"all_correct": bool, "count_correct": bool, "num_expected", "num_parsed",
    "presence"/"color"/"shape"/"size"/"position": fraction of expected objects correct,
    "objects": per expected object {"expected": WorldObject.to_dict()} and flags "present" (an object of that color
    and shape anywhere), "matched", "color", "shape", "size", "position", "correct",
    "parsed": the parsed objects as dicts}.
    """
    objs = tuple(expected.objects if isinstance(expected, Scene) else expected)
    if max_rotation is None:
        max_rotation = max((abs(o.rotation) for o in objs), default=0.0)
    parsed = parse_image(image, tolerance, max_rotation)
    assigned: dict[int, ParsedObject] = {}
    if objs and parsed:
        gain = np.array([[_agreement(e, p) for p in parsed] for e in objs])  # (N, M)
        rows, cols = linear_sum_assignment(-gain)
        assigned = {int(r): parsed[int(c)] for r, c in zip(rows, cols)}
    kinds = {(p.color, p.shape) for p in parsed}
    reports = []
    for i, e in enumerate(objs):
        p = assigned.get(i)
        flags = {
            "present": (e.color, e.shape) in kinds,
            "matched": p is not None,
            "color": p is not None and p.color == e.color,
            "shape": p is not None and p.shape == e.shape,
            "size": p is not None and p.size == e.size,
            "position": p is not None and p.cell == tuple(e.cell),
        }
        flags["correct"] = flags["color"] and flags["shape"] and flags["size"] and flags["position"]
        reports.append({"expected": e.to_dict(), **flags})
    count_correct = len(parsed) == len(objs)

    def rate(key: str) -> float:
        return float(np.mean([r[key] for r in reports])) if reports else float(count_correct)

    return {
        "all_correct": count_correct and all(r["correct"] for r in reports),
        "count_correct": count_correct,
        "num_expected": len(objs),
        "num_parsed": len(parsed),
        "presence": rate("present"),
        **{key: rate(key) for key in ("color", "shape", "size", "position")},
        "objects": reports,
        "parsed": [p._asdict() for p in parsed],
    }
