"""Random draws shared by scenes and clips: seeds, attributes, centers, backgrounds.

Splits by seed range. Scene (or clip) `i` of split `s` has the global seed
`SPLIT_OFFSETS[s] + i`, and every random draw of it comes from
`numpy.random.default_rng([world_seed, stream, global_seed])`. Indices are capped at
`SPLIT_STRIDE`, so the four splits own disjoint seed ranges.

Compositional hold-out. train/val/test never draw a color+shape pair from `HELD_OUT_PAIRS`;
compositional scenes draw one held-out pair for one object (the others from all pairs).
"""
from __future__ import annotations

import numpy as np

from polymodal.data.world.objects import (
    BACKGROUNDS,
    CELL_MARGIN,
    COLORS,
    GRID,
    HELD_OUT_PAIRS,
    SHAPES,
    SIZE_FRACTIONS,
    SIZES,
    SPLITS,
    is_held_out,
)
from polymodal.data.world.render import rotated_half_extent

SPLIT_STRIDE = 1 << 40
SPLIT_OFFSETS: dict[str, int] = {name: k * SPLIT_STRIDE for k, name in enumerate(SPLITS)}
MAX_ROTATION = 45.0
ROTATION_STEPS = 20  # resolution of the rotation cap in fit_rotation

# Independent random streams of one world: scenes and clips with the same index differ.
STREAM_SCENE = 0
STREAM_CLIP = 1

_COLOR_NAMES = tuple(COLORS)
# Colors allowed per shape outside the compositional split.
_SEEN_COLORS: dict[str, tuple[str, ...]] = {
    shape: tuple(c for c in _COLOR_NAMES if not is_held_out(c, shape)) for shape in SHAPES
}


def scene_rng(world_seed: int, stream: int, global_seed: int) -> np.random.Generator:
    """The random generator of one scene or clip."""
    return np.random.default_rng([world_seed, stream, global_seed])


def sample_attributes(rng: np.random.Generator, held_out: bool, compositional: bool) -> tuple[str, str, str]:
    """Draw (shape, color, size). held_out forces a held-out pair; compositional allows all pairs."""
    if held_out:
        color, shape = HELD_OUT_PAIRS[int(rng.integers(len(HELD_OUT_PAIRS)))]
    else:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colors = _COLOR_NAMES if compositional else _SEEN_COLORS[shape]
        color = colors[int(rng.integers(len(colors)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    return shape, color, size


def fit_rotation(shape: str, size: str, rotation: float) -> float:
    """`rotation` shrunk towards 0 until the rotated shape fits its cell inside CELL_MARGIN."""
    room = 0.5 - CELL_MARGIN
    half = SIZE_FRACTIONS[size] / 2
    for k in range(ROTATION_STEPS, -1, -1):
        angle = rotation * k / ROTATION_STEPS
        if half * rotated_half_extent(shape, angle) <= room:
            return float(angle)
    return 0.0


def center_in_cell(
    rng: np.random.Generator, cell: tuple[int, int], shape: str, size: str, rotation: float
) -> tuple[float, float]:
    """A random normalised center keeping the rotated object CELL_MARGIN inside its cell."""
    width = 1.0 / GRID
    extent = SIZE_FRACTIONS[size] / 2 * rotated_half_extent(shape, rotation)
    slack = width * max(0.0, 0.5 - CELL_MARGIN - extent)
    row, col = cell
    x = (col + 0.5) * width + rng.uniform(-slack, slack)
    y = (row + 0.5) * width + rng.uniform(-slack, slack)
    return (float(x), float(y))


def sample_background(rng: np.random.Generator, background: str) -> dict:
    """Background fields of a Scene; `background` may be "mixed" (uniform over the kinds)."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))] if background == "mixed" else background
    # Mostly light backgrounds, some dark ones; always gray (see render.py).
    gray = int(rng.integers(180, 246)) if rng.random() < 0.7 else int(rng.integers(15, 71))
    return {
        "background": kind,
        "bg_color": (gray, gray, gray),
        "bg_seed": int(rng.integers(2**31)),
        "bg_strength": float(rng.uniform(4.0, 12.0) if kind == "noise" else rng.uniform(15.0, 40.0)),
        "bg_frequency": float(rng.uniform(2.0, 6.0)),
        "bg_angle": float(rng.uniform(0.0, np.pi)),
    }
