"""Reasoning usage types over any chat checkpoint: multi-image in-context prompts (M-ICL) and
LLM-aided visual reasoning with tools (LAVR). The think variant (M-CoT) is a prompt suffix and
an answer format, in `polymodal.data.world.reasoning`.

Tool-call format (the `<tool_call>` JSON convention of Hermes / Qwen2.5 chat models, kept small):
- the assistant calls a tool by writing, anywhere in its reply,
      <tool_call>{"name": "detect", "arguments": {...}}</tool_call>
  ("arguments" may be left out; only the first call of a reply is run);
- the tool's result comes back as the next user message:
      <tool_response>a small red circle in the top left; ...</tool_response>
  an unknown tool name, or a call that is not such JSON, is refused: the response says so and
  names the available tools, and the tool is not run;
- a reply without a tool call is the final answer: the loop stops there. After `max_calls`
  calls without a final answer the loop stops with none.
Tools are plain functions `tool(images, **arguments) -> str` over the conversation's images
(PIL images or RGB arrays), e.g. `detect_objects` (the world's exact scorer as a detector).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from polymodal.data.conversation import IMAGE_MARKER
from polymodal.data.world.reasoning import (
    DETECT,
    TOOL_CALL_END,
    TOOL_CALL_START,
    detect_objects,
    tool_response,
)
from polymodal.errors import UsageError

Conversation = tuple[list[dict], list]  # (messages, images)
Respond = Callable[[Sequence[Conversation]], list[str]]
Tool = Callable[..., str]

_CALL = re.compile(re.escape(TOOL_CALL_START) + r"(.*?)" + re.escape(TOOL_CALL_END), re.DOTALL)


@dataclass
class ToolCall:
    """A parsed call: the tool's name ("" when the call was not valid JSON with a string "name")
    and its arguments."""

    name: str
    arguments: dict = field(default_factory=dict)


@dataclass
class ToolRun:
    """One conversation run through the tool loop: the final reply (None if the budget ran out),
    the whole exchange, the tools run and the names refused, in order."""

    answer: str | None
    messages: list[dict]
    calls: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def parse_tool_call(reply: str) -> ToolCall | None:
    """The first tool call of a reply, or None when it has none (a final answer)."""
    match = _CALL.search(reply)
    if match is None:
        return None
    try:
        payload = json.loads(match.group(1))
    except json.JSONDecodeError:
        return ToolCall("")
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        return ToolCall("")
    arguments = payload.get("arguments", {})
    return ToolCall(payload["name"], arguments if isinstance(arguments, dict) else {})


def _run_tool(tools: Mapping[str, Tool], call: ToolCall, images: list) -> tuple[str, bool]:
    """(the tool's response text, whether it ran)."""
    if call.name not in tools:
        what = f"unknown tool {call.name!r}" if call.name else "a tool call must be JSON with a string \"name\""
        return f"error: {what}; available tools: {', '.join(sorted(tools))}", False
    try:
        return tools[call.name](images, **call.arguments), True
    except TypeError as err:  # arguments the tool does not take
        return f"error: {call.name}: {err}", False


def run_with_tools(respond: Respond, conversations: Sequence[Conversation], tools: Mapping[str, Tool],
                   max_calls: int = 3) -> list[ToolRun]:
    """Run each (messages, images) conversation until the assistant gives a final answer (see the
    module docstring). respond: [(messages, images)] -> one reply each (e.g. `chat_responder`),
    called once per round for the conversations still running. Returns one `ToolRun` per conversation."""
    if max_calls < 0:
        raise UsageError(f"run_with_tools: max_calls must be >= 0, got {max_calls}")
    runs = [ToolRun(None, [dict(m) for m in messages]) for messages, _ in conversations]
    images = [list(imgs) for _, imgs in conversations]
    active = list(range(len(runs)))
    while active:
        replies = respond([(runs[i].messages, images[i]) for i in active])
        still = []
        for i, reply in zip(active, replies, strict=True):
            run = runs[i]
            run.messages.append({"role": "assistant", "content": reply})
            call = parse_tool_call(reply)
            if call is None:
                run.answer = reply
                continue
            if len(run.calls) + len(run.refused) >= max_calls:
                continue  # budget spent: stop without an answer
            text, ran = _run_tool(tools, call, images[i])
            (run.calls if ran else run.refused).append(call.name)
            run.messages.append({"role": "user", "content": tool_response(text)})
            still.append(i)
        active = still
    return runs


def chat_responder(model, tokenizer, processor=None, batch_size: int = 16, **gen) -> Respond:
    """A `Respond` that answers with a chat model (`polymodal.infer.chat.chat_batch`, greedy by default)."""
    from polymodal.infer.chat import chat_batch

    def respond(conversations: Sequence[Conversation]) -> list[str]:
        return chat_batch(model, tokenizer, [(m, imgs) for m, imgs in conversations], processor=processor,
                          batch_size=batch_size, **gen)

    return respond


def world_tools() -> dict[str, Tool]:
    """The world's tools: "detect" lists the objects of the conversation's last image (exact scorer)."""
    def detect(images: list) -> str:
        if not images:
            return "error: there is no image to look at"
        return detect_objects(images[-1])

    return {DETECT: detect}


def in_context_messages(shots: Sequence[tuple[str, str]], question: str) -> list[dict]:
    """A multi-image in-context chat (M-ICL): each (question, answer) shot as a user turn with its
    own image and the assistant's answer, then the question with its image. Pass the shots'
    images, then the question's, in that order."""
    messages: list[dict] = []
    for shot_question, shot_answer in shots:
        messages += [{"role": "user", "content": f"{IMAGE_MARKER}\n{shot_question}"},
                     {"role": "assistant", "content": shot_answer}]
    return messages + [{"role": "user", "content": f"{IMAGE_MARKER}\n{question}"}]
