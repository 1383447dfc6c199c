"""Checkpoints and live servers shared by the server tests (each built once per test session).

- `unified`: `configs/unified/tiny.yaml` trained for seconds: chat about images, complete, draw.
- `clip`: a random tiny dual encoder: embed.
- `slow_lm`: a random tiny text LM with a 4096-token context and no end-of-turn token, so every
  reply runs to max_tokens: for queue, timeout, disconnect and batching tests.
Servers run in this process on a free loopback port (`BackgroundServer`).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from polymodal.api import load
from polymodal.backbones.decoder import DecoderLM
from polymodal.checkpoint import save_checkpoint
from polymodal.data.world import World, world_tokenizer
from polymodal.models.lm import lm_tiny
from polymodal.models.registry import get_family
from polymodal.recipes.runner import run_recipe

from serve_helpers import API_KEY, load_slow_lm, start


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    run_recipe("configs/unified/tiny.yaml", [f"train.out_dir={root / 'unified'}"])
    tokenizer = world_tokenizer()
    clip = get_family("clip")
    clip_config = clip.tiny()
    clip_config.text.vocab_size, clip_config.text.eos_token_id = tokenizer.vocab_size, tokenizer.eos_token_id
    torch.manual_seed(0)
    save_checkpoint(clip.build(clip_config), root / "clip", tokenizer=tokenizer)
    config = lm_tiny()
    config.vocab_size, config.eos_token_id = tokenizer.vocab_size, None
    config.max_position_embeddings = 4096  # room for replies long enough to outlast a timeout or a client
    torch.manual_seed(1)
    save_checkpoint(DecoderLM(config).eval(), root / "slow_lm", tokenizer=tokenizer)
    return {"unified": root / "unified" / "final", "clip": root / "clip", "slow_lm": root / "slow_lm",
            "root": root}


@pytest.fixture(scope="session")
def loaded(checkpoints):
    """name -> (model, tokenizer)."""
    return {"unified": load(checkpoints["unified"]), "clip": load(checkpoints["clip"]),
            "slow_lm": load_slow_lm(checkpoints)}


@pytest.fixture(scope="session")
def unified_server(loaded):
    server = start(loaded, "unified")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def keyed_server(loaded, checkpoints):
    """The unified model behind an API key, with a 1 MB body limit and file:// images allowed under the test folder."""
    server = start(loaded, "unified", api_key=API_KEY, max_body_bytes=1_000_000, image_root=checkpoints["root"])
    yield server
    server.stop()


@pytest.fixture(scope="session")
def slow_server(loaded):
    server = start(loaded, "slow_lm")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def clip_server(loaded):
    server = start(loaded, "clip")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def scene() -> Image.Image:
    return World("val", image_size=16)[0].image()
