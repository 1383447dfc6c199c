"""Reasoning variants of the world's chats (MLLM survey usage types): think (M-CoT) and tool use (LAVR).

- think: the user's question ends with THINK_SUFFIX and the answer gives a rationale first, the
  list of the scene's objects, then the answer:
      "Objects: a small red circle in the top left; a large blue star in the center. Answer: 2"
- tools: a system message (TOOLS_SYSTEM) offers the detector; the assistant first calls it in
  the tool-call format of
  `polymodal.infer.reasoning` (`<tool_call>{"name": "detect"}</tool_call>`), the tool's reply
  comes back in a user turn (`<tool_response>...</tool_response>`, the same object list), then
  the assistant answers. The detector's list is what the world's exact scorer parses from the
  image (`detect_objects`), which on rendered scenes is exactly the scene's objects.
`final_answer` reads the answer back out of either kind of reply.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from polymodal.data.world.objects import POSITION_NAMES
from polymodal.data.world.text import LOCATIVES, QA, questions, with_article
from polymodal.errors import UsageError

if TYPE_CHECKING:
    from polymodal.data.world.scene import Scene

THINK_SUFFIX = " Think step by step."
ANSWER_PREFIX = "Answer:"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_START, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"
DETECT = "detect"
TOOLS_SYSTEM = (f"You can call the tool {DETECT!r}, which lists the objects in the image, by writing "
                f'{TOOL_CALL_START}{{"name": "{DETECT}"}}{TOOL_CALL_END}.')


def object_list(objects: Sequence) -> str:
    """"a small red circle in the top left; a large blue star in the center" for world objects or
    parsed objects (anything with shape, color, size and a grid cell); "nothing" for none."""
    if not objects:
        return "nothing"
    return "; ".join(f"{with_article(f'{o.size} {o.color} {o.shape}')} {LOCATIVES[POSITION_NAMES[tuple(o.cell)]]}"
                     for o in objects)


def detect_objects(image) -> str:
    """The detector tool: the objects the world's exact scorer parses from an RGB image, as `object_list`."""
    from polymodal.data.world.scorer import parse_image

    return object_list(parse_image(image))


def think_reply(scene: Scene, answer: str) -> str:
    """The think-variant answer: the objects, then "Answer: {answer}"."""
    return f"Objects: {object_list(scene.objects)}. {ANSWER_PREFIX} {answer}"


def tool_call(name: str, arguments: dict | None = None) -> str:
    """A tool call as the assistant writes it: <tool_call>{"name": ..., ["arguments": {...}]}</tool_call>."""
    payload = {"name": name} if not arguments else {"name": name, "arguments": arguments}
    return f"{TOOL_CALL_START}{json.dumps(payload)}{TOOL_CALL_END}"


def tool_response(content: str) -> str:
    """A tool's result as the user turn that returns it."""
    return f"{TOOL_RESPONSE_START}{content}{TOOL_RESPONSE_END}"


def final_answer(reply: str) -> str:
    """The answer of a reply: the first line after the last "Answer:", else the reply's first line."""
    text = reply.rsplit(ANSWER_PREFIX, 1)[1] if ANSWER_PREFIX in reply else reply
    return (text.strip().splitlines() or [""])[0].strip()


def reasoning_conversation(scene: Scene, variant: str, turns: int = 1,
                           weights: dict[str, int] | None = None) -> list[dict]:
    """A chat of `turns` questions about `scene` in the "think" or "tools" variant (module
    docstring), question types drawn by `weights` ({qtype: n}, 1 for the rest) from the scene's
    seed. The first user turn starts with "<image>\\n"; a tools chat opens with TOOLS_SYSTEM."""
    if variant not in ("think", "tools"):
        raise UsageError(f"reasoning_conversation: variant must be 'think' or 'tools', got {variant!r}")
    rng = np.random.default_rng([scene.seed, 404])
    pool: list[QA] = questions(scene)
    weights = weights or {}
    chance = np.array([weights.get(qa.qtype, 1) for qa in pool], dtype=float)
    picks = rng.choice(len(pool), size=min(turns, len(pool)), replace=False, p=chance / chance.sum())
    messages: list[dict] = [{"role": "system", "content": TOOLS_SYSTEM}] if variant == "tools" else []
    for t, k in enumerate(picks):
        qa = pool[int(k)]
        opening = "<image>\n" if t == 0 else ""
        if variant == "think":
            messages += [{"role": "user", "content": opening + qa.question + THINK_SUFFIX},
                         {"role": "assistant", "content": think_reply(scene, qa.answer)}]
        else:
            messages += [{"role": "user", "content": opening + qa.question},
                         {"role": "assistant", "content": tool_call(DETECT)},
                         {"role": "user", "content": tool_response(object_list(scene.objects))},
                         {"role": "assistant", "content": f"{ANSWER_PREFIX} {qa.answer}"}]
    return messages
