"""OpenAI's response objects, and the waiting for a request's engine events that fills them.

`collect` waits for every choice of a request's jobs and returns the texts (non-streaming);
`stream_events` yields the events one by one (streaming). Both enforce the request's deadline
(504) and cancel the jobs however they end: a timeout, an error, a client gone (the caller's
task cancelled, or `disconnected()` true while waiting), so the engine frees their slots.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from polymodal.errors import PolymodalError
from polymodal.serve.engine import EngineStopped, Job
from polymodal.serve.errors import APIError

POLL_S = 0.5  # how often a non-streaming wait checks that its client is still there


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


@dataclass
class Choice:
    """One finished (or cut short) choice."""

    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0


@dataclass
class Usage:
    """OpenAI's token counts."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def json(self) -> dict:
        """OpenAI's `usage` object, with the total."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass
class Reply:
    """What a text request produced: its choices by index, in order."""

    choices: list[Choice] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        """Tokens generated over every choice."""
        return sum(choice.tokens for choice in self.choices)


def as_api_error(err: BaseException) -> APIError:
    """The status an engine error maps to: ours as is, a user error 400, a shutdown 503, a bug 500."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, EngineStopped):
        return APIError(503, str(err), None, "shutting_down")
    if isinstance(err, PolymodalError):
        return APIError(400, str(err), None, "invalid_value")
    return APIError(500, f"internal server error: {type(err).__name__}; see the server log", None, "internal_error")


async def stream_events(jobs: list[Job], queue: asyncio.Queue, choices: int, deadline: float,
                        disconnected: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[tuple]:
    """Yield the jobs' events until `choices` choices are done (or one call's result arrives)."""
    remaining = choices
    next_check = time.monotonic() + POLL_S
    try:
        while remaining:
            left = deadline - time.monotonic()
            if left <= 0:
                raise APIError(504, "the request timed out before the model finished (the server's --timeout); "
                               "try a smaller max_tokens or n", None, "timeout")
            try:
                event = await asyncio.wait_for(queue.get(), min(left, POLL_S) if disconnected else left)
            except asyncio.TimeoutError:
                event = None
            # Checked on a clock, not only when no token comes: tokens may arrive every few milliseconds.
            if disconnected is not None and time.monotonic() >= next_check:
                next_check = time.monotonic() + POLL_S
                if await disconnected():
                    raise ClientGone
            if event is None:
                continue
            if event[0] == "error":
                raise as_api_error(event[1])
            if event[0] in ("done", "result"):
                remaining -= 1
            yield event
    finally:
        for job in jobs:
            job.cancel()


async def collect(jobs: list[Job], queue: asyncio.Queue, choices: int, deadline: float,
                  disconnected: Callable[[], Awaitable[bool]] | None = None) -> Reply:
    """Every choice's text, finish reason and token count."""
    reply = Reply([Choice() for _ in range(choices)])
    async for event in stream_events(jobs, queue, choices, deadline, disconnected):
        if event[0] == "delta":
            reply.choices[event[1]].text += event[2]
        elif event[0] == "done":
            reply.choices[event[1]].finish_reason, reply.choices[event[1]].tokens = event[2], event[3]
    return reply


async def call_result(job: Job, deadline: float, disconnected: Callable[[], Awaitable[bool]] | None = None):
    """The value a call job returned (its error raised as an `APIError`)."""
    async for event in stream_events([job], job.events, 1, deadline, disconnected):
        return event[1]


def new_id(prefix: str) -> str:
    """An OpenAI-style object id."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_completion(model: str, reply: Reply, usage: Usage) -> dict:
    """A `chat.completion` object."""
    choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                "finish_reason": c.finish_reason} for i, c in enumerate(reply.choices)]
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage.json(), "system_fingerprint": None}


def text_completion(model: str, reply: Reply, usage: Usage) -> dict:
    """A `text_completion` object."""
    choices = [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
               for i, c in enumerate(reply.choices)]
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage.json()}


def chat_chunk(ident: str, created: int, model: str, index: int, delta: dict, finish_reason: str | None) -> dict:
    """A `chat.completion.chunk` with one choice's delta."""
    return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def completion_chunk(ident: str, created: int, model: str, index: int, text: str, finish_reason: str | None) -> dict:
    """A streamed `text_completion` piece of one choice."""
    return {"id": ident, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def sse(payload: dict | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"
