"""`World`: deterministic, seed-split sampling of shapes-world scenes and clips.

Scene `i` of split `s` is drawn from its own generator seeded by (world seed, stream, global
seed = split offset + i); the splits own disjoint seed ranges, and train/val/test never contain
a held-out color+shape pair (see draws.py).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from polymodal.data.world.clips import Clip, sample_clip
from polymodal.data.world.draws import (
    MAX_ROTATION,
    SPLIT_OFFSETS,
    SPLIT_STRIDE,
    STREAM_SCENE,
    center_in_cell,
    fit_rotation,
    sample_attributes,
    sample_background,
    scene_rng,
)
from polymodal.data.world.objects import BACKGROUNDS, GRID, SPLITS, WorldObject
from polymodal.data.world.render import check_size
from polymodal.data.world.scene import Scene


class World:
    """An endless, deterministic stream of scenes for one split.

    split: "train" | "val" | "test" | "compositional".
    image_size: default render size of the scenes (>= 16 px).
    num_objects: (min, max) objects per scene, 1 <= min <= max <= 9.
    background: "plain" | "noise" | "texture" | "mixed".
    seed: the world seed; scene i depends only on (seed, split, i).
    max_rotation: objects are rotated uniformly in [-max_rotation, max_rotation] degrees, each
        rotation shrunk towards 0 where the rotated shape would not fit its cell.
    """

    def __init__(
        self,
        split: str = "train",
        image_size: int = 64,
        num_objects: tuple[int, int] = (1, 3),
        background: str = "plain",
        seed: int = 0,
        max_rotation: float = 0.0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"World: split {split!r} is not one of {SPLITS}")
        if background not in BACKGROUNDS + ("mixed",):
            raise ValueError(f"World: background {background!r} is not one of {BACKGROUNDS + ('mixed',)}")
        lo, hi = num_objects
        if not 1 <= lo <= hi <= GRID * GRID:
            raise ValueError(f"World: num_objects {num_objects!r} must satisfy 1 <= min <= max <= 9")
        if not 0.0 <= max_rotation <= MAX_ROTATION:
            raise ValueError(f"World: max_rotation {max_rotation!r} must be in [0, {MAX_ROTATION}]")
        if seed < 0:
            raise ValueError(f"World: seed must be >= 0, got {seed!r}")
        self.split = split
        self.image_size = check_size(image_size)
        self.num_objects = (int(lo), int(hi))
        self.background = background
        self.seed = int(seed)
        self.max_rotation = float(max_rotation)

    def __repr__(self) -> str:
        return (
            f"World(split={self.split!r}, image_size={self.image_size}, num_objects={self.num_objects}, "
            f"background={self.background!r}, seed={self.seed}, max_rotation={self.max_rotation})"
        )

    def global_seed(self, index: int) -> int:
        """The global seed of scene/clip `index` of this split (in the split's seed range)."""
        if not isinstance(index, (int, np.integer)) or not 0 <= index < SPLIT_STRIDE:
            raise IndexError(f"World index must be an int in [0, 2**40), got {index!r}")
        return SPLIT_OFFSETS[self.split] + int(index)

    def sample_objects(self, rng: np.random.Generator) -> tuple[WorldObject, ...]:
        """Draw this world's objects for one scene: distinct cells, reading order."""
        lo, hi = self.num_objects
        n = int(rng.integers(lo, hi + 1))
        cells = np.sort(rng.choice(GRID * GRID, size=n, replace=False))
        compositional = self.split == "compositional"
        forced = int(rng.integers(n)) if compositional else -1
        objects = []
        for k, flat in enumerate(cells):
            cell = (int(flat) // GRID, int(flat) % GRID)
            shape, color, size = sample_attributes(rng, k == forced, compositional)
            rotation = 0.0
            if self.max_rotation:
                rotation = fit_rotation(shape, size, rng.uniform(-self.max_rotation, self.max_rotation))
            center = center_in_cell(rng, cell, shape, size, rotation)
            objects.append(WorldObject(shape, color, size, cell, center, rotation))
        return tuple(objects)

    def __getitem__(self, index: int) -> Scene:
        """Scene `index` (any int >= 0), identical on every call and machine."""
        seed = self.global_seed(index)
        rng = scene_rng(self.seed, STREAM_SCENE, seed)
        objects = self.sample_objects(rng)
        return Scene(
            objects=objects,
            index=int(index),
            split=self.split,
            seed=seed,
            image_size=self.image_size,
            **sample_background(rng, self.background),
        )

    def __iter__(self) -> Iterator[Scene]:
        """Scenes 0, 1, 2, ... without end."""
        index = 0
        while True:
            yield self[index]
            index += 1

    def scenes(self, n: int, start: int = 0) -> Iterator[Scene]:
        """Scenes start, ..., start + n - 1."""
        for index in range(start, start + n):
            yield self[index]

    def clip(self, index: int, frames: int = 8) -> Clip:
        """Clip `index`: objects moving at constant velocity over `frames` frames (see clips.py)."""
        return sample_clip(self, index, frames)
