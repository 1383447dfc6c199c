"""The real SmolLM2-135M-Instruct Q4_1 GGUF: config, logits parity with transformers, generation."""
from __future__ import annotations

import pytest
import torch
from interop_parity import max_abs_diff

from polymodal.assets import smollm2_gguf_path
from polymodal.infer.generate import generate
from polymodal.interop import detect_format, import_gguf
from polymodal.interop.gguf_lm import _unpermute_rows

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2():
    """(our DecoderLM, its tokenizer, the chat prompt ids) loaded once for the module."""
    model, tokenizer = import_gguf(smollm2_gguf_path())
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    return model, tokenizer, ids


def test_config_comes_from_gguf_metadata(smollm2):
    model, tokenizer, _ = smollm2
    c = model.config
    assert (c.num_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_heads, c.num_kv_heads, c.vocab_size) == (9, 3, 49152)
    assert c.rope_theta == 100000.0 and c.max_position_embeddings == 8192
    assert c.tie_word_embeddings and model.lm_head.weight is model.embed_tokens.weight
    assert tokenizer.id_to_token(c.eos_token_id) == "<|im_end|>" and c.bos_token_id == 1
    assert detect_format(smollm2_gguf_path()) == "gguf"


def test_next_token_logits_match_transformers(smollm2):
    from transformers import AutoModelForCausalLM

    model, _, ids = smollm2
    path = smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    batch = torch.tensor([ids])
    with torch.no_grad():
        ref = reference(batch).logits
        ours = model(batch).logits
    # Both sides dequantize the same Q4_1/Q8_0 blocks to float32; measured max |diff| = 0.0.
    assert max_abs_diff(ours[:, -1], ref[:, -1]) <= 1e-3
    assert max_abs_diff(ours, ref) <= 1e-3


def test_greedy_answer_is_sensible(smollm2):
    model, tokenizer, ids = smollm2
    new = generate(model, [ids], max_new_tokens=16)[0]
    answer = tokenizer.decode(new, skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_unpermute_inverts_llama_cpp_permutation():
    heads, head_dim, width = 3, 8, 5
    weight = torch.randn(heads * head_dim, width)
    # llama.cpp's convert_hf_to_gguf permute(): reshape(H, 2, D/2, ...).swapaxes(1, 2).
    permuted = weight.reshape(heads, 2, head_dim // 2, width).swapaxes(1, 2).reshape(weight.shape)
    assert not torch.equal(permuted, weight)
    assert torch.equal(_unpermute_rows(permuted, heads), weight)
