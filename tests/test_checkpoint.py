"""polymodal checkpoint folders: round trip, tied weights, atomic replacement, clear errors."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

import polymodal.checkpoint as ckpt
from polymodal.checkpoint import (
    CheckpointMismatchError,
    NotACheckpointError,
    load_checkpoint,
    load_state_dict_checked,
    save_checkpoint,
)
from polymodal.models.registry import Family, register

FAMILY = "test_tiny_tied_ckpt"


@dataclass
class TiedConfig:
    vocab: int = 7
    dim: int = 6
    blocks: tuple[int, ...] = (6,)


class TiedLM(nn.Module):
    """Embedding -> Linear stack -> head tied to the embedding. ids (B, T) -> logits (B, T, V)."""

    family = FAMILY

    def __init__(self, config: TiedConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab, config.dim)
        self.layers = nn.ModuleList(nn.Linear(config.dim, width) for width in config.blocks)
        self.register_buffer("scale", torch.tensor(0.5))
        self.lm_head = nn.Linear(config.blocks[-1], config.vocab, bias=False)
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)  # (B, T, C)
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.lm_head(x * self.scale)  # (B, T, V)


register(Family(name=FAMILY, config_cls=TiedConfig, build=TiedLM, tiny=TiedConfig,
                example_batch=lambda model: {"ids": torch.randint(0, model.config.vocab, (2, 4))}))

IDS = torch.tensor([[1, 2, 3, 4], [6, 5, 0, 2]])


def _model(seed: int) -> TiedLM:
    torch.manual_seed(seed)
    return TiedLM(TiedConfig())


def test_round_trip_gives_same_outputs_and_keeps_ties(tmp_path):
    model = _model(0)
    folder = save_checkpoint(model, tmp_path / "ckpt", extra={"note": "hi"})
    meta = json.loads((folder / "config.json").read_text())
    assert meta == {"format": "polymodal", "version": 1, "family": FAMILY,
                    "config": {"vocab": 7, "dim": 6, "blocks": [6]}, "extra": {"note": "hi"}}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert "embed_tokens.weight" in stored and "lm_head.weight" not in stored  # shared tensor stored once
    loaded, tokenizer = load_checkpoint(folder)
    assert tokenizer is None and not loaded.training
    assert loaded.config == model.config and isinstance(loaded.config.blocks, tuple)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert torch.equal(loaded(IDS), model(IDS))
    half, _ = load_checkpoint(folder, dtype=torch.bfloat16)
    assert half.layers[0].weight.dtype == torch.bfloat16


def test_tokenizer_round_trip(tmp_path):
    from polymodal.tokenizers.text import TextTokenizer

    texts = ["a red circle", "a blue square", "two red circles"] * 4
    tokenizer = TextTokenizer.train_bpe(texts, vocab_size=270, special_tokens=["<|endoftext|>"])
    folder = save_checkpoint(_model(0), tmp_path / "ckpt", tokenizer=tokenizer)
    assert (folder / "tokenizer.json").is_file()
    _, loaded = load_checkpoint(folder)
    assert isinstance(loaded, TextTokenizer)
    assert loaded.encode("a red square") == tokenizer.encode("a red square")
    assert loaded.eos_token == "<|endoftext|>"


def test_failed_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    save_checkpoint(_model(0), folder)
    real_save = ckpt.save_file

    def save_then_die(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", save_then_die)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_model(1), folder)
    loaded, _ = load_checkpoint(folder)
    assert torch.equal(loaded(IDS), _model(0)(IDS))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folder left behind


def test_crash_between_renames_is_recovered(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    save_checkpoint(_model(0), folder)
    real_rename = os.rename
    calls = []

    def rename_once_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies after moving the old folder aside
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_once_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_model(1), folder)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not folder.exists()
    loaded, _ = load_checkpoint(folder)  # found aside as .ckpt.old-*
    assert torch.equal(loaded(IDS), _model(0)(IDS))
    save_checkpoint(_model(2), folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert torch.equal(load_checkpoint(folder)[0](IDS), _model(2)(IDS))


def test_mismatch_error_names_tensors_and_shapes(tmp_path):
    folder = save_checkpoint(_model(0), tmp_path / "ckpt")
    wider = TiedLM(TiedConfig(dim=6, blocks=(6, 6)))
    state = ckpt.read_weights(folder)
    state["extra.bias"] = torch.zeros(2)
    state["layers.0.weight"] = torch.zeros(6, 5)
    with pytest.raises(CheckpointMismatchError) as info:
        load_state_dict_checked(wider, state, source="somewhere/model.safetensors")
    message = str(info.value)
    assert "somewhere/model.safetensors" in message
    assert "missing keys (2): layers.1.weight, layers.1.bias" in message
    assert "unexpected keys (1): extra.bias" in message
    assert "layers.0.weight: checkpoint (6, 5) vs model (6, 6)" in message
    assert isinstance(info.value, ValueError)


def test_tied_alias_is_not_missing():
    model = _model(0)
    state = {k: v for k, v in _model(3).state_dict().items() if k != "lm_head.weight"}
    load_state_dict_checked(model, state, source="test")
    assert torch.equal(model.lm_head.weight, state["embed_tokens.weight"])


def test_not_a_checkpoint_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotACheckpointError, match=r"empty is not a polymodal checkpoint: it lacks config\.json"):
        load_checkpoint(tmp_path / "empty")
    with pytest.raises(NotACheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    folder = save_checkpoint(_model(0), tmp_path / "ckpt")
    (folder / "config.json").write_text(json.dumps({"format": "hf"}))
    with pytest.raises(NotACheckpointError, match="format"):
        load_checkpoint(folder)
    with pytest.raises(TypeError, match="family"):
        save_checkpoint(nn.Linear(2, 2), tmp_path / "plain")
