"""Captions, question/answer pairs and conversations about a shapes-world scene.

All text is generated from the scene's objects, so every answer is exact.

Answer vocabulary (answers are compared by exact string match):
- color:     a color name from COLORS ("red", "green", "blue", "yellow", "orange", "purple",
             "cyan", "magenta");
- shape:     a shape name from SHAPES ("circle", "square", "triangle", "star", "cross", "diamond");
- size:      "small" | "medium" | "large";
- count:     a digit string "0" ... "9";
- position:  a cell name: "top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right";
- existence: "yes" | "no";
- relation:  "yes" | "no" ("left of" compares grid columns, "above" compares grid rows;
             objects in the same column are not left of each other).
In train/val/test scenes no text mentions a held-out color+shape pair (negative existence
questions skip them), so the compositional hold-out covers text as well as pixels.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from polymodal.data.world.objects import COLORS, SHAPES, WorldObject, is_held_out

if TYPE_CHECKING:
    from polymodal.data.world.scene import Scene

QTYPES: tuple[str, ...] = ("color", "shape", "size", "count", "position", "existence", "relation")

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# How a cell name reads after "is": "in the top left", "at the top", ...
LOCATIVES: dict[str, str] = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}

_BACKGROUND_WORDS = {"plain": "plain", "noise": "noisy", "texture": "textured"}

DESCRIBE_PROMPTS = ("Describe the image.", "What do you see in this picture?", "Describe the scene in detail.")


class QA(NamedTuple):
    """One question with its exact answer; qtype is one of QTYPES."""

    question: str
    answer: str
    qtype: str


def with_article(phrase: str) -> str:
    """"a red circle" / "an orange star"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def plural(shape: str) -> str:
    """Plural of a shape name ("crosses", "circles")."""
    return shape + ("es" if shape.endswith("s") else "s")


def join_words(items: Sequence[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def noun(obj: WorldObject, size: bool = False) -> str:
    """"red circle", or "small red circle" with size=True."""
    return f"{obj.size} {obj.color} {obj.shape}" if size else f"{obj.color} {obj.shape}"


def unique_noun(obj: WorldObject, objects: Sequence[WorldObject]) -> str | None:
    """The shortest of "red circle" / "small red circle" naming only `obj`, else None."""
    for size in (False, True):
        phrase = noun(obj, size)
        if sum(noun(o, size) == phrase for o in objects) == 1:
            return phrase
    return None


def _background_phrase(scene: Scene) -> str:
    tone = "light" if scene.bg_color[0] >= 128 else "dark"
    return f"a {_BACKGROUND_WORDS[scene.background]} {tone} background"


def _count_phrase(n: int) -> str:
    return f"{NUMBER_WORDS[n]} object" + ("" if n == 1 else "s")


def _short_captions(scene: Scene) -> list[str]:
    things = join_words([with_article(noun(o)) for o in scene.objects])
    return [
        things,
        f"an image of {things}",
        f"{_count_phrase(len(scene.objects))}: {things}",
        f"{things} on {_background_phrase(scene)}",
    ]


def _detailed_captions(scene: Scene) -> list[str]:
    objs = scene.objects
    placed = [f"{with_article(noun(o, True))} {LOCATIVES[o.position]}" for o in objs]
    n = len(objs)
    intro = f"There {'is' if n == 1 else 'are'} {_count_phrase(n)} on {_background_phrase(scene)}."
    sentences = " ".join(f"{with_article(noun(o, True)).capitalize()} is {LOCATIVES[o.position]}." for o in objs)
    return [join_words(placed).capitalize() + ".", f"{intro} {sentences}", *_grounded_captions(scene)]


def _grounded_captions(scene: Scene) -> list[str]:
    # Place first, then the object: a reader finds the grid cell from the words before it
    # has to name what is there (the detailed style's third template).
    clauses = "; ".join(f"{LOCATIVES[o.position]} there is {with_article(noun(o, True))}" for o in scene.objects)
    return [clauses[0].upper() + clauses[1:] + "."]


def _located_captions(scene: Scene) -> list[str]:
    # The object first, then its place, in an order seeded by the scene (not reading order, so the
    # place cannot be guessed from the clause's rank): "A small red circle is in the top left; ...".
    # Naming the place needs the object the earlier words described found among the image cells,
    # a content lookup made after gathering context, which the grounded style never asks for and
    # which the comparison questions (existence, count of a color, relation) are built on.
    objects = list(scene.objects)
    np.random.default_rng([scene.seed, 7]).shuffle(objects)
    clauses = "; ".join(f"{with_article(noun(o, True))} is {LOCATIVES[o.position]}" for o in objects)
    return [clauses[0].upper() + clauses[1:] + "."]


_CAPTIONS = {"short": _short_captions, "detailed": _detailed_captions, "grounded": _grounded_captions,
             "located": _located_captions}
CAPTION_STYLES = tuple(_CAPTIONS)


def caption(scene: Scene, style: str = "short", variant: int | None = None) -> str:
    """One caption of `scene`; variant None picks a template from the scene's seed."""
    if style not in _CAPTIONS:
        raise ValueError(f"caption: style {style!r} is not one of {tuple(_CAPTIONS)}")
    options = _CAPTIONS[style](scene)
    if variant is None:
        variant = scene.seed % len(options)
    if not 0 <= variant < len(options):
        raise ValueError(f"caption: variant {variant!r} out of range for style {style!r} ({len(options)} templates)")
    return options[variant]


def captions_of(scene: Scene, styles: Sequence[str]) -> list[str]:
    """Every template of each style in `styles` (in that order) for `scene`."""
    for style in styles:
        if style not in _CAPTIONS:
            raise ValueError(f"captions_of: style {style!r} is not one of {CAPTION_STYLES}")
    return [text for style in styles for text in _CAPTIONS[style](scene)]


def draw_caption(scene: Scene, styles: Sequence[str], rng: np.random.Generator) -> str:
    """One caption of `scene`: a style of `styles`, then one of its templates, each drawn
    uniformly from `rng` (two draws, in that order)."""
    templates = captions_of(scene, [styles[int(rng.integers(len(styles)))]])
    return templates[int(rng.integers(len(templates)))]


def all_captions(scene: Scene) -> list[str]:
    """Every short then every detailed caption of `scene` (the detailed ones include the grounded one)."""
    return captions_of(scene, ("short", "detailed"))


def _object_questions(objs: Sequence[WorldObject]) -> list[QA]:
    out = []
    for o in objs:
        loc = LOCATIVES[o.position]
        out.append(QA(f"What color is the {o.shape} {loc}?", o.color, "color"))
        out.append(QA(f"What is the shape of the object {loc}?", o.shape, "shape"))
        out.append(QA(f"What size is the {o.color} {o.shape} {loc}?", o.size, "size"))
        name = unique_noun(o, objs)
        if name is not None:
            out.append(QA(f"Where is the {name}?", o.position, "position"))
    return out


def _count_questions(objs: Sequence[WorldObject], rng: np.random.Generator) -> list[QA]:
    out = [QA("How many objects are there?", str(len(objs)), "count")]
    colors = [c for c in COLORS if any(o.color == c for o in objs)]
    absent = [c for c in COLORS if c not in colors]
    if absent:  # one color with answer "0" (a scene of 9 objects may use every color)
        colors.append(absent[int(rng.integers(len(absent)))])
    for c in colors:
        out.append(QA(f"How many {c} objects are there?", str(sum(o.color == c for o in objs)), "count"))
    for s in dict.fromkeys(o.shape for o in objs):
        out.append(QA(f"How many {plural(s)} are there?", str(sum(o.shape == s for o in objs)), "count"))
    return out


def _existence_questions(objs: Sequence[WorldObject], split: str, rng: np.random.Generator) -> list[QA]:
    present = list(dict.fromkeys((o.color, o.shape) for o in objs))
    out = [QA(f"Is there {with_article(f'{c} {s}')}?", "yes", "existence") for c, s in present]
    candidates = [
        (c, s)
        for c in COLORS
        for s in SHAPES
        if (c, s) not in present and (split == "compositional" or not is_held_out(c, s))
    ]
    picks = rng.choice(len(candidates), size=min(len(present), len(candidates)), replace=False)
    out += [QA(f"Is there {with_article(f'{candidates[k][0]} {candidates[k][1]}')}?", "no", "existence") for k in picks]
    return out


def _relation_questions(objs: Sequence[WorldObject]) -> list[QA]:
    out = []
    for i, a in enumerate(objs):
        for b in objs[i + 1 :]:
            na, nb = unique_noun(a, objs), unique_noun(b, objs)
            if na is None or nb is None:
                continue
            for x, nx, y, ny in ((a, na, b, nb), (b, nb, a, na)):
                left = "yes" if x.cell[1] < y.cell[1] else "no"
                above = "yes" if x.cell[0] < y.cell[0] else "no"
                out.append(QA(f"Is the {nx} left of the {ny}?", left, "relation"))
                out.append(QA(f"Is the {nx} above the {ny}?", above, "relation"))
    return out


def questions(scene: Scene) -> list[QA]:
    """Every question/answer pair of `scene`, deterministic (see the module docstring)."""
    rng = np.random.default_rng([scene.seed, 101])
    objs = scene.objects
    return (
        _object_questions(objs)
        + _count_questions(objs, rng)
        + _existence_questions(objs, scene.split, rng)
        + _relation_questions(objs)
    )


def check_caption_styles(styles: Sequence[str], name: str) -> list[str]:
    """`styles` as a list if it is a non-empty list of CAPTION_STYLES; else a ValueError naming `name`."""
    if not styles or any(style not in _CAPTIONS for style in styles):
        raise ValueError(f"{name} must be a non-empty list from {CAPTION_STYLES}, got {styles!r}")
    return list(styles)


def check_question_weights(weights: Mapping[str, int], name: str) -> dict[str, int]:
    """`weights` as a dict if it maps question types to integers >= 1; else a ValueError naming `name`."""
    bad = {t: n for t, n in weights.items() if t not in QTYPES or not isinstance(n, int) or n < 1}
    if bad:
        raise ValueError(f"{name} must map question types {QTYPES} to integers >= 1, got {bad!r}")
    return dict(weights)


def conversation(scene: Scene, turns: int = 3, describe: float = 0.5,
                 weights: Mapping[str, int] | None = None, describe_styles: Sequence[str] = ("detailed",)) -> list[dict]:
    """A `turns`-turn chat about `scene`: a description request or a question per user turn.

    With probability `describe` (drawn from the scene's seed) the chat opens with a description
    request; every other turn is a question, drawn round-robin over question types so turns vary.
    `weights` ({qtype: n >= 1}, 1 for types it leaves out) puts a type n times into the shuffled
    round-robin, so a one-question chat asks it n times as often. The description is one
    template of the caption styles `describe_styles` (CAPTION_STYLES), drawn from the scene's seed.
    The first user turn starts with "<image>\\n". Returns [{"role": "user"|"assistant", "content": str}, ...].
    """
    weights = check_question_weights(weights or {}, "conversation: weights")
    if turns < 1:
        raise ValueError(f"conversation: turns must be >= 1, got {turns!r}")
    if not 0.0 <= describe <= 1.0:
        raise ValueError(f"conversation: describe must be a probability in [0, 1], got {describe!r}")
    check_caption_styles(describe_styles, "conversation: describe_styles")
    rng = np.random.default_rng([scene.seed, 202])
    by_type: dict[str, list[QA]] = {}
    for qa in questions(scene):
        by_type.setdefault(qa.qtype, []).append(qa)
    for pool in by_type.values():
        rng.shuffle(pool)
    order = [qtype for qtype in by_type for _ in range(weights.get(qtype, 1))]
    rng.shuffle(order)
    pairs: list[tuple[str, str]] = []
    if rng.random() < describe:
        prompt = DESCRIBE_PROMPTS[int(rng.integers(len(DESCRIBE_PROMPTS)))]
        descriptions = captions_of(scene, describe_styles)
        pairs.append((prompt, descriptions[int(rng.integers(len(descriptions)))]))
    k = 0
    while len(pairs) < turns and any(by_type.values()):
        pool = by_type[order[k % len(order)]]
        if pool:
            qa = pool.pop()
            pairs.append((qa.question, qa.answer))
        k += 1
    messages = []
    for t, (question, answer) in enumerate(pairs):
        messages.append({"role": "user", "content": ("<image>\n" if t == 0 else "") + question})
        messages.append({"role": "assistant", "content": answer})
    return messages
