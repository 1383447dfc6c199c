"""Vectorised rasterisation of shapes-world scenes into uint8 RGB arrays.

Each shape is an inside test on coordinates (u, v) measured from the object's center in units
of its circumscribed radius (v grows downwards). A pixel belongs to an object iff its center
passes the test: hard edges, no antialiasing, so every object pixel carries exactly its named
color and the scorer can segment by color. Only the object's bounding window is evaluated, so
rendering costs O(object area), not O(image area) per object.

Backgrounds are gray so they can never be mistaken for a named color:
- plain: one gray level;
- noise: gray plus per-pixel, per-channel gaussian noise (std `strength`);
- texture: gray plus a product of two sine gratings (amplitude `strength`), a checker-like
  pattern at a scene-specific frequency and angle, in normalised coordinates so it looks the
  same at every resolution.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

from polymodal.data.world.objects import COLORS, WorldObject

MIN_IMAGE_SIZE = 16

# Shape parameters in circumscribed-radius units.
_SQUARE_HALF = 0.707
_DIAMOND_HALF_WIDTH = 0.62
_CROSS_HALF_WIDTH = 0.3
_CROSS_ARM = 0.95
_STAR_INNER = 0.45
_SQRT3 = float(np.sqrt(3.0))
_STAR_INNER_X = _STAR_INNER * float(np.cos(np.pi / 5))
_STAR_INNER_Y = _STAR_INNER * float(np.sin(np.pi / 5))

# Area of each shape at circumscribed radius 1 (used by the scorer to predict pixel areas).
UNIT_AREAS: dict[str, float] = {
    "circle": float(np.pi),
    "square": (2 * _SQUARE_HALF) ** 2,
    "triangle": 3 * _SQRT3 / 4,
    "star": 5 * _STAR_INNER * float(np.sin(np.pi / 5)),
    "cross": 2 * (2 * _CROSS_ARM) * (2 * _CROSS_HALF_WIDTH) - (2 * _CROSS_HALF_WIDTH) ** 2,
    "diamond": 2 * _DIAMOND_HALF_WIDTH,
}


def shape_inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test of an upright unit shape: u, v same-shape float arrays -> bool array.

    The shape is centered at (0, 0) with circumscribed radius 1; v points down, so the
    triangle and the star have a vertex pointing to the top of the image.
    """
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= _SQUARE_HALF) & (np.abs(v) <= _SQUARE_HALF)
    if shape == "diamond":
        return np.abs(u) / _DIAMOND_HALF_WIDTH + np.abs(v) <= 1.0
    if shape == "triangle":
        # Equilateral, vertices at radius 1: top (0, -1), bottom corners (+-sqrt3/2, 1/2).
        return (v <= 0.5) & (_SQRT3 * np.abs(u) - v <= 1.0)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= _CROSS_HALF_WIDTH) & (av <= _CROSS_ARM)) | ((av <= _CROSS_HALF_WIDTH) & (au <= _CROSS_ARM))
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


def object_window(cx: float, cy: float, radius: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel window (x0, y0, x1, y1), clipped to the image, covering a circle in pixel units."""
    x0 = max(0, int(np.floor(cx - radius - 1)))
    y0 = max(0, int(np.floor(cy - radius - 1)))
    x1 = min(width, int(np.ceil(cx + radius + 1)))
    y1 = min(height, int(np.ceil(cy + radius + 1)))
    return x0, y0, x1, y1


def shape_mask(
    shape: str, cx: float, cy: float, radius: float, rotation: float, window: tuple[int, int, int, int]
) -> np.ndarray:
    """Mask (y1-y0, x1-x0) bool of a shape with center (cx, cy) and radius in pixels.

    rotation is in degrees, counter-clockwise on screen; window is (x0, y0, x1, y1).
    """
    x0, y0, x1, y1 = window
    dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx) / radius  # (w,)
    dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy) / radius  # (h,)
    if rotation == 0.0:
        u, v = np.broadcast_arrays(dx[None, :], dy[:, None])  # (h, w)
    else:
        # Undo the rotation: rotate the pixel offsets clockwise on screen (y points down).
        t = np.deg2rad(rotation)
        c, s = np.float32(np.cos(t)), np.float32(np.sin(t))
        u = dx[None, :] * c - dy[:, None] * s
        v = dx[None, :] * s + dy[:, None] * c
    return shape_inside(shape, u, v)


def object_pixels(obj: WorldObject, size: int) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """Window (x0, y0, x1, y1) and its bool mask for `obj` rendered in a size x size image."""
    cx, cy = obj.center[0] * size, obj.center[1] * size
    radius = obj.radius * size
    window = object_window(cx, cy, radius, size, size)
    return window, shape_mask(obj.shape, cx, cy, radius, obj.rotation, window)


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
