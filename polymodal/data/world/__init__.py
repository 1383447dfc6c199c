"""The shapes world: procedural scenes with exact captions, QA, boxes, masks, clips and scorer.

    from polymodal.data.world import World, score_image
    world = World("train", image_size=64, num_objects=(1, 3), background="mixed")
    scene = world[0]
    image = scene.render()            # (64, 64, 3) uint8
    scene.caption("detailed")         # "A small red circle in the top left and ..."
    score_image(image, scene)["all_correct"]   # True

See objects.py (vocabulary, geometry), draws.py (splits, compositional hold-out), text.py
(answer vocabulary) and scorer.py (parsing tolerances).
"""
from polymodal.data.world.clips import Clip
from polymodal.data.world.objects import (
    COLORS,
    HELD_OUT_PAIRS,
    POSITION_NAMES,
    SHAPES,
    SIZES,
    SPLITS,
    WorldObject,
)
from polymodal.data.world.sampling import World
from polymodal.data.world.scene import Scene
from polymodal.data.world.scorer import ParsedObject, parse_image, score_image
from polymodal.data.world.text import QA, QTYPES
from polymodal.data.world.tokenizer import world_tokenizer

__all__ = [
    "COLORS",
    "HELD_OUT_PAIRS",
    "POSITION_NAMES",
    "QA",
    "QTYPES",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Clip",
    "ParsedObject",
    "Scene",
    "World",
    "WorldObject",
    "parse_image",
    "score_image",
    "world_tokenizer",
]
