"""Grounding text for shapes-world scenes: boxes in questions and answers (`polymodal.data.boxes`).

Three tasks, each exact because the scene knows every object's box (`Scene.boxes`):
- refer (referring expression -> box): "Where is <ref>the small red star</ref>?" ->
  "<box>(x1,y1),(x2,y2)</box>"; asked of every object its full name (size, color, shape)
  names alone in its scene;
- region (box -> description): "What is in <box>(x1,y1),(x2,y2)</box>?" -> "a small red star";
- grounded caption (Kosmos-2 style): "Describe the image with boxes." ->
  "<ref>a small red star</ref><box>...</box> and <ref>a large blue circle</ref><box>...</box>",
  the objects in reading order.
Boxes are the tight boxes of the objects rendered at the scene's `image_size`, the size the
recipes render training images at.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from polymodal.data.boxes import REF_END, REF_START, box_to_text
from polymodal.data.world.text import join_words, noun, with_article
from polymodal.errors import UsageError

if TYPE_CHECKING:
    from polymodal.data.world.scene import Scene

GROUNDED_CAPTION_PROMPT = "Describe the image with boxes."
TASKS = ("refer", "region", "caption")


class GroundingQA(NamedTuple):
    """One grounding question with its exact answer; task is one of TASKS; obj: the index of the
    object asked about in `scene.objects` (-1 for a grounded caption)."""

    question: str
    answer: str
    task: str
    obj: int


def referring_name(scene: Scene, index: int) -> str | None:
    """"small red star" when that full name picks out object `index` alone in the scene, else None."""
    name = noun(scene.objects[index], size=True)
    return name if sum(noun(o, size=True) == name for o in scene.objects) == 1 else None


def grounded_caption(scene: Scene) -> str:
    """Every object as "<ref>a small red star</ref><box>...</box>", in reading order, joined as a sentence."""
    size = scene.image_size
    return join_words([f"{REF_START}{with_article(noun(o, size=True))}{REF_END}{box_to_text(box, size, size)}"
                       for o, box in zip(scene.objects, scene.boxes())])


def grounding_questions(scene: Scene) -> list[GroundingQA]:
    """Every refer and region question of `scene` (objects in order), then its grounded caption."""
    size = scene.image_size
    out = []
    for i, (obj, box) in enumerate(zip(scene.objects, scene.boxes())):
        text = box_to_text(box, size, size)
        name = referring_name(scene, i)
        if name is not None:
            out.append(GroundingQA(f"Where is {REF_START}the {name}{REF_END}?", text, "refer", i))
        out.append(GroundingQA(f"What is in {text}?", with_article(noun(obj, size=True)), "region", i))
    out.append(GroundingQA(GROUNDED_CAPTION_PROMPT, grounded_caption(scene), "caption", -1))
    return out


def grounding_conversation(scene: Scene, turns: int = 1) -> list[dict]:
    """A chat of `turns` grounding questions about `scene`, drawn from its seed without repeats
    (fewer when the scene has fewer); the first user turn starts with "<image>\\n"."""
    if turns < 1:
        raise UsageError(f"grounding_conversation: turns must be >= 1, got {turns!r}")
    pool = grounding_questions(scene)
    order = np.random.default_rng([scene.seed, 303]).permutation(len(pool))[:turns]
    messages = []
    for t, k in enumerate(order):
        messages.append({"role": "user", "content": ("<image>\n" if t == 0 else "") + pool[k].question})
        messages.append({"role": "assistant", "content": pool[k].answer})
    return messages
