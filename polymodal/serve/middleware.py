"""The gate every request passes, as one ASGI middleware (outside the routes, inside uvicorn):

1. the API key, when set, on /v1 routes and /metrics (401 before the body is read);
2. the body size: a Content-Length over the limit is refused unread, and a body sent without one
   is counted as it arrives and refused once it passes the limit (413); the body is buffered
   (at most the limit) and replayed to the route;
3. any exception a route lets escape: logged with its traceback, answered as a JSON 500;
4. afterwards, one JSON log line per request (id, route, status, milliseconds, token and image
   counts, the error message) and the Prometheus counters.
"""
from __future__ import annotations

import hmac
import json
import logging
import time
import uuid

from polymodal.serve.errors import error_body
from polymodal.serve.metrics import ServerMetrics

access_log = logging.getLogger("polymodal.serve.requests")
log = logging.getLogger("polymodal.serve")

ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
          "/v1/images/generations")
LOGGED_STATE = ("model", "user", "prompt_tokens", "completion_tokens", "images", "stream", "error")


def route_label(path: str) -> str:
    """The metrics label of a path: the route it belongs to, or "other"."""
    if path in ROUTES:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


def needs_key(path: str) -> bool:
    """Whether a path is behind the API key (the API and the metrics; the page and /health are open)."""
    return path.startswith("/v1/") or path == "/v1" or path == "/metrics"


class Gate:
    """ASGI middleware doing the four jobs of the module docstring."""

    def __init__(self, app, metrics: ServerMetrics, api_key: str | None, max_body_bytes: int):
        self.app, self.metrics = app, metrics
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id = uuid.uuid4().hex[:16]
        status = [0]

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is None:
                body, refusal = await self._read_body(scope, receive)
            if refusal is not None:
                state["error"] = refusal[1]
                await _send_error(send_logged, *refusal)
            else:
                await self.app(scope, _replay(body, receive), send_logged)
        except Exception:
            log.exception("request %s failed", request_id)
            state["error"] = "internal server error"
            if not status[0]:
                await _send_error(send_logged, 500, f"internal server error (request {request_id}); see the server log",
                                  "internal_error")
        finally:
            self._record(scope, status[0] or 500, time.perf_counter() - started)

    def _refusal(self, scope) -> tuple[int, str, str] | None:
        """(status, message, code) when the headers alone refuse the request."""
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and needs_key(scope["path"]):
            given = headers.get(b"authorization", b"")
            if not given:
                return 401, "missing API key: send the header Authorization: Bearer <key>", "missing_api_key"
            scheme, _, key = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self.api_key):
                return 401, "incorrect API key provided", "invalid_api_key"
        length = headers.get(b"content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                return 400, "the Content-Length header is not a number", "invalid_content_length"
            if size > self.max_body_bytes:
                return 413, self._too_large(size), "request_too_large"
        return None

    def _too_large(self, size: int | None) -> str:
        got = f"{size} bytes" if size is not None else f"over {self.max_body_bytes} bytes"
        return f"the request body is {got}; this server accepts at most {self.max_body_bytes} bytes (--max-body-mb)"

    async def _read_body(self, scope, receive) -> tuple[bytes, tuple | None]:
        """The whole body, read up to the limit; a refusal once it passes the limit."""
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return b"", None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", (413, self._too_large(None), "request_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    def _record(self, scope, status: int, seconds: float) -> None:
        state = scope.get("state", {})
        route = route_label(scope["path"])
        self.metrics.observe(route, status, seconds)
        line = {"request": state.get("request_id"), "method": scope["method"], "path": scope["path"],
                "status": status, "ms": round(seconds * 1000, 1),
                "client": (scope.get("client") or ("?",))[0]}
        line.update({key: state[key] for key in LOGGED_STATE if state.get(key) is not None})
        access_log.info(json.dumps(line, ensure_ascii=False))


def _replay(body: bytes, receive):
    """A receive() that gives the buffered body once, then whatever the client sends next (a disconnect)."""
    sent = [False]

    async def replay():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_error(send, status: int, message: str, code: str) -> None:
    payload = json.dumps(error_body(status, message, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
