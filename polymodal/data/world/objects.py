"""Vocabulary and geometry of the shapes world: colors, shapes, sizes, grid cells, objects.

Everything here is plain data shared by the sampler, the renderer, the text generator and the
scorer, so that an attribute has exactly one spelling and one numeric meaning.

Geometry. Positions are normalised: x grows to the right, y grows downwards, both in [0, 1].
The image is split into a 3x3 grid; `cell = (row, col)` with row 0 at the top. Every upright
shape fills the box [-1, 1]^2 around its center in units of its half-size; a size class fixes
the box width as a fraction of the cell width (`SIZE_FRACTIONS`). Objects (rotated ones
included) keep `CELL_MARGIN` away from their cell's border, so objects in different cells never
touch. The size fractions are 0.19 of a cell apart, so at 32 px and above the half-sizes of two
classes differ by more than one pixel and every size class rasterises differently.
"""
from __future__ import annotations

from dataclasses import dataclass

# Named colors, chosen far apart in RGB (closest pair: yellow/orange at distance 81) and far
# from the gray axis (closest: purple at distance 99), because every background is gray.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 40),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 30),
    "orange": (245, 130, 20),
    "purple": (130, 50, 190),
    "cyan": (30, 200, 210),
    "magenta": (220, 50, 200),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")

SIZES: tuple[str, ...] = ("small", "medium", "large")

# Width of an object's (unrotated) box as a fraction of the cell width.
SIZE_FRACTIONS: dict[str, float] = {"small": 0.5, "medium": 0.69, "large": 0.88}

# Gap kept between an object's (rotated) box and its cell border, as a fraction of the cell
# width. Two objects in neighbouring cells are then >= 2 * CELL_MARGIN * cell apart, which
# is more than one pixel from 32 px images up, so they never become one connected component.
CELL_MARGIN = 0.06

BACKGROUNDS: tuple[str, ...] = ("plain", "noise", "texture")

SPLITS: tuple[str, ...] = ("train", "val", "test", "compositional")

# Color+shape pairs that never occur in train/val/test scenes (not even in question text) and
# occur at least once in every compositional scene. Each color and each shape is held out at
# most once, so every attribute is still seen in training, only not in these combinations.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "star"),
    ("blue", "triangle"),
    ("green", "cross"),
    ("yellow", "diamond"),
    ("purple", "circle"),
    ("cyan", "square"),
)

# Position words per grid cell: the answer vocabulary of "position" questions.
POSITION_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "center",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}

GRID = 3


@dataclass(frozen=True)
class WorldObject:
    """One object of a scene.

    shape/color/size: names from SHAPES / COLORS / SIZES.
    cell: (row, col) of the 3x3 grid cell holding the object's center.
    center: (x, y) of the object's center, normalised to [0, 1].
    rotation: degrees, counter-clockwise on screen.
    """

    shape: str
    color: str
    size: str
    cell: tuple[int, int]
    center: tuple[float, float]
    rotation: float = 0.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"WorldObject.shape: {self.shape!r} is not one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"WorldObject.color: {self.color!r} is not one of {tuple(COLORS)}")
        if self.size not in SIZES:
            raise ValueError(f"WorldObject.size: {self.size!r} is not one of {SIZES}")
        if tuple(self.cell) not in POSITION_NAMES:
            raise ValueError(f"WorldObject.cell: {self.cell!r} is not a (row, col) in a 3x3 grid")

    @property
    def half_size(self) -> float:
        """Half the width of the object's unrotated box, normalised to the image width."""
        return SIZE_FRACTIONS[self.size] / GRID / 2

    @property
    def position(self) -> str:
        """Position word of the object's cell, e.g. "top left"."""
        return POSITION_NAMES[tuple(self.cell)]

    def to_dict(self) -> dict:
        """A JSON-ready dict of the object."""
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "cell": list(self.cell),
            "center": list(self.center),
            "rotation": self.rotation,
        }

    @classmethod
    def from_dict(cls, d: dict) -> WorldObject:
        """Inverse of `to_dict`."""
        return cls(
            shape=d["shape"],
            color=d["color"],
            size=d["size"],
            cell=(int(d["cell"][0]), int(d["cell"][1])),
            center=(float(d["center"][0]), float(d["center"][1])),
            rotation=float(d.get("rotation", 0.0)),
        )


def cell_of(x: float, y: float) -> tuple[int, int]:
    """The (row, col) grid cell containing the normalised point (x, y)."""
    col = min(GRID - 1, max(0, int(x * GRID)))
    row = min(GRID - 1, max(0, int(y * GRID)))
    return (row, col)


def is_held_out(color: str, shape: str) -> bool:
    """Whether the color+shape pair belongs to the compositional hold-out."""
    return (color, shape) in HELD_OUT_PAIRS
