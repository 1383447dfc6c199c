"""Tiny llama/qwen2 GGUF files written with gguf's GGUFWriter from transformers models: parity and errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from interop_parity import max_abs_diff, randomize_
from tokenizers.pre_tokenizers import ByteLevel
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from polymodal.checkpoint import CheckpointMismatchError
from polymodal.interop import import_gguf
from polymodal.interop.gguf_lm import GGUF_LM_NAMES
from polymodal.interop.hf_lm import HF_LM_NAMES

SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, rms_norm_eps=1e-5)
# A byte-level vocabulary: the 256 byte symbols, one merge, and an end-of-turn control token.
TOKENS = [*sorted(ByteLevel.alphabet()), "Ġt", "<|im_end|>"]
TYPES = [1] * 257 + [3]


def _write_gguf(path, hf, arch: str, drop: str | None = None, linear_rope: float | None = None) -> None:
    """Write `hf` as a float32 GGUF the way llama.cpp's converter lays it out (Q/K permuted for llama)."""
    c = hf.config
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if linear_rope is not None:
        writer.add_string(f"{arch}.rope.scaling.type", "linear")
        writer.add_float32(f"{arch}.rope.scaling.factor", linear_rope)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types(TYPES)
    writer.add_token_merges(["Ġ t"])
    writer.add_eos_token_id(len(TOKENS) - 1)
    heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}
    for hf_name, tensor in hf.state_dict().items():
        name = GGUF_LM_NAMES.to_foreign(HF_LM_NAMES.to_ours(hf_name))
        if name == drop or (c.tie_word_embeddings and hf_name == "lm_head.weight"):
            continue
        proj = hf_name.split(".")[-2]
        if arch == "llama" and proj in heads and hf_name.endswith("weight"):
            n = heads[proj]
            tensor = tensor.reshape(n, 2, tensor.shape[0] // n // 2, -1).swapaxes(1, 2).reshape(tensor.shape)
        writer.add_tensor(name, np.ascontiguousarray(tensor.numpy(), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_matches_transformers(arch, tmp_path):
    torch.manual_seed(0)
    vocab = len(TOKENS)
    if arch == "llama":
        linear = {"rope_type": "linear", "factor": 2.0}
        hf = LlamaForCausalLM(LlamaConfig(**SIZES, vocab_size=vocab, rope_scaling=linear))
    else:
        hf = Qwen2ForCausalLM(Qwen2Config(**SIZES, vocab_size=vocab, tie_word_embeddings=True))
    randomize_(hf)
    _write_gguf(tmp_path / "tiny.gguf", hf, arch, linear_rope=2.0 if arch == "llama" else None)
    ours, tokenizer = import_gguf(tmp_path / "tiny.gguf")
    assert ours.config.attention_bias == (arch == "qwen2")
    assert ours.config.tie_word_embeddings == (arch == "qwen2")
    assert tokenizer.eos_token == "<|im_end|>" and ours.config.eos_token_id == len(TOKENS) - 1
    ids = torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        assert ref.std() > 0.1
        assert max_abs_diff(ours(ids).logits, ref) <= 1e-4


def test_gguf_missing_tensor_is_named(tmp_path):
    hf = LlamaForCausalLM(LlamaConfig(**SIZES, vocab_size=len(TOKENS)))
    _write_gguf(tmp_path / "broken.gguf", hf, "llama", drop="blk.1.ffn_up.weight")
    with pytest.raises(CheckpointMismatchError, match=r"missing \(1\): blk\.1\.ffn_up\.weight"):
        import_gguf(tmp_path / "broken.gguf")


def test_gguf_other_architecture_is_named(tmp_path):
    writer = GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="general.architecture 'gpt2'"):
        import_gguf(tmp_path / "gpt2.gguf")
