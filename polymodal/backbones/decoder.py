"""A decoder-only language model compatible with Llama, Mistral, Qwen2 and SmolLM checkpoints,
and with Chameleon's LM (`qk_norm="head_layernorm"`).

The same module serves three call styles:
- HF style: `model(input_ids)` on plain (B, T) ids (optionally with a (B, T) padding
  `attention_mask`, 1 = real token) -> `LMOutput.logits` (B, T, V);
- packed: `model(packed=PackedBatch)` -> logits (R, L, V) under the shared attention rule;
- cached decoding: `model(input_ids, kv_cache=cache, attention_mask=...)` for generation.
Multimodal families pass `inputs_embeds` instead of ids (image embeddings spliced in).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from polymodal.bounds import (
    MAX_HEADS,
    MAX_INTERMEDIATE,
    MAX_LAYERS,
    MAX_POSITIONS,
    MAX_VOCAB,
    MAX_WIDTH,
    check_float,
    check_int,
    check_multiple,
    check_token_id,
)
from polymodal.errors import ConfigError
from polymodal.nn.attention import QK_NORMS
from polymodal.nn.init import init_weights
from polymodal.nn.kv_cache import KVCache
from polymodal.nn.norms import RMSNorm
from polymodal.nn.rope import RotaryEmbedding
from polymodal.nn.transformer import TransformerStack, build_block
from polymodal.sequence import IGNORE_INDEX, PackedBatch


@dataclass
class DecoderConfig:
    """Sizes and options of a Llama-style decoder (names follow HF's LlamaConfig where they exist)."""

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # Per-head query/key norm before RoPE: None, or "head_layernorm" (Chameleon; see polymodal.nn.norms).
    qk_norm: str | None = None

    @property
    def resolved_head_dim(self) -> int:
        """head_dim, defaulting to hidden_size / num_heads."""
        return self.head_dim or self.hidden_size // self.num_heads

    def __post_init__(self) -> None:
        """Check every size against `polymodal.bounds` before anything is built."""
        owner = "DecoderConfig"
        check_int(owner, "vocab_size", self.vocab_size, 1, MAX_VOCAB)
        check_int(owner, "hidden_size", self.hidden_size, 1, MAX_WIDTH)
        check_int(owner, "intermediate_size", self.intermediate_size, 1, MAX_INTERMEDIATE)
        check_int(owner, "num_layers", self.num_layers, 1, MAX_LAYERS)
        check_int(owner, "num_heads", self.num_heads, 1, MAX_HEADS)
        check_int(owner, "num_kv_heads", self.num_kv_heads, 1, self.num_heads)
        check_multiple(owner, "num_heads", self.num_heads, "num_kv_heads", self.num_kv_heads)
        if self.head_dim is None:
            check_multiple(owner, "hidden_size", self.hidden_size, "num_heads", self.num_heads)
        else:
            check_int(owner, "head_dim", self.head_dim, 1, MAX_WIDTH)
        if self.resolved_head_dim % 2:  # RoPE rotates dimension j with j + D/2
            source = "" if self.head_dim else " (hidden_size / num_heads)"
            raise ConfigError(f"{owner}.head_dim must be even for RoPE, got {self.resolved_head_dim}{source}")
        check_float(owner, "rms_norm_eps", self.rms_norm_eps, 0, 1, low_open=True)
        check_float(owner, "rope_theta", self.rope_theta, 0, low_open=True)
        _check_rope_scaling(owner, self.rope_scaling)
        check_int(owner, "max_position_embeddings", self.max_position_embeddings, 1, MAX_POSITIONS)
        check_token_id(owner, "bos_token_id", self.bos_token_id, self.vocab_size)
        check_token_id(owner, "pad_token_id", self.pad_token_id, self.vocab_size)
        if isinstance(self.eos_token_id, (list, tuple)):  # several ids end a turn (Llama 3 instruct)
            for i, token in enumerate(self.eos_token_id):
                check_token_id(owner, f"eos_token_id[{i}]", token, self.vocab_size)
        else:
            check_token_id(owner, "eos_token_id", self.eos_token_id, self.vocab_size)
        if self.qk_norm is not None and self.qk_norm not in QK_NORMS:
            raise ConfigError(f"{owner}.qk_norm must be null or one of {list(QK_NORMS)}, got {self.qk_norm!r}")


# The keys each `rope_scaling` type reads (see `polymodal.nn.rope.rope_inv_freq`), besides its type.
_ROPE_SCALING_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _check_rope_scaling(owner: str, scaling: dict | None) -> None:
    """Raise `ConfigError` unless `scaling` is None or an HF-style `rope_scaling` dict we can apply:
    a known type (under "rope_type" or the older "type"), exactly that type's keys, finite positive values."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ConfigError(f"{owner}.rope_scaling must be a mapping or null, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if not isinstance(kind, str) or kind not in _ROPE_SCALING_KEYS:
        raise ConfigError(f"{owner}.rope_scaling type must be one of {list(_ROPE_SCALING_KEYS)}, got {kind!r}")
    needed = set(_ROPE_SCALING_KEYS[kind])
    given = set(scaling) - {"rope_type", "type"}
    if given != needed:
        raise ConfigError(f"{owner}.rope_scaling of type {kind!r} takes the keys {sorted(needed)}, "
                          f"got {sorted(given)}")
    for key in sorted(needed - {"original_max_position_embeddings"}):
        check_float(owner, f"rope_scaling.{key}", scaling[key], 0, low_open=True)
    if kind == "llama3":
        check_int(owner, "rope_scaling.original_max_position_embeddings",
                  scaling["original_max_position_embeddings"], 1, MAX_POSITIONS)
        if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            # The llama3 rule divides by (high_freq_factor - low_freq_factor).
            raise ConfigError(f"{owner}.rope_scaling.high_freq_factor ({scaling['high_freq_factor']}) must be "
                              f"above low_freq_factor ({scaling['low_freq_factor']})")


@dataclass
class LMOutput:
    """logits (B, T, V), None after a `logits=False` call; hidden_states (B, T, D) final-norm output.

    Losses are computed from these by `polymodal.train.objectives` (`next_token_loss`, ...)."""

    logits: torch.Tensor | None
    hidden_states: torch.Tensor | None = None


class DecoderLM(nn.Module):
    """Token embedding -> causal transformer stack (RMSNorm, RoPE, GQA, SwiGLU) -> norm -> LM head."""

    family = "lm"

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = TransformerStack([
            build_block(c.hidden_size, c.num_heads, c.intermediate_size, num_kv_heads=c.num_kv_heads,
                        head_dim=c.resolved_head_dim, norm="rms", norm_eps=c.rms_norm_eps, mlp="swiglu",
                        qkv_bias=c.attention_bias, mlp_bias=c.mlp_bias, qk_norm=c.qk_norm)
            for _ in range(c.num_layers)
        ])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(c.resolved_head_dim, c.rope_theta, c.rope_scaling)
        self.apply(init_weights)

    def forward(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                packed: PackedBatch | None = None, kv_cache: KVCache | None = None,
                logits_to_keep: int = 0, logits: bool = True) -> LMOutput:
        """Run the LM. input_ids (B, T) or inputs_embeds (B, T, D) -> LMOutput.

        attention_mask: (B, S) 1/0 padding mask over all keys (cached prefix + new tokens) or None;
        positions: (B, T) explicit positions (derived from the padding mask when omitted);
        packed: a PackedBatch — ids, positions and the attention rule all come from it;
        logits_to_keep: if > 0, only the last that many positions get logits (decoding);
        logits: False skips the output head (`logits` is None): the training objectives run
            `output_logits` on the scored positions only.
        """
        if packed is not None:
            input_ids, positions = packed.token_ids, packed.positions
            mask = packed.attention_mask()
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        b, t, _ = x.shape
        past = kv_cache.length if kv_cache is not None else 0
        if packed is None:
            mask, positions = self._mask_and_positions(b, t, past, attention_mask, positions, x.device)
        rope = self.rope(positions)
        h = self.norm(self.layers(x, rope=rope, mask=mask, kv_cache=kv_cache))
        if kv_cache is not None:
            kv_cache.advance(t)
        if not logits:
            return LMOutput(logits=None, hidden_states=h)
        return LMOutput(logits=self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h), hidden_states=h)

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head: hidden states (..., D) -> logits (..., V)."""
        return self.lm_head(hidden)

    @staticmethod
    def _mask_and_positions(b: int, t: int, past: int, attention_mask, positions, device):
        """The causal(+padding) mask for T new queries after `past` cached keys, and positions."""
        if attention_mask is None and past > 0 and t > 1:
            attention_mask = torch.ones(b, past + t, dtype=torch.bool, device=device)
        if attention_mask is None:
            if positions is None:
                positions = torch.arange(past, past + t, device=device).expand(b, t)
            return ("causal" if past == 0 else None), positions
        key_valid = attention_mask.to(device=device, dtype=torch.bool)  # (B, S)
        if key_valid.shape != (b, past + t):
            raise ValueError(f"attention_mask must be (B, past+T) = ({b}, {past + t}), got {tuple(key_valid.shape)}")
        if positions is None:
            positions = (key_valid.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        q_idx = torch.arange(past, past + t, device=device)[:, None]
        k_idx = torch.arange(past + t, device=device)[None, :]
        # A left-pad query has no valid key; letting it see itself keeps softmax finite.
        allowed = (key_valid[:, None, :] & (k_idx <= q_idx)) | (k_idx == q_idx)  # (B, T, S)
        return allowed.unsqueeze(1), positions

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache sized for this model, on its device and dtype."""
        c, p = self.config, self.embed_tokens.weight
        return KVCache(c.num_layers, batch_size, c.num_kv_heads, max_len, c.resolved_head_dim, p.dtype, p.device)

    def generate(self, input_ids, **kwargs):
        """Generate continuations; see `polymodal.infer.generate.generate` for the arguments."""
        from polymodal.infer.generate import generate

        return generate(self, input_ids, **kwargs)


def shift_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """HF-style next-token targets: labels[:, t] = input_ids[:, t+1]; IGNORE_INDEX at the end and padding."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        labels[:, :-1][attention_mask[:, 1:] == 0] = IGNORE_INDEX
    return labels
