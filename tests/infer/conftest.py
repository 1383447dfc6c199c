"""Tiny models and checkpoints shared by the inference tests (built once per test session)."""
import argparse
import io

import pytest
import torch

from polymodal.backbones.decoder import DecoderLM
from polymodal.checkpoint import save_checkpoint
from polymodal.data.world import World, world_tokenizer
from polymodal.models.lm import lm_tiny
from polymodal.models.mmllm import MultimodalLM, mmllm_tiny_for
from polymodal.models.registry import get_family


@pytest.fixture(scope="session")
def tokenizer():
    return world_tokenizer()


@pytest.fixture(scope="session")
def mm_model(tokenizer):
    torch.manual_seed(0)
    return MultimodalLM(mmllm_tiny_for(tokenizer)).eval()


@pytest.fixture(scope="session")
def files(tmp_path_factory, mm_model, tokenizer):
    """One folder: checkpoints mm (mmllm), lm (text-only), clip (embed only), bare_lm (no tokenizer),
    and two scene images scene0.png, scene1.png."""
    root = tmp_path_factory.mktemp("infer")
    save_checkpoint(mm_model, root / "mm", tokenizer=tokenizer)
    lm_config = lm_tiny()
    lm_config.vocab_size, lm_config.eos_token_id = tokenizer.vocab_size, tokenizer.eos_token_id
    torch.manual_seed(1)
    lm = DecoderLM(lm_config).eval()
    save_checkpoint(lm, root / "lm", tokenizer=tokenizer)
    save_checkpoint(lm, root / "bare_lm")
    clip = get_family("clip")
    save_checkpoint(clip.build(clip.tiny()), root / "clip", tokenizer=tokenizer)
    for k, scene in enumerate(World("val").scenes(2)):
        scene.image().save(root / f"scene{k}.png")
    return root


@pytest.fixture(scope="session")
def run_chat():
    """run_chat(argv, stdin=None): `polymodal chat ARGV` through its own parser and handler -> (stdout, stderr)."""
    from polymodal.infer.chat_cli import add_cli, run_chat_cli

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command", required=True))

    def run(argv, stdin=None):
        out, err = io.StringIO(), io.StringIO()
        run_chat_cli(parser.parse_args(["chat", *argv]), stdin=stdin, out=out, err=err)
        return out.getvalue(), err.getvalue()

    return run
