"""The `lm` family: a decoder-only language model (Llama / Mistral / Qwen2 / SmolLM layout)."""
from __future__ import annotations

import torch

from polymodal.backbones.decoder import DecoderConfig, DecoderLM
from polymodal.models.registry import Family, Recipe, register
from polymodal.sequence import Document, PackedBatch, pack_documents


def lm_tiny() -> DecoderConfig:
    """A 2-layer GQA decoder for unit tests (~100k parameters)."""
    return DecoderConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=256)


def lm_small() -> DecoderConfig:
    """A ~10M-parameter decoder for CPU demos and benchmarks."""
    return DecoderConfig(vocab_size=8192, hidden_size=256, intermediate_size=704, num_layers=6, num_heads=8,
                         num_kv_heads=4, max_position_embeddings=2048, tie_word_embeddings=True)


def smollm2_135m() -> DecoderConfig:
    """SmolLM2-135M sizes (HuggingFaceTB/SmolLM2-135M config.json)."""
    return DecoderConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def _example_batch(model: DecoderLM) -> PackedBatch:
    """Two random documents of 12 and 7 tokens packed into one row."""
    docs = [Document.from_tokens(torch.randint(0, model.config.vocab_size, (n,))) for n in (12, 7)]
    return pack_documents(docs, max_tokens=32)


LM = register(Family(
    "lm", DecoderConfig, DecoderLM, lm_tiny, _example_batch,
    objective="polymodal.train.objectives:sequence_loss",
    tasks=("complete", "chat"),
    recipes=(Recipe("lm", "polymodal.recipes.lm:LMRecipeConfig", "polymodal.recipes.lm:lm_job"),),
    evaluate="polymodal.eval.lm:evaluate",
    converters=("polymodal.interop.hf_lm:HF_LM_CONVERTER",),
))
