"""Rasterisation of shapes-world scenes into uint8 RGB arrays.

Each shape is an inside test on coordinates (u, v) measured from the object's center in units
of its half-size (v grows downwards), evaluated with numpy on a whole pixel grid at once. A
pixel belongs to an object iff its center passes the test: hard edges, no antialiasing, so
every object pixel carries exactly its named color and the scorer can segment by color.

Object centers are snapped to pixel centers (towards the center of the object's cell, so an
object never moves closer to its cell border). A shape's raster then depends only on (shape,
size in pixels, rotation), never on sub-pixel phase: rasters are computed once and cached, and
the scorer can re-render exactly the hypotheses it compares against.

Backgrounds are gray so they can never be mistaken for a named color:
- plain: one gray level;
- noise: gray plus per-pixel, per-channel gaussian noise (std `strength`);
- texture: gray plus a product of two sine gratings (amplitude `strength`), a checker-like
  pattern at a scene-specific frequency and angle, in normalised coordinates so it looks the
  same at every resolution.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from polymodal.data.world.objects import COLORS, GRID, WorldObject

MIN_IMAGE_SIZE = 16

# Shape parameters in half-size units: every shape fits the box [-1, 1]^2 around its center.
# The circle stays slightly inside its box so that at no size does it rasterise as the square.
_CIRCLE_RADIUS = 0.96
_DIAMOND_HALF_WIDTH = 0.7
_CROSS_HALF_WIDTH = 0.32
_STAR_INNER = 0.45
_STAR_INNER_X = _STAR_INNER * float(np.cos(np.pi / 5))
_STAR_INNER_Y = _STAR_INNER * float(np.sin(np.pi / 5))

# Area of each shape at half-size 1 (the scorer predicts pixel areas from these).
UNIT_AREAS: dict[str, float] = {
    "circle": float(np.pi) * _CIRCLE_RADIUS**2,
    "square": 4.0,
    "triangle": 2.0,
    "star": 5 * _STAR_INNER * float(np.sin(np.pi / 5)),
    "cross": 2 * 2 * (2 * _CROSS_HALF_WIDTH) - (2 * _CROSS_HALF_WIDTH) ** 2,
    "diamond": 2 * _DIAMOND_HALF_WIDTH,
}

# Outline vertices (u, v) at half-size 1, for the extent of a rotated shape (circle: radius 1).
_STAR_ANGLES = np.pi / 2 + 2 * np.pi * np.arange(5) / 5
_W = _CROSS_HALF_WIDTH
VERTICES: dict[str, np.ndarray] = {
    "square": np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=float),
    "diamond": np.array([(0, -1), (_DIAMOND_HALF_WIDTH, 0), (0, 1), (-_DIAMOND_HALF_WIDTH, 0)], dtype=float),
    "triangle": np.array([(0, -1), (1, 1), (-1, 1)], dtype=float),
    "cross": np.array([(x, y) for a, b in ((1, _W), (_W, 1)) for x in (-a, a) for y in (-b, b)], dtype=float),
    "star": np.stack([np.cos(_STAR_ANGLES), -np.sin(_STAR_ANGLES)], axis=1),
}


def rotated_half_extent(shape: str, rotation: float) -> float:
    """Half-size of the axis-aligned box of a shape of half-size 1 rotated by `rotation` degrees."""
    if shape == "circle":
        return _CIRCLE_RADIUS
    t = np.deg2rad(rotation)
    c, s = np.cos(t), np.sin(t)
    verts = VERTICES[shape]
    u = verts[:, 0] * c + verts[:, 1] * s  # screen rotation, y down (see shape_mask)
    v = -verts[:, 0] * s + verts[:, 1] * c
    return float(max(np.abs(u).max(), np.abs(v).max()))


def shape_inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test of an upright shape of half-size 1: u, v same-shape float arrays -> bool.

    v points down, so the triangle and the star have a vertex pointing to the top of the image.
    All shapes are symmetric left-right; circle, square, diamond and cross also top-bottom.
    """
    if shape == "circle":
        return u * u + v * v <= _CIRCLE_RADIUS**2
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "diamond":
        return np.abs(u) / _DIAMOND_HALF_WIDTH + np.abs(v) <= 1.0
    if shape == "triangle":
        # Isosceles, filling the box: apex (0, -1), base corners (+-1, 1).
        return (v <= 1.0) & (2 * np.abs(u) <= v + 1.0)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= _CROSS_HALF_WIDTH) & (av <= 1.0)) | ((av <= _CROSS_HALF_WIDTH) & (au <= 1.0))
    if shape == "star":
        # Fold the angle into one 36-degree half-sector (0 = outer point, 36 = inner corner),
        # then test against the edge from the outer point O=(1, 0) to the inner corner I.
        rho = np.sqrt(u * u + v * v)
        phi = np.arctan2(-v, u) - np.pi / 2
        sector = np.mod(phi, 2 * np.pi / 5)
        fold = np.pi / 5 - np.abs(sector - np.pi / 5)
        px, py = rho * np.cos(fold), rho * np.sin(fold)
        return (_STAR_INNER_X - 1.0) * py - _STAR_INNER_Y * (px - 1.0) >= 0.0
    raise ValueError(f"shape_inside: unknown shape {shape!r}")


@lru_cache(maxsize=8192)
def shape_raster(shape: str, half_size: float, rotation: float) -> tuple[np.ndarray, int, tuple[float, float]]:
    """The raster of a shape centered on the center of the middle pixel.

    half_size: pixels; rotation: degrees counter-clockwise on screen.
    Returns (mask (2h+1, 2h+1) bool, pixel count, centroid offset (dx, dy) in pixels from the
    middle pixel). Rasters are cached: a shape looks the same wherever it is drawn.
    """
    h = int(np.ceil(half_size * 1.5)) + 1  # 1.5 > sqrt(2): room for any rotation
    offsets = np.arange(-h, h + 1, dtype=np.float32) / np.float32(half_size)  # (2h+1,)
    dx, dy = offsets[None, :], offsets[:, None]
    if rotation == 0.0:
        u, v = np.broadcast_arrays(dx, dy)
    else:
        # Undo the rotation: rotate pixel offsets clockwise on screen (y points down).
        t = np.deg2rad(rotation)
        c, s = np.float32(np.cos(t)), np.float32(np.sin(t))
        u, v = dx * c - dy * s, dx * s + dy * c
    mask = shape_inside(shape, u, v)
    mask.setflags(write=False)
    ys, xs = np.nonzero(mask)
    return mask, len(xs), (float(xs.mean() - h), float(ys.mean() - h))


def snap(x: float, toward: float) -> int:
    """Index of the pixel whose center is nearest to x (pixels) in the direction of `toward`.

    Snapping to pixel centers makes a raster independent of sub-pixel phase; snapping towards
    the cell center never moves an object closer to its cell border.
    """
    return int(np.floor(x - 0.5)) if x >= toward else int(np.ceil(x - 0.5))


def object_pixels(obj: WorldObject, size: int) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """Window (x0, y0, x1, y1), clipped to the image, and its bool mask for `obj` in a size x size image."""
    cell = size / GRID
    row, col = obj.cell
    ix = snap(obj.center[0] * size, (col + 0.5) * cell)
    iy = snap(obj.center[1] * size, (row + 0.5) * cell)
    raster = shape_raster(obj.shape, obj.half_size * size, float(obj.rotation))[0]
    h = raster.shape[0] // 2
    x0, y0, x1, y1 = max(0, ix - h), max(0, iy - h), min(size, ix + h + 1), min(size, iy + h + 1)
    return (x0, y0, x1, y1), raster[y0 - (iy - h) : y1 - (iy - h), x0 - (ix - h) : x1 - (ix - h)]


@lru_cache(maxsize=16)
def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised pixel-center coordinates (1, size) and (size, 1) for a size x size image."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    return coords[None, :], coords[:, None]


def render_background(
    size: int, kind: str, gray: int, seed: int, strength: float, frequency: float, angle: float
) -> np.ndarray:
    """Background image (size, size, 3) uint8 of the given kind (plain/noise/texture)."""
    if kind == "plain":
        return np.full((size, size, 3), gray, dtype=np.uint8)
    if kind == "noise":
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal((size, size, 3), dtype=np.float32)
        return np.clip(noise * strength + gray, 0, 255).astype(np.uint8)
    if kind == "texture":
        x, y = _unit_grid(size)
        c, s = np.cos(angle), np.sin(angle)
        a = np.sin(2 * np.pi * frequency * (x * c + y * s))  # broadcasts to (size, size)
        b = np.sin(2 * np.pi * frequency * (y * c - x * s))
        plane = np.clip(gray + strength * a * b, 0, 255).astype(np.uint8)  # (size, size)
        return np.repeat(plane[:, :, None], 3, axis=2)
    raise ValueError(f"render_background: unknown background kind {kind!r}")


def paint_objects(image: np.ndarray, objects: Sequence[WorldObject]) -> np.ndarray:
    """Paint objects in place onto a square (S, S, 3) uint8 image and return it."""
    size = image.shape[0]
    for obj in objects:
        (x0, y0, x1, y1), mask = object_pixels(obj, size)
        image[y0:y1, x0:x1][mask] = COLORS[obj.color]
    return image


def render_masks(objects: Sequence[WorldObject], size: int) -> np.ndarray:
    """Per-object masks (N, size, size) bool, exactly the pixels `paint_objects` colors."""
    masks = np.zeros((len(objects), size, size), dtype=bool)
    for k, obj in enumerate(objects):
        (x0, y0, x1, y1), mask = object_pixels(obj, size)
        masks[k, y0:y1, x0:x1] = mask
    return masks


def check_size(size: int) -> int:
    """Validate a render size (int >= MIN_IMAGE_SIZE) and return it."""
    if not isinstance(size, (int, np.integer)) or size < MIN_IMAGE_SIZE:
        raise ValueError(f"image size must be an int >= {MIN_IMAGE_SIZE}, got {size!r}")
    return int(size)
