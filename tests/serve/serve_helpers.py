"""Helpers shared by the server tests (the fixtures are in conftest.py)."""
from __future__ import annotations

import base64
import io

from PIL import Image

from polymodal.api import load
from polymodal.serve import ServeConfig, create_app
from polymodal.serve.background import BackgroundServer

API_KEY = "test-key"


def load_slow_lm(checkpoints):
    """(model, tokenizer) of `slow_lm`, its tokenizer without an end-of-turn token (a reply never ends early)."""
    model, tokenizer = load(checkpoints["slow_lm"])
    tokenizer.eos_token = None
    return model, tokenizer


def start(loaded, name: str, **settings) -> BackgroundServer:
    """A started server for one of the `loaded` models (model id = its name)."""
    model, tokenizer = loaded[name]
    return BackgroundServer(create_app(model, tokenizer, ServeConfig(model_name=name, **settings))).start()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
