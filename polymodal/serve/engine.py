"""The serving engine: one worker thread owns the model; requests reach it through a bounded queue.

Why one thread: a model's forward passes cannot usefully overlap on one device, and the KV
cache, the RNGs and the batch are simplest when a single thread touches them. The asyncio side
never runs the model: it encodes a request (in a thread pool), `submit`s a job, and awaits the
job's events.

- Admission. `submit` refuses a job with `QueueFull` (the route answers 429 at once) when
  `max_queue` jobs already wait, so a burst never piles up unbounded work.
- Text jobs (chat, completions) are split into their n choices; the worker admits waiting
  choices, oldest first, whenever the running `DecodeBatch` has fewer than `max_batch` rows, and
  decodes all rows one token per step (continuous batching; `max_batch=1` decodes one choice at
  a time). Each token's text goes back to its job's asyncio queue with
  `loop.call_soon_threadsafe`.
- Call jobs (embeddings, image generation) run on the worker between two decode steps.
- Cancellation. A job whose client disconnected or whose timeout passed is marked `cancelled`:
  if still waiting it is dropped unstarted; if decoding, its rows leave the batch before the
  next forward pass, freeing their slots at once (no token is computed for them again).
- A failure inside a step fails the jobs in the batch with the error and the engine goes on.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from polymodal.serve.batch import DecodeBatch, Row
from polymodal.serve.reply import ReplyText

log = logging.getLogger("polymodal.serve")


class QueueFull(Exception):
    """The engine's queue holds `max_queue` jobs already."""


class EngineStopped(Exception):
    """The engine was shut down before the job finished."""


@dataclass(eq=False)  # jobs compare and hash by identity
class Job:
    """Work for the engine, submitted from the event loop; results come back as events on `events`."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def emit(self, event: tuple) -> None:
        """Deliver an event to the job's asyncio queue (safe from any thread)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        """Stop the job: it is dropped from the queue or leaves the batch before the next step."""
        self.cancelled = True


@dataclass(eq=False)
class TextJob(Job):
    """A prompt to continue n times. Events: ("delta", choice, text), ("done", choice, reason,
    tokens) with reason "stop" (eos or a stop sequence) or "length", and ("error", exception);
    choice counts from `first`. Several jobs of one request may share one `events` queue."""

    ids: list[int] = field(default_factory=list)
    pixels: torch.Tensor | None = None
    n: int = 1
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stops: tuple[str, ...] = ()
    seed: int | None = None
    first: int = 0  # the index of choice 0 in the response (a request may hold several jobs)
    admitted: int = 0  # choices handed to the batch so far


@dataclass(eq=False)
class CallJob(Job):
    """A function of (model, tokenizer) run on the worker. Events: ("result", value) or ("error", exception)."""

    fn: Callable[[Any, Any], Any] = None


class Engine:
    """The worker thread, its queue and its decode batch (see the module docstring).

    eos: token ids that end a choice; suppress: ids never generated.
    """

    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 64, eos: set[int] | None = None,
                 suppress: tuple[int, ...] = ()):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.eos = set(eos or ())
        self.batch = DecodeBatch(model, suppress)
        self._pending: collections.deque[Job] = collections.deque()
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="polymodal-serve-engine", daemon=True)

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def close(self) -> None:
        """Stop the worker; jobs still waiting or decoding get ("error", EngineStopped)."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for the worker (not yet fully admitted to the batch)."""
        return len(self._pending)

    @property
    def active_rows(self) -> int:
        """Choices being decoded right now."""
        return len(self.batch)

    def submit(self, job: Job) -> None:
        """Queue a job, or raise `QueueFull` when `max_queue` jobs already wait (EngineStopped after close)."""
        with self._wake:
            if self._stopped:
                raise EngineStopped("the server is shutting down")
            self._pending = collections.deque(j for j in self._pending if not j.cancelled)  # gone clients free slots
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are already waiting (--max-queue {self.max_queue})")
            self._pending.append(job)
            self._wake.notify()

    # --- the worker thread ---

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self._pending and not len(self.batch):
                    self._wake.wait()
                if self._stopped:
                    break
                call, rows = self._take()
            if call is not None:
                self._call(call)
            if rows:
                self._admit(rows)
            if len(self.batch):
                self._step()
        self._fail_everything(EngineStopped("the server is shutting down"))

    def _take(self) -> tuple[CallJob | None, list[Row]]:
        """(the oldest call job, rows of the oldest text jobs that fit the batch); under the lock."""
        call, rows = None, []
        free = self.max_batch - len(self.batch)
        for job in list(self._pending):
            if job.cancelled:
                self._pending.remove(job)
            elif isinstance(job, CallJob):
                if call is None:
                    call = job
                    self._pending.remove(job)
            elif free > 0:
                while free > 0 and job.admitted < job.n:
                    rows.append(self._row(job, job.admitted))
                    job.admitted += 1
                    free -= 1
                if job.admitted == job.n:
                    self._pending.remove(job)
        return call, rows

    def _row(self, job: TextJob, choice: int) -> Row:
        generator = None
        if job.temperature > 0:
            # Choice i of a seeded request always draws from the same stream, whatever shares its batch.
            seed = (job.seed if job.seed is not None else secrets.randbits(62)) + choice
            generator = torch.Generator(device=self.batch.device).manual_seed(seed % 2**63)
        return Row(job.ids, job.pixels, job.max_tokens, job.temperature, job.top_k, job.top_p, generator,
                   owner=(job, job.first + choice, ReplyText(self.tokenizer, job.stops)))

    def _call(self, job: CallJob) -> None:
        try:
            job.emit(("result", job.fn(self.model, self.tokenizer)))
        except Exception as err:  # the route turns it into the right status
            job.emit(("error", err))

    def _admit(self, rows: list[Row]) -> None:
        try:
            self.batch.add(rows)
        except Exception as err:
            log.exception("prefill failed")
            for job in {row.owner[0] for row in rows}:
                job.emit(("error", err))

    def _step(self) -> None:
        rows = self.batch.rows
        try:
            tokens = self.batch.sample()
            keep = [self._take_token(row, token) for row, token in zip(rows, tokens)]
            self.batch.advance(tokens, keep)
        except Exception as err:
            log.exception("decode step failed")
            for job in {row.owner[0] for row in rows}:
                job.emit(("error", err))
            self.batch.clear()

    def _take_token(self, row: Row, token: int) -> bool:
        """Give a row its sampled token; True while the row goes on."""
        job, choice, reply = row.owner
        if job.cancelled:
            return False
        row.count += 1
        delta, stopped = reply.push(token)
        reason = "stop" if stopped or token in self.eos else ("length" if row.count >= row.limit else None)
        if reason is not None and not stopped:
            delta += reply.finish()
        if delta:
            job.emit(("delta", choice, delta))
        if reason is not None:
            job.emit(("done", choice, reason, row.count))
        return reason is None

    def _fail_everything(self, err: Exception) -> None:
        with self._wake:
            jobs = list(self._pending) + [row.owner[0] for row in self.batch.rows]
            self._pending.clear()
        self.batch.clear()
        for job in set(jobs):
            job.emit(("error", err))
