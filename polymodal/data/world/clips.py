"""Moving-object clips: objects travelling at constant velocity, with motion captions.

Each object moves in one of four directions ("left", "right", "up", "down") by a total of
MIN_TRAVEL..MAX_TRAVEL of the image width over the clip, staying inside the image. Objects are
placed by rejection so that their bounding circles (radius sqrt(2) x half-size, enough for any
rotation) stay `_GAP` apart at every frame: 2.5 px at 32 px, more than the 1 px gap plus 1 px
of pixel snapping needed to keep objects separate, so every frame can be parsed by the scorer.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from polymodal.data.world.draws import (
    STREAM_CLIP,
    sample_attributes,
    sample_background,
    scene_rng,
)
from polymodal.data.world.objects import GRID, SIZE_FRACTIONS, WorldObject, cell_of
from polymodal.data.world.scene import Scene
from polymodal.data.world.text import join_words, noun, unique_noun, with_article

if TYPE_CHECKING:
    from polymodal.data.world.sampling import World

# Unit displacement per direction, normalised coordinates (y grows downwards).
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
MAX_CLIP_OBJECTS = 3
MIN_TRAVEL, MAX_TRAVEL = 0.25, 0.5
_GAP = 0.08  # min distance between two bounding circles, normalised
_BOUND = 1.415  # bounding-circle radius / half-size: > sqrt(2), the square's corner
_TRIES = 50


@dataclass(frozen=True)
class Clip:
    """A clip: one Scene per frame plus each object's motion.

    scenes: T scenes with the same background; object k of every frame is the same object.
    motions: direction word per object ("left" | "right" | "up" | "down").
    velocities: per-object (dx, dy) per frame, normalised coordinates.
    index/split/seed: as for scenes (clips use their own random stream).
    """

    scenes: tuple[Scene, ...]
    motions: tuple[str, ...]
    velocities: tuple[tuple[float, float], ...]
    index: int
    split: str
    seed: int

    @cached_property
    def frames(self) -> np.ndarray:
        """The clip at the default size: (T, H, W, 3) uint8."""
        return self.render()

    def render(self, size: int | None = None) -> np.ndarray:
        """The clip rendered at `size`: (T, size, size, 3) uint8."""
        return np.stack([scene.render(size) for scene in self.scenes])

    @property
    def objects(self) -> tuple[WorldObject, ...]:
        """The objects at the first frame."""
        return self.scenes[0].objects

    def caption(self) -> str:
        """The motion, e.g. "a red circle moves left and a blue square moves up"."""
        objs = self.objects
        parts = [
            f"{with_article(unique_noun(o, objs) or noun(o, True))} moves {motion}"
            for o, motion in zip(objs, self.motions)
        ]
        return join_words(parts)


class _Mover(NamedTuple):
    """One moving object while a clip is being placed; track is (T, 2) normalised centers."""

    shape: str
    color: str
    size: str
    direction: str
    velocity: np.ndarray
    track: np.ndarray
    radius: float


def _track(start: np.ndarray, velocity: np.ndarray, frames: int) -> np.ndarray:
    """Centers (T, 2) of an object moving from `start` at `velocity` per frame."""
    return start[None, :] + np.arange(frames)[:, None] * velocity[None, :]


def _draw_track(rng: np.random.Generator, radius: float, frames: int) -> tuple[str, np.ndarray, np.ndarray]:
    """(direction, velocity (2,), track (T, 2)) keeping the circle inside the image."""
    direction = tuple(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
    unit = np.array(DIRECTIONS[direction])
    travel = rng.uniform(MIN_TRAVEL, MAX_TRAVEL)
    lo, hi = radius + _GAP / 2, 1.0 - radius - _GAP / 2
    start = rng.uniform(lo, hi, size=2)
    axis = 0 if unit[0] else 1
    # Along the motion axis, start where the whole path fits: [lo, hi - travel] moving forward.
    start[axis] = rng.uniform(lo, hi - travel)
    if unit[axis] < 0:
        start[axis] = lo + hi - start[axis]
    velocity = unit * travel / max(frames - 1, 1)
    return direction, velocity, _track(start, velocity, frames)


def sample_clip(world: World, index: int, frames: int = 8) -> Clip:
    """Clip `index` of `world`: up to 3 moving objects (world.num_objects capped), `frames` frames."""
    if frames < 1:
        raise ValueError(f"sample_clip: frames must be >= 1, got {frames!r}")
    seed = world.global_seed(index)
    rng = scene_rng(world.seed, STREAM_CLIP, seed)
    lo, hi = world.num_objects
    n = int(rng.integers(min(lo, MAX_CLIP_OBJECTS), min(hi, MAX_CLIP_OBJECTS) + 1))
    compositional = world.split == "compositional"
    movers: list[_Mover] = []
    for k in range(n):
        shape, color, size = sample_attributes(rng, compositional and k == 0, compositional)
        radius = SIZE_FRACTIONS[size] / GRID / 2 * _BOUND
        for _ in range(_TRIES):
            direction, velocity, track = _draw_track(rng, radius, frames)
            gaps = [np.linalg.norm(track - m.track, axis=1).min() - radius - m.radius for m in movers]
            if all(gap >= _GAP for gap in gaps):
                movers.append(_Mover(shape, color, size, direction, velocity, track, radius))
                break
    limit = world.max_rotation
    rotations = [float(rng.uniform(-limit, limit)) if limit else 0.0 for _ in movers]
    background = sample_background(rng, world.background)
    scenes = []
    for t in range(frames):
        objects = tuple(
            WorldObject(m.shape, m.color, m.size, cell_of(*m.track[t]), (float(m.track[t, 0]), float(m.track[t, 1])), rot)
            for m, rot in zip(movers, rotations)
        )
        scenes.append(
            Scene(objects=objects, index=int(index), split=world.split, seed=seed, image_size=world.image_size, **background)
        )
    return Clip(
        scenes=tuple(scenes),
        motions=tuple(m.direction for m in movers),
        velocities=tuple((float(m.velocity[0]), float(m.velocity[1])) for m in movers),
        index=int(index),
        split=world.split,
        seed=seed,
    )
