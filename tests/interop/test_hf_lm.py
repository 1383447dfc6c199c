"""Parity of imported/exported Llama, Qwen2 and Mistral folders against transformers."""
from __future__ import annotations

import json

import pytest
import torch
from interop_parity import max_abs_diff, randomize_
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from polymodal.backbones.decoder import DecoderLM
from polymodal.checkpoint import CheckpointMismatchError
from polymodal.interop import detect_format, export_hf, import_hf
from polymodal.tokenizers.text import TextTokenizer

TOL = 1e-4
SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
CASES = {
    "llama_gqa": (LlamaConfig, LlamaForCausalLM, dict(rope_theta=500.0)),
    "llama_head_dim": (LlamaConfig, LlamaForCausalLM, dict(head_dim=24, num_key_value_heads=1)),
    # A large RMSNorm eps: a converter that reads the wrong key (and keeps the default) shows.
    "qwen2_bias": (Qwen2Config, Qwen2ForCausalLM, dict(rms_norm_eps=0.5)),
    "llama_tied": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True)),
    "llama3_rope": (LlamaConfig, LlamaForCausalLM, dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8})),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=None, head_dim=16)),
}


def _ids(vocab: int, batch: int = 2, length: int = 11) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=list(CASES))
def hf_case(request, tmp_path_factory):
    """(name, transformers model, its save_pretrained folder) for each architecture case."""
    config_cls, model_cls, extra = CASES[request.param]
    torch.manual_seed(0)
    hf = randomize_(model_cls(config_cls(**{**SIZES, **extra})))
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, folder


def test_import_logits_match_transformers(hf_case):
    name, hf, folder = hf_case
    ours, tokenizer = import_hf(folder)
    assert isinstance(ours, DecoderLM) and tokenizer is None
    assert ours.config.tie_word_embeddings == (name == "llama_tied")
    ids = _ids(SIZES["vocab_size"])
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids).logits
    assert ref.std() > 0.1, "reference logits are nearly constant; the parity check would be vacuous"
    assert max_abs_diff(got, ref) <= TOL


def test_left_padded_batch_matches_transformers(hf_case):
    _, hf, folder = hf_case
    ours, _ = import_hf(folder)
    ids = _ids(SIZES["vocab_size"], length=9)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # row 0: four left pads
    # HF derives no positions from the mask in forward(); give it the ones generate() would use.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert max_abs_diff(got[real], ref[real]) <= TOL


def test_export_loads_in_transformers(hf_case, tmp_path):
    name, hf, folder = hf_case
    ours, _ = import_hf(folder)
    # Shard the LLaMA export to cover the index path; the others go to one file.
    shard = 20_000 if name == "llama_gqa" else None
    out = export_hf(ours, tmp_path / "export", max_shard_bytes=shard)
    files = {p.name for p in out.iterdir()}
    assert ("model.safetensors.index.json" in files) == (shard is not None)
    assert detect_format(out) == "hf"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM" if name == "qwen2_bias" else "LlamaForCausalLM"]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids(SIZES["vocab_size"])
    with torch.no_grad():
        assert max_abs_diff(reloaded(ids).logits, ours(ids).logits) <= TOL


def test_sharded_hf_folder_is_read(tmp_path):
    torch.manual_seed(0)
    hf = randomize_(LlamaForCausalLM(LlamaConfig(**SIZES)))
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ours, _ = import_hf(tmp_path)
    ids = _ids(SIZES["vocab_size"])
    with torch.no_grad():
        assert max_abs_diff(ours(ids).logits, hf(ids).logits) <= TOL


def test_export_writes_tokenizer_and_reimports(tmp_path):
    tok = TextTokenizer.train_bpe(["the cat sat on the mat"] * 4, vocab_size=270, special_tokens=["<|endoftext|>"])
    torch.manual_seed(0)
    hf = randomize_(LlamaForCausalLM(LlamaConfig(**{**SIZES, "vocab_size": tok.vocab_size})))
    hf.save_pretrained(tmp_path / "src")
    ours, _ = import_hf(tmp_path / "src")
    out = export_hf(ours, tmp_path / "out", tokenizer=tok)
    again, tok2 = import_hf(out)
    assert tok2 is not None and tok2.encode("the cat") == tok.encode("the cat")
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == hf.config.eos_token_id
    ids = _ids(tok.vocab_size)
    with torch.no_grad():
        assert max_abs_diff(again(ids).logits, ours(ids).logits) == 0.0


def _corrupt(folder, edit) -> None:
    """Rewrite model.safetensors of `folder` after `edit(tensors)` changes the tensor dict."""
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_mismatched_checkpoint_names_the_tensors(tmp_path):
    hf = LlamaForCausalLM(LlamaConfig(**SIZES))
    hf.save_pretrained(tmp_path)

    def edit(tensors):
        del tensors["model.layers.1.mlp.up_proj.weight"]
        tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
        tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)

    _corrupt(tmp_path, edit)
    with pytest.raises(CheckpointMismatchError) as err:
        import_hf(tmp_path)
    message = str(err.value)
    assert "missing (1): model.layers.1.mlp.up_proj.weight" in message
    assert "model.layers.0.self_attn.k_proj.weight: file (3, 64) vs expected (32, 64)" in message
    assert "unexpected (1): model.layers.0.self_attn.extra.weight" in message


@pytest.mark.parametrize("change, pattern", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "GPT2LMHeadModel"),
    ({"sliding_window": 16}, "sliding_window=16"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "'yarn'"),
])
def test_unsupported_configs_are_named(tmp_path, change, pattern):
    MistralForCausalLM(MistralConfig(**SIZES, sliding_window=None)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=pattern):
        import_hf(tmp_path)
