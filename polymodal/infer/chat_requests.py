"""`polymodal chat --batch`: read a JSONL file of chat requests, answer them, write one line per request.

Input, one JSON object per line (blank lines are skipped):
    {"messages": [{"role": ..., "content": ...}, ...], "images": ["a.png", ...]}   or
    {"prompt": "...", "image": "a.png"}
each with an optional "id" that is copied to its answer.

The file is untrusted input, its image paths above all: they are read relative to the batch
file's folder and must stay inside the image root (default: that same folder). A path outside
it (absolute, `../`, a symlink pointing out) is refused by its text before the filesystem is
asked, and with the same message whether or not the file exists, so a batch cannot probe or
read files elsewhere (the rule of `polymodal.data.image.resolve_under`).

Output, one line per request, in order:
    {"index": i, "line": n, ["id": ...,] "answer": "..."}   or   {"index": i, "line": n, ["id": ...,] "error": "..."}
A bad request (bad JSON or fields, an image outside the root, missing or undecodable, a prompt
too long for the model) gets an error line and the others are still answered.
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from polymodal.errors import DataError, PolymodalError
from polymodal.infer.chat import encode_chat, fit_chat_prompt, generate_replies
from polymodal.infer.generate import DEFAULT_MAX_NEW_TOKENS
from polymodal.infer.limits import ContextWarning

REQUEST_ROLES = ("system", "user", "assistant")


@dataclass
class BatchRequest:
    """One request of a batch file.

    index: its place among the requests (0-based, blank lines skipped); line: its line (1-based).
    messages / images: the chat and its image files (resolved, inside the image root).
    id: the request's "id", copied to the answer. error: why it cannot be answered, or None.
    """

    index: int
    line: int
    messages: list[dict] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    id: object = None
    error: str | None = None


def resolve_request_image(path: str, base: str | Path, root: str | Path) -> Path:
    """The image file `path` names, relative to `base` (the batch file's folder), checked to lie inside `root`.

    Raises `DataError` for a path outside `root` without touching it when its text already leads
    outside; a path inside by its text is resolved (symlinks followed) and checked again.
    """
    root_abs = Path(os.path.abspath(root))
    root_real = root_abs.resolve()
    joined = Path(os.path.abspath(base)) / path  # an absolute `path` replaces `base`
    lexical = Path(os.path.normpath(joined))
    outside = DataError(f"image {path!r} is outside the image root {root_abs} (see --image-root)")
    if not (lexical.is_relative_to(root_abs) or lexical.is_relative_to(root_real)):
        raise outside
    full = joined.resolve()
    if not full.is_relative_to(root_real):
        raise outside
    return full


def parse_request(text: str) -> tuple[list[dict], list[str], object]:
    """One request line -> (messages, image paths as written, id or None); `DataError` says what is wrong."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    if isinstance(record, list):
        raise DataError("expects JSONL (one JSON object per line), got a JSON array")
    if not isinstance(record, dict):
        raise DataError(f"expects a JSON object, got {type(record).__name__} {record!r}")
    rid = record.get("id")
    if isinstance(record.get("messages"), list):
        messages, images = record["messages"], record.get("images", [])
        if not messages:
            raise DataError("'messages' is empty")
        for i, message in enumerate(messages):
            if not (isinstance(message, dict) and message.get("role") in REQUEST_ROLES
                    and isinstance(message.get("content"), str)):
                raise DataError(f"messages[{i}] must be an object with a 'role' ({', '.join(REQUEST_ROLES)}) and "
                                f"a string 'content', got {message!r}")
        if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
            raise DataError(f"'images' must be a list of file paths, got {images!r}")
    elif isinstance(record.get("prompt"), str):
        messages, image = [{"role": "user", "content": record["prompt"]}], record.get("image")
        if image is not None and not (isinstance(image, str) and image):
            raise DataError(f"'image' must be a file path, got {image!r}")
        images = [image] if image else []
    else:
        raise DataError("expected an object with 'messages' (+ 'images') or 'prompt' (+ 'image')")
    return messages, images, rid


def read_requests(path: str | Path, image_root: str | Path | None = None) -> list[BatchRequest]:
    """The requests of a JSONL batch file; image paths resolved under `image_root` (default: the file's folder).

    A request that cannot be answered carries its `error`; the file as a whole fails only when it
    cannot be read or holds a JSON array instead of JSON Lines (`DataError` naming the file).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    if text.lstrip().startswith("["):
        try:
            is_array = isinstance(json.loads(text), list)
        except json.JSONDecodeError:
            is_array = False
        if is_array:
            raise DataError(f"{path}: expects JSONL (one JSON object per line), got a JSON array")
    root = image_root if image_root is not None else path.parent
    requests = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        request = BatchRequest(index=len(requests), line=number)
        requests.append(request)
        try:
            request.messages, images, request.id = parse_request(line)
            request.images = [resolve_request_image(image, path.parent, root) for image in images]
        except DataError as err:
            request.error = str(err)
    return requests


def _record(request: BatchRequest, **result) -> dict:
    """The output line of one request: index, line, id (when it has one) and `result`."""
    return {"index": request.index, "line": request.line, **({"id": request.id} if request.id is not None else {}),
            **result}


def answer_requests(model, tokenizer, requests: Sequence[BatchRequest], batch_size: int = 8,
                    on_progress: Callable[[int], None] | None = None, **gen) -> list[dict]:
    """Answer every request without an error, `batch_size` at a time; returns one output record per request, in order.

    A request whose images cannot be read or whose prompt does not fit the model gets an error
    record; the rest of its batch is still answered. gen: as `polymodal.infer.chat.generate_replies`.
    on_progress(n): called after each batch with the number of requests it handled.
    """
    records = {r.index: _record(r, error=r.error) for r in requests if r.error is not None}
    todo = [r for r in requests if r.error is None]
    max_new, truncate = gen.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS), gen.get("truncate", False)
    for start in range(0, len(todo), batch_size):
        chunk, prompts, answered = todo[start:start + batch_size], [], []
        for request in chunk:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", ContextWarning)
                    prompts.append(fit_chat_prompt(model, encode_chat(model, tokenizer, request.messages,
                                                                      request.images), max_new, truncate))
                answered.append(request)
            except (PolymodalError, ValueError, OSError) as err:
                records[request.index] = _record(request, error=str(err))
            for warning in caught:  # say which request the truncation warning is about
                warnings.warn(f"line {request.line}: {warning.message}", warning.category)
        if prompts:
            for request, reply in zip(answered, generate_replies(model, tokenizer, prompts, **gen)):
                records[request.index] = _record(request, answer=reply)
        if on_progress is not None:
            on_progress(len(chunk))
    return [records[r.index] for r in requests]


def write_answers(path: str | Path, records: Sequence[dict]) -> None:
    """Write the output records as JSON Lines, atomically (a complete file or none)."""
    from polymodal.atomic import write_text_atomic

    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    write_text_atomic(path, "\n".join(lines) + ("\n" if lines else ""))
