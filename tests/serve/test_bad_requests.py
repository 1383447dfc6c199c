"""Bad requests, sent raw: each gets its status and an OpenAI-style JSON error (never a traceback),
and the next good request is answered."""
from __future__ import annotations

import base64
import json

import httpx
import pytest
from PIL import Image

from serve_helpers import API_KEY, data_url, png_bytes

GOOD = {"model": "unified", "messages": [{"role": "user", "content": "What color is the circle?"}], "max_tokens": 3}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def image_request(url: str) -> dict:
    return {**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                             {"type": "text", "text": "What is this?"}]}]}


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """A 10000 x 5000 (50-megapixel) grey PNG: a few kilobytes that would decode to 50 MB."""
    return png_bytes(Image.new("L", (10_000, 5_000)))


def cases(bomb_png: bytes):
    """(name, route, body bytes or JSON, headers, status, code)."""
    too_many = image_request(data_url(Image.new("RGB", (8, 8))))
    too_many["messages"][0]["content"] = too_many["messages"][0]["content"][:1] * 5
    return [
        ("malformed JSON", "/v1/chat/completions", b'{"model": "unified", "messages": [', AUTH, 400, "invalid_json"),
        ("wrong type", "/v1/chat/completions", {**GOOD, "max_tokens": "3"}, AUTH, 422, "invalid_value"),
        ("wrong nested type", "/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": 5}]}, AUTH,
         422, "invalid_value"),
        ("unknown parameter", "/v1/chat/completions", {**GOOD, "logprobs": True}, AUTH, 422, "invalid_value"),
        ("corrupt base64", "/v1/chat/completions", image_request("data:image/png;base64,iVBORw0K!!!"), AUTH, 400,
         "invalid_image"),
        ("not an image", "/v1/chat/completions",
         image_request("data:image/png;base64," + base64.b64encode(b"GIF89a garbage").decode()), AUTH, 400,
         "invalid_image"),
        ("50-megapixel PNG", "/v1/chat/completions",
         image_request("data:image/png;base64," + base64.b64encode(bomb_png).decode()), AUTH, 400, "invalid_image"),
        ("remote URL", "/v1/chat/completions", image_request("http://127.0.0.1:1/cat.png"), AUTH, 400,
         "remote_url_refused"),
        ("file URL outside the root", "/v1/chat/completions", image_request("file:///etc/passwd"), AUTH, 400,
         "file_url_refused"),
        ("too many images", "/v1/chat/completions", too_many, AUTH, 400, "too_many_images"),
        ("prompt past the context", "/v1/chat/completions", {**GOOD, "max_tokens": 10_000}, AUTH, 400,
         "context_length_exceeded"),
        ("missing key", "/v1/chat/completions", GOOD, {}, 401, "missing_api_key"),
        ("wrong key", "/v1/chat/completions", GOOD, {"Authorization": "Bearer nope"}, 401, "invalid_api_key"),
        ("oversized body", "/v1/chat/completions", {**GOOD, "padding": "x" * 1_200_000}, AUTH, 413,
         "request_too_large"),
        ("unknown model", "/v1/chat/completions", {**GOOD, "model": "gpt-5"}, AUTH, 404, "model_not_found"),
        ("unknown route", "/v1/engines", GOOD, AUTH, 404, None),
        ("task the model lacks", "/v1/embeddings", {"model": "unified", "input": "hi"}, AUTH, 400, "unsupported_task"),
        ("non-square size", "/v1/images/generations", {"model": "unified", "prompt": "a star", "size": "16x32"}, AUTH,
         400, "invalid_value"),
        ("size the model cannot draw", "/v1/images/generations",
         {"model": "unified", "prompt": "a star", "size": "64x64"}, AUTH, 400, "unsupported_size"),
    ]


def test_each_bad_request_gets_its_status_and_the_next_good_one_is_answered(keyed_server, bomb_png):
    with httpx.Client(base_url=keyed_server.url, timeout=60) as http:
        for name, route, body, headers, status, code in cases(bomb_png):
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            response = http.post(route, content=content, headers={**headers, "Content-Type": "application/json"})
            assert response.status_code == status, (name, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, name
            assert error["code"] == code, (name, error)
            assert "Traceback" not in response.text and "File \"" not in response.text, name
            follow = http.post("/v1/chat/completions", json=GOOD, headers=AUTH)
            assert follow.status_code == 200 and follow.json()["choices"][0]["finish_reason"], name


def test_a_body_without_content_length_is_cut_at_the_limit(keyed_server):
    def chunks():
        for _ in range(30):
            yield b"x" * 100_000

    response = httpx.post(keyed_server.url + "/v1/chat/completions", content=chunks(), headers=AUTH)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_file_urls_are_read_under_the_image_root(keyed_server, checkpoints, scene):
    path = checkpoints["root"] / "scene.png"
    scene.save(path)
    ok = httpx.post(keyed_server.url + "/v1/chat/completions", json=image_request(path.as_uri()), headers=AUTH)
    assert ok.status_code == 200, ok.text
    # A readable image just outside the root: only the root check can refuse it.
    outside = checkpoints["root"].parent / f"{checkpoints['root'].name}-outside.png"
    scene.save(outside)
    link = checkpoints["root"] / "link-out.png"
    link.symlink_to(outside)
    for url in (f"file://{checkpoints['root']}/../{outside.name}", link.as_uri()):
        escape = httpx.post(keyed_server.url + "/v1/chat/completions", json=image_request(url), headers=AUTH)
        error = escape.json()["error"]
        assert escape.status_code == 400 and error["code"] == "file_url_refused", escape.text
        assert "outside the server's --image-root" in error["message"]
        assert "resolves to" not in error["message"]  # only the client's own path, not where it leads


def test_open_routes_and_a_key_on_metrics(keyed_server):
    assert httpx.get(keyed_server.url + "/health").json()["status"] == "ok"
    assert httpx.get(keyed_server.url + "/").headers["content-type"].startswith("text/html")
    assert httpx.get(keyed_server.url + "/metrics").status_code == 401
    metrics = httpx.get(keyed_server.url + "/metrics", headers=AUTH)
    assert metrics.status_code == 200 and "polymodal_queue_depth" in metrics.text
    wrong_method = httpx.get(keyed_server.url + "/v1/chat/completions", headers=AUTH)
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
