"""The HTTP application: `create_app(model, tokenizer, config)` -> a FastAPI app serving one model.

Why FastAPI on Starlette + uvicorn: a maintained ASGI stack whose server streams server-sent
events and notices disconnects; pydantic validates bodies into typed requests (whose errors we
re-shape into OpenAI's format); and asyncio lets hundreds of waiting clients cost a coroutine
each while one worker thread owns the model (`polymodal.serve.engine`).

Routes: POST /v1/chat/completions (task `chat`), /v1/completions (`complete`), /v1/embeddings
(`embed`), /v1/images/generations (`generate_image`); GET /v1/models, /v1/models/{id}, /health,
/metrics and the web page at /. A route the model's tasks do not cover answers 400.
"""
from __future__ import annotations

import asyncio
import time
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from polymodal.errors import UsageError
from polymodal.infer.chat import end_of_turn_ids, is_multimodal
from polymodal.infer.limits import context_length
from polymodal.models.registry import tasks_of
from polymodal.serve import tasks as work
from polymodal.serve.config import ServeConfig
from polymodal.serve.engine import CallJob, Engine, EngineStopped, QueueFull, TextJob
from polymodal.serve.errors import APIError, error_body, install_error_handlers
from polymodal.serve.images import png_base64
from polymodal.serve.metrics import ServerMetrics
from polymodal.serve.middleware import Gate
from polymodal.serve.responses import (
    ClientGone,
    Usage,
    call_result,
    chat_chunk,
    chat_completion,
    collect,
    completion_chunk,
    new_id,
    sse,
    stream_events,
    text_completion,
)
from polymodal.serve.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ImageGenerationRequest


@dataclass
class Served:
    """What the routes share: the model, its tokenizer, settings, engine and metrics."""

    model: object
    tokenizer: object
    config: ServeConfig
    engine: Engine
    metrics: ServerMetrics
    tasks: tuple[str, ...]
    image_side: int | None
    created: int
    preparing: int = 0

    async def prepare(self, fn, *args):
        """Run request preparation (decoding images, tokenizing) in the thread pool, at most
        `max_queue` requests at a time: past that a 429 answers before any image is decoded, so a
        flood cannot hold more decoded pixels than the queue could ever admit."""
        if self.preparing >= self.config.max_queue:
            self.metrics.rejected.inc()
            raise APIError(429, f"the server is busy: {self.preparing} requests are being prepared; retry shortly",
                           None, "queue_full")
        self.preparing += 1  # the event loop is one thread: no lock needed
        try:
            return await run_in_threadpool(fn, *args)
        finally:
            self.preparing -= 1

    def check_model(self, name: str, request: Request | None = None, user: str | None = None) -> None:
        """404 unless `name` is the served model's id; notes the model and the end user for the request log."""
        if request is not None:
            request.state.model, request.state.user = name, user
        if name != self.config.model_name:
            raise APIError(404, f"the model {name!r} does not exist on this server; it serves "
                           f"{self.config.model_name!r} (GET /v1/models)", "model", "model_not_found")

    def submit(self, job) -> None:
        """Queue a job; 429 when the queue is full."""
        try:
            self.engine.submit(job)
        except QueueFull as err:
            self.metrics.rejected.inc()
            raise APIError(429, f"the server is busy: {err}; retry shortly", None, "queue_full") from err
        except EngineStopped as err:
            raise APIError(503, str(err), None, "shutting_down") from err

    def deadline(self) -> float:
        """The monotonic time by which a request submitted now must be answered (`--timeout`)."""
        return time.monotonic() + self.config.timeout_s

    def model_card(self) -> dict:
        """The /v1/models entry, with what the model can do."""
        return {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "polymodal",
                "tasks": list(self.tasks), "reads_images": is_multimodal(self.model),
                "context_length": context_length(self.model), "image_size": self.image_side}


def create_app(model, tokenizer, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving `model` (eval mode) with `tokenizer` under `config`'s limits."""
    config = config or ServeConfig()
    tasks = tuple(tasks_of(model))
    if tokenizer is None and {"chat", "complete", "embed"} & set(tasks):
        raise UsageError("the checkpoint has no tokenizer; serving its text tasks needs one (save the checkpoint "
                         "with its tokenizer, or give an HF folder with tokenizer.json)")
    model.eval()
    suppress = tuple(model.generation_suppressed_tokens()) if hasattr(model, "generation_suppressed_tokens") else ()
    engine = Engine(model, tokenizer, config.max_batch, config.max_queue, end_of_turn_ids(model, tokenizer), suppress)
    metrics = ServerMetrics(lambda: engine.queue_depth, lambda: engine.active_rows)
    side = work.native_image_side(model) if "generate_image" in tasks else None
    served = Served(model, tokenizer, config, engine, metrics, tasks, side, int(time.time()))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.close)

    app = FastAPI(title="polymodal serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served
    install_error_handlers(app)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> Response:
        request.state.error = "client disconnected"
        return Response(status_code=499)  # nobody reads it; the log line says what happened

    add_routes(app, served)
    app.add_middleware(Gate, metrics=metrics, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
    return app


def add_routes(app: FastAPI, served: Served) -> None:
    """Register every route on `app`."""
    page = resources.files("polymodal.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": served.config.model_name, "queue_depth": served.engine.queue_depth,
                "batch_rows": served.engine.active_rows}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = served.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [served.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        served.check_model(name)
        return served.model_card()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        served.check_model(body.model, request, body.user)
        work.require(served.model, "chat", "/v1/chat/completions")
        _check_n(body.n, served.config)
        prompt = await served.prepare(work.encode_chat_request, served.model, served.tokenizer, body, served.config)
        request.state.images = prompt.images or None
        jobs, queue = _text_jobs(served, body, [prompt])
        return await _answer(served, request, body, jobs, queue, len(prompt.ids), chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        served.check_model(body.model, request, body.user)
        work.require(served.model, "complete", "/v1/completions")
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        _check_n(body.n * len(texts), served.config)
        prompts = [await served.prepare(work.encode_completion_prompt, served.model, served.tokenizer, text,
                                           body.max_tokens, served.config, "prompt" if len(texts) == 1 else
                                           f"prompt[{i}]") for i, text in enumerate(texts)]
        jobs, queue = _text_jobs(served, body, prompts)
        return await _answer(served, request, body, jobs, queue, sum(len(p.ids) for p in prompts), chat=False)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> dict:
        served.check_model(body.model, request, body.user)
        work.require(served.model, "embed", "/v1/embeddings")
        items = await served.prepare(work.embedding_inputs, body, served.config)
        job = CallJob(asyncio.get_running_loop(),
                      fn=lambda model, tokenizer: work.embed_items(model, tokenizer, items, body.dimensions))
        served.submit(job)
        vectors, tokens = await call_result(job, served.deadline(), request.is_disconnected)
        served.metrics.prompt_tokens.inc(tokens)
        request.state.prompt_tokens = tokens
        data = [{"object": "embedding", "index": i, "embedding": work.embedding_json(v, body.encoding_format)}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": served.config.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/images/generations")
    async def images(body: ImageGenerationRequest, request: Request) -> dict:
        served.check_model(body.model, request, body.user)
        work.require(served.model, "generate_image", "/v1/images/generations")
        if body.n > served.config.max_image_n:
            raise APIError(400, f"n={body.n}: at most {served.config.max_image_n} images per request", "n",
                           "invalid_value")
        size = work.image_size_argument(body, served.image_side, served.model)
        job = CallJob(asyncio.get_running_loop(),
                      fn=lambda model, tokenizer: work.draw(model, tokenizer, body.prompt, body.n, body.seed, size))
        served.submit(job)
        pictures = await call_result(job, served.deadline(), request.is_disconnected)
        served.metrics.images.inc(len(pictures))
        request.state.images = len(pictures)
        encoded = await run_in_threadpool(lambda: [png_base64(p) for p in pictures])
        return {"created": int(time.time()), "data": [{"b64_json": b, "revised_prompt": None} for b in encoded],
                "output_format": "png", "size": f"{pictures[0].width}x{pictures[0].height}"}


def _check_n(choices: int, config: ServeConfig) -> None:
    if choices > config.max_n:
        raise APIError(400, f"n: at most {config.max_n} choices per request (--max-n), got {choices}", "n",
                       "invalid_value")


def _text_jobs(served: Served, body, prompts: list) -> tuple[list[TextJob], asyncio.Queue]:
    """One engine job per prompt (n choices each), all reporting to one queue; 429 when full."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    jobs = [TextJob(loop, queue, ids=p.ids, pixels=p.pixels, n=body.n, max_tokens=p.max_tokens,
                    temperature=float(body.temperature), top_k=body.top_k, top_p=float(body.top_p), stops=body.stops,
                    seed=body.seed, first=i * body.n) for i, p in enumerate(prompts)]
    submitted = []
    try:
        for job in jobs:
            served.submit(job)
            submitted.append(job)
    except APIError:
        for job in submitted:
            job.cancel()
        raise
    return jobs, queue


async def _answer(served: Served, request: Request, body, jobs: list[TextJob], queue: asyncio.Queue,
                  prompt_tokens: int, chat: bool):
    """The JSON answer, or the event stream, of submitted text jobs."""
    name, choices = served.config.model_name, sum(job.n for job in jobs)
    usage = Usage(prompt_tokens)
    request.state.prompt_tokens = prompt_tokens
    served.metrics.prompt_tokens.inc(prompt_tokens)
    if not body.stream:
        reply = await collect(jobs, queue, choices, served.deadline(), request.is_disconnected)
        usage.completion_tokens = reply.completion_tokens
        _count_completion(served, request, usage)
        return (chat_completion if chat else text_completion)(name, reply, usage)
    request.state.stream = True
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_sse(served, request, jobs, queue, choices, usage, chat, include_usage),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _sse(served: Served, request: Request, jobs, queue, choices: int, usage: Usage, chat: bool,
               include_usage: bool):
    """The server-sent events of a streamed reply, ending with `data: [DONE]`."""
    ident, created, name = new_id("chatcmpl" if chat else "cmpl"), int(time.time()), served.config.model_name
    try:
        if chat:
            for index in range(choices):
                yield sse(chat_chunk(ident, created, name, index, {"role": "assistant", "content": ""}, None))
        async with aclosing(stream_events(jobs, queue, choices, served.deadline())) as events:
            async for event in events:
                kind, index = event[0], event[1]
                if kind == "delta":
                    yield sse(chat_chunk(ident, created, name, index, {"content": event[2]}, None) if chat else
                              completion_chunk(ident, created, name, index, event[2], None))
                elif kind == "done":
                    usage.completion_tokens += event[3]
                    yield sse(chat_chunk(ident, created, name, index, {}, event[2]) if chat else
                              completion_chunk(ident, created, name, index, "", event[2]))
        if include_usage:
            yield sse({"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                       "created": created, "model": name, "choices": [], "usage": usage.json()})
    except APIError as err:  # the status line has gone: the error travels as an event
        request.state.error = err.message
        yield sse(error_body(err.status, err.message, err.param, err.code))
    finally:
        for job in jobs:  # a client gone at any point frees its rows, whatever the stream reached
            job.cancel()
        _count_completion(served, request, usage)
    yield sse("[DONE]")


def _count_completion(served: Served, request: Request, usage: Usage) -> None:
    served.metrics.completion_tokens.inc(usage.completion_tokens)
    request.state.completion_tokens = usage.completion_tokens
