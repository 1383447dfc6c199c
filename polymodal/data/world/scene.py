"""`Scene`: one sampled shapes-world scene with its renderings, annotations and text."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from polymodal.data.world import render, text
from polymodal.data.world.objects import BACKGROUNDS, WorldObject


@dataclass(frozen=True)
class Scene:
    """A scene: objects on a background, fully determined by its fields.

    objects: the objects; sampled scenes put them in distinct grid cells, in reading order.
    background: "plain" | "noise" | "texture".
    bg_color: the background's gray (r, g, b).
    bg_seed: seed of the background noise.
    bg_strength: noise std (noise) or grating amplitude (texture), in gray levels.
    bg_frequency: grating frequency in periods per image width (texture).
    bg_angle: grating angle in radians (texture).
    index: position of the scene in its split; split: the split's name.
    seed: the scene's global seed (train/val/test/compositional use disjoint seed ranges).
    image_size: default render size in pixels.
    """

    objects: tuple[WorldObject, ...]
    background: str
    bg_color: tuple[int, int, int]
    bg_seed: int
    bg_strength: float
    bg_frequency: float
    bg_angle: float
    index: int
    split: str
    seed: int
    image_size: int = 64

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"Scene.background: {self.background!r} is not one of {BACKGROUNDS}")

    def _size(self, size: int | None) -> int:
        return render.check_size(self.image_size if size is None else size)

    def render(self, size: int | None = None) -> np.ndarray:
        """The scene as an RGB array (size, size, 3) uint8 (size defaults to image_size)."""
        s = self._size(size)
        image = render.render_background(
            s, self.background, self.bg_color[0], self.bg_seed, self.bg_strength, self.bg_frequency, self.bg_angle
        )
        return render.paint_objects(image, self.objects)

    def image(self, size: int | None = None) -> Image.Image:
        """The scene as a PIL RGB image."""
        return Image.fromarray(self.render(size), mode="RGB")

    def masks(self, size: int | None = None) -> np.ndarray:
        """Per-object masks (N, size, size) bool, in the order of `objects`."""
        return render.render_masks(self.objects, self._size(size))

    def boxes(self, size: int | None = None) -> list[tuple[int, int, int, int]]:
        """Per-object pixel boxes (x0, y0, x1, y1), exclusive x1/y1: the tight box of each mask."""
        s = self._size(size)
        out = []
        for obj in self.objects:
            (wx0, wy0, _, _), mask = render.object_pixels(obj, s)
            rows = np.flatnonzero(mask.any(axis=1))
            cols = np.flatnonzero(mask.any(axis=0))
            out.append((wx0 + int(cols[0]), wy0 + int(rows[0]), wx0 + int(cols[-1]) + 1, wy0 + int(rows[-1]) + 1))
        return out

    def caption(self, style: str = "short", variant: int | None = None) -> str:
        """A caption; style "short", "detailed" or "grounded"; variant picks the template (None: per-scene)."""
        return text.caption(self, style, variant)

    def captions(self) -> list[str]:
        """Every caption template (short ones first, then detailed ones)."""
        return text.all_captions(self)

    def questions(self) -> list[text.QA]:
        """All question/answer pairs about the scene (see `text` for the answer vocabulary)."""
        return text.questions(self)

    def conversation(self, turns: int = 3, describe: float = 0.5, weights: dict[str, int] | None = None,
                     describe_styles: Sequence[str] = ("detailed",)) -> list[dict]:
        """A multi-turn chat [{"role", "content"}] that opens with a description request with
        probability `describe`, answered in one of the caption styles `describe_styles`, and draws
        question types by `weights` (see `text.conversation`); the first user turn starts with "<image>\\n"."""
        return text.conversation(self, turns, describe, weights, describe_styles)

    def to_dict(self) -> dict:
        """A JSON-ready dict; `Scene.from_dict` rebuilds an equal scene."""
        return {
            "objects": [o.to_dict() for o in self.objects],
            "background": self.background,
            "bg_color": list(self.bg_color),
            "bg_seed": self.bg_seed,
            "bg_strength": self.bg_strength,
            "bg_frequency": self.bg_frequency,
            "bg_angle": self.bg_angle,
            "index": self.index,
            "split": self.split,
            "seed": self.seed,
            "image_size": self.image_size,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        """Inverse of `to_dict`."""
        return cls(
            objects=tuple(WorldObject.from_dict(o) for o in d["objects"]),
            background=d["background"],
            bg_color=tuple(int(c) for c in d["bg_color"]),
            bg_seed=int(d["bg_seed"]),
            bg_strength=float(d["bg_strength"]),
            bg_frequency=float(d["bg_frequency"]),
            bg_angle=float(d["bg_angle"]),
            index=int(d["index"]),
            split=d["split"],
            seed=int(d["seed"]),
            image_size=int(d.get("image_size", 64)),
        )
