"""Parity of imported BLIP-2 / InstructBLIP folders against transformers.

The released BLIP-2 checkpoints use OPT or Flan-T5; polymodal's LM is Llama-style, so the tiny
configs here use a Llama `text_config` (transformers builds it with AutoModelForCausalLM).
"""
from __future__ import annotations

import json

import pytest
import torch
from interop_parity import max_abs_diff, randomize_
from safetensors.torch import load_file, save_file
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    LlamaConfig,
)

import polymodal
from polymodal.checkpoint import CheckpointMismatchError
from polymodal.interop import import_hf
from polymodal.models.mmllm import MultimodalLM

TOL = 1e-4
VOCAB, IMAGE_TOKEN, QUERIES = 96, 95, 4
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
QFORMER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               encoder_hidden_size=32, vocab_size=50, max_position_embeddings=16)
TEXT = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
# InstructBLIP runs with qkv_bias=False in its vision tower to cover both bias layouts.
KINDS = {
    "blip-2": (Blip2Config, Blip2ForConditionalGeneration, True),
    "instructblip": (InstructBlipConfig, InstructBlipForConditionalGeneration, False),
}


def _hf_model(kind: str):
    config_cls, model_cls, qkv_bias = KINDS[kind]
    config = config_cls(vision_config={**VISION, "qkv_bias": qkv_bias}, qformer_config=QFORMER,
                        text_config=LlamaConfig(**TEXT).to_dict(), num_query_tokens=QUERIES,
                        image_token_index=IMAGE_TOKEN)
    torch.manual_seed(0)
    model = randomize_(model_cls(config))
    # BERT-style `LayerNorm` scales escape randomize_'s lower-case "norm" test: draw them around 1 too.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.copy_(1 + 0.15 * torch.randn(p.shape, generator=gen))
    return model


def _inputs() -> dict:
    """Plain (B, T) ids with one image's query placeholders per row, pixels and an instruction."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, IMAGE_TOKEN, (2, QUERIES + 6), generator=gen)
    ids[:, 1:1 + QUERIES] = IMAGE_TOKEN
    return {
        "input_ids": ids,
        "pixel_values": torch.randn(2, 3, 32, 32, generator=gen),
        "qformer_input_ids": torch.randint(0, QFORMER["vocab_size"], (2, 5), generator=gen),
        "qformer_attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
    }


def _run(model, kind: str, inputs: dict) -> torch.Tensor:
    kwargs = dict(inputs) if kind == "instructblip" else {k: inputs[k] for k in ("input_ids", "pixel_values")}
    with torch.no_grad():
        if isinstance(model, MultimodalLM):
            return model(kwargs.pop("input_ids"), kwargs.pop("pixel_values"), **kwargs).logits
        return model(**kwargs).logits


@pytest.fixture(scope="module", params=list(KINDS))
def blip(request, tmp_path_factory):
    """(kind, transformers model, its save_pretrained folder)."""
    hf = _hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, folder


def test_blip2_logits_match_transformers(blip):
    kind, hf, folder = blip
    loaded = polymodal.load(folder)
    ours = loaded.model
    assert isinstance(ours, MultimodalLM) and loaded.tokenizer is None
    assert ours.config.projector.kind == "qformer" and ours.image_tokens == QUERIES
    assert ours.config.projector.instruction_aware == (kind == "instructblip")
    assert [layer.cross_attn is not None for layer in ours.projector.layers] == [True, False, True]
    inputs = _inputs()
    ref = _run(hf, kind, inputs)
    got = _run(ours, kind, inputs)
    assert got.shape == (2, inputs["input_ids"].shape[1], VOCAB)
    assert ref.std() > 0.1
    assert max_abs_diff(got, ref) <= TOL
    assert max_abs_diff(_run(ours, kind, {**inputs, "pixel_values": -inputs["pixel_values"]}), got) > 1e-2


def test_instructblip_instruction_changes_the_queries(tmp_path):
    kind = "instructblip"
    hf = _hf_model(kind)
    hf.save_pretrained(tmp_path)
    ours, _ = import_hf(tmp_path)
    assert not any(name.endswith("qkv.bias") for name in load_file(str(tmp_path / "model.safetensors")))
    inputs = _inputs()
    other = {**inputs, "qformer_input_ids": (inputs["qformer_input_ids"] + 1) % QFORMER["vocab_size"]}
    assert max_abs_diff(_run(ours, kind, other), _run(ours, kind, inputs)) > 1e-3
    assert max_abs_diff(_run(ours, kind, other), _run(hf, kind, other)) <= TOL


def test_blip2_ignores_unused_qformer_text_ffn(tmp_path):
    """Some BLIP-2 saves hold a text feed-forward per Q-Former layer; it never runs without text."""
    hf = _hf_model("blip-2")
    hf.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["qformer.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(64, 32)
    tensors["qformer.encoder.layer.0.output.LayerNorm.weight"] = torch.ones(32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ours, _ = import_hf(tmp_path)
    inputs = _inputs()
    assert max_abs_diff(_run(ours, "blip-2", inputs), _run(hf, "blip-2", inputs)) <= TOL


def _rewrite_config(folder, tmp_path, edit) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())


def test_blip2_unsupported_configs_name_the_field(blip, tmp_path):
    _, _, folder = blip
    _rewrite_config(folder, tmp_path, lambda c: c["text_config"].update(model_type="opt"))
    with pytest.raises(ValueError, match="text_config.model_type 'opt'"):
        import_hf(tmp_path)
    _rewrite_config(folder, tmp_path, lambda c: c.pop("image_token_index"))
    with pytest.raises(ValueError, match="image_token_index"):
        import_hf(tmp_path)
    _rewrite_config(folder, tmp_path, lambda c: c["qformer_config"].update(encoder_hidden_size=48))
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        import_hf(tmp_path)


def test_blip2_weight_errors_name_the_tensor(blip, tmp_path):
    _, _, folder = blip
    tensors = load_file(str(folder / "model.safetensors"))
    tensors.pop("qformer.encoder.layer.2.crossattention.attention.key.weight")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="layer.2.crossattention.attention.key.weight"):
        import_hf(tmp_path)


def test_blip2_greedy_generation_matches_transformers(tmp_path):
    hf = _hf_model("blip-2")
    hf.save_pretrained(tmp_path)
    ours, _ = import_hf(tmp_path)
    inputs = _inputs()
    ids = inputs["input_ids"]
    ref = hf.generate(pixel_values=inputs["pixel_values"], input_ids=ids, max_new_tokens=5, do_sample=False)
    got = ours.generate([row.tolist() for row in ids], inputs["pixel_values"], max_new_tokens=5)
    assert got == ref[:, ids.shape[1]:].tolist()
