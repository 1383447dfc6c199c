"""OpenAI-style errors: every failure a client sees is `{"error": {"message", "type", "param", "code"}}`.

Statuses, and what each means here:
    400 invalid_request_error   well-formed but unservable: malformed JSON, a corrupt or oversized
                                image, a remote image URL, a prompt longer than the context, a task
                                the model does not declare
    401 authentication_error    missing or wrong Bearer key
    404 not_found_error         unknown route or model
    405 invalid_request_error   a known route with the wrong method
    413 invalid_request_error   a body over the size limit
    422 invalid_request_error   a body that does not fit the schema: wrong types, missing or unknown
                                fields, values out of range (the param names the field)
    429 rate_limit_error        the queue is full; retry later
    500 server_error            a bug: logged with its traceback, never sent to the client
    504 timeout_error           no answer within the server's per-request timeout
"""
from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error",
               504: "timeout_error"}


class APIError(Exception):
    """An error answered to the client: HTTP status, message, and OpenAI's param / code fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        """The JSON body: {"error": {"message", "type", "param", "code"}}."""
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        """The JSON response for this error."""
        return error_response(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object for an HTTP status."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """A JSONResponse carrying `error_body`."""
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


# Location parts pydantic adds for the branch of a union it tried ('str', 'list[...]', 'function-after[...]').
_UNION_BRANCH = re.compile(r"^(str|int|float|bool|list|dict|none|literal|tagged-union|function-\w+)(\[.*\])?$")


def _location(loc: tuple) -> str | None:
    """A pydantic error location ('body', 'messages', 0, 'content', 'str') -> 'messages[0].content'."""
    parts = [p for p in loc if p != "body" and not (isinstance(p, str) and _UNION_BRANCH.match(p))]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or None


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) for FastAPI validation errors: the first problem, named by its field."""
    first = errors[0]
    param = _location(tuple(first.get("loc", ())))
    kind = first.get("type", "")
    if kind == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if kind == "extra_forbidden":
        return f"unrecognized request argument supplied: {param} (this server does not implement it)", param
    if kind == "missing":
        return f"missing required parameter: {param}", param
    # A value that fits no branch of a union gives one error per branch: say them together.
    same = [e for e in errors if _location(tuple(e.get("loc", ()))) == param]
    messages = list(dict.fromkeys(str(e.get("msg", "invalid value")).removeprefix("Value error, ") for e in same))
    message = "; or ".join(messages)
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error in OpenAI's format: ours, FastAPI's validation errors, Starlette's 404/405."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        request.state.error = exc.message
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        message, param = validation_message(errors) if errors else ("invalid request", None)
        # Malformed JSON is a 400 (nothing to validate); a body of the wrong shape is a 422.
        status = 400 if errors and errors[0].get("type") == "json_invalid" else 422
        request.state.error = message
        return error_response(status, message, param, "invalid_json" if status == 400 else "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see GET /v1/models and the README"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        request.state.error = message
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))
