"""CLIP / SigLIP-style text transformer: token embedding + learned positions + blocks + final norm.

The two layouts differ in three switches:
- CLIP: causal self-attention, quick-GELU, pooled at the end-of-text token (`pool="eos"`);
- SigLIP: bidirectional attention, tanh-GELU, pooled at the last position (`pool="last"`) and
  passed through a `head` linear (D -> projection_size, with bias).
`pool="eos"` follows transformers' `CLIPTextTransformer`: when `eos_token_id == 2` (configs
written before the eos id was stored) the pooled position is the argmax of `input_ids` (the
largest id in the original CLIP vocab is the end-of-text token); otherwise it is the first
position whose id equals `eos_token_id`.

Module names (for checkpoint name maps): `token_embedding` (nn.Embedding), `position_embedding`
(Parameter, (max_positions, D)), `encoder.layers.{i}.{attn_norm, attn.{q,k,v,o}_proj, mlp_norm,
mlp.fc1, mlp.fc2}`, `final_norm`, `head` (only when `config.head`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from polymodal.bounds import (
    MAX_POSITIONS,
    MAX_VOCAB,
    MAX_WIDTH,
    check_float,
    check_int,
    check_token_id,
    check_transformer_sizes,
)
from polymodal.nn.transformer import TransformerStack, build_block

POOLS = ("eos", "last", "mean", "cls")
# HF's sentinel: configs that predate `eos_token_id` in CLIPTextConfig carry the default id 2.
LEGACY_CLIP_EOS_ID = 2


@dataclass
class TextEncoderConfig:
    """Text transformer sizes and options (defaults: CLIP ViT-B text tower)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    num_layers: int = 12
    num_heads: int = 8
    intermediate_size: int = 2048
    max_positions: int = 77
    act: str = "quick_gelu"  # "quick_gelu" (CLIP), "gelu_tanh" (SigLIP) or "gelu"
    norm_eps: float = 1e-5
    causal: bool = True  # CLIP: causal; SigLIP: bidirectional
    pool: str = "eos"  # "eos" (CLIP), "last" (SigLIP), "mean" (over attended tokens) or "cls" (position 0)
    eos_token_id: int = 49407
    # None: transformers' rule (argmax of the ids when eos_token_id == 2, else the first eos).
    # False forces the first-eos rule, for tokenizers whose real eos id is 2 (the world tokenizer).
    legacy_eos_argmax: bool | None = None
    head: bool = False  # SigLIP's text `head` linear applied to the pooled feature
    projection_size: int | None = None  # output width of `head` (SigLIP's projection_size); None = hidden_size

    def __post_init__(self) -> None:
        """Check every size against `polymodal.bounds` before anything is built."""
        owner = "TextEncoderConfig"
        check_int(owner, "vocab_size", self.vocab_size, 1, MAX_VOCAB)
        check_transformer_sizes(owner, self)
        check_int(owner, "max_positions", self.max_positions, 1, MAX_POSITIONS)
        check_float(owner, "norm_eps", self.norm_eps, 0, 1, low_open=True)
        if self.pool == "eos":
            check_token_id(owner, "eos_token_id", self.eos_token_id, self.vocab_size)
        else:
            # Unused by the other pool rules, and SigLIP configs carry CLIP's 49407 over a 32000 vocabulary.
            check_int(owner, "eos_token_id", self.eos_token_id, 0, MAX_VOCAB - 1)
        if self.projection_size is not None:
            check_int(owner, "projection_size", self.projection_size, 1, MAX_WIDTH)


@dataclass
class TextEncoderOutput:
    """last_hidden_state (B, T, D) after the final norm; pooler_output (B, D) (B, projection_size after `head`)."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor


def text_attention_mask(attention_mask: torch.Tensor | None, causal: bool, length: int):
    """The `attend` mask for T tokens: None, "causal", or bool (B, 1, T, T) with True = may attend.

    attention_mask (B, T): 1 for real tokens, 0 for padding. Every query keeps its own position
    visible so that a padded row is never fully masked (that would give NaN); padded positions'
    outputs are never pooled, so what they see does not matter.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return "causal" if causal else None
    keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    allowed = keys.expand(-1, 1, length, -1)
    eye = torch.eye(length, dtype=torch.bool, device=attention_mask.device)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    return allowed | eye  # (B, 1, T, T)


def pool_tokens(hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                pool: str, eos_token_id: int, legacy_eos_argmax: bool | None = None) -> torch.Tensor:
    """Pool hidden (B, T, D) to (B, D) by the rule `pool` (see the module docstring)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if pool == "eos":
        if legacy_eos_argmax is None:
            legacy_eos_argmax = eos_token_id == LEGACY_CLIP_EOS_ID
        if legacy_eos_argmax:
            index = input_ids.to(torch.int).argmax(dim=-1)
        else:
            index = (input_ids.to(torch.int) == eos_token_id).int().argmax(dim=-1)
        return hidden[rows, index]
    if pool == "last":
        return hidden[:, -1]
    if pool == "cls":
        return hidden[:, 0]
    if pool == "mean":
        if attention_mask is None:
            return hidden.mean(1)
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    raise ValueError(f"TextEncoderConfig.pool must be one of {POOLS}, got {pool!r}")


def pooled_position(input_ids: torch.Tensor, pool: str, eos_token_id: int,
                    legacy_eos_argmax: bool | None = None) -> torch.Tensor | None:
    """Index (B,) of the one token a pool rule reads ("eos", "last", "cls"); None for "mean"."""
    b, t = input_ids.shape
    if pool == "eos":
        if legacy_eos_argmax is None:
            legacy_eos_argmax = eos_token_id == LEGACY_CLIP_EOS_ID
        ids = input_ids.to(torch.int)
        return ids.argmax(dim=-1) if legacy_eos_argmax else (ids == eos_token_id).int().argmax(dim=-1)
    if pool in ("last", "cls"):
        return torch.full((b,), t - 1 if pool == "last" else 0, dtype=torch.long, device=input_ids.device)
    return None


def last_block_at(block: nn.Module, x: torch.Tensor, index: torch.Tensor, mask) -> torch.Tensor:
    """The output of a pre-norm self-attention block at one position per row only.

    x (B, T, D) is the block's input, index (B,) the position to compute, mask None or bool
    (B, 1, 1, T) over keys. Keys and values still come from every token, so the result equals
    `block(x)[rows, index]`, while the query, output projection and MLP run on one token instead
    of T: the final layer of a tower that is only pooled needs nothing else.
    """
    rows = torch.arange(x.shape[0], device=x.device)
    query = x[rows, index].unsqueeze(1)  # (B, 1, D)
    h = query + block.attn(block.attn_norm(query), context=block.attn_norm(x), mask=mask)
    return (h + block.mlp(block.mlp_norm(h)))[:, 0]  # (B, D)


class TextTransformer(nn.Module):
    """input_ids (B, T), attention_mask (B, T) | None -> TextEncoderOutput. T <= config.max_positions."""

    family = "text"

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = c = config
        if c.pool not in POOLS:
            raise ValueError(f"TextEncoderConfig.pool must be one of {POOLS}, got {c.pool!r}")
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = nn.Parameter(torch.randn(c.max_positions, c.hidden_size) * 0.01)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.encoder = TransformerStack([
            build_block(c.hidden_size, c.num_heads, c.intermediate_size, norm="layer", norm_eps=c.norm_eps,
                        mlp="gelu", act=c.act, qkv_bias=True, out_bias=True, mlp_bias=True)
            for _ in range(c.num_layers)
        ])
        self.final_norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.head = nn.Linear(c.hidden_size, c.projection_size or c.hidden_size) if c.head else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TextEncoderOutput:
        c = self.config
        length = input_ids.shape[1]
        if length > c.max_positions:
            raise ValueError(f"input_ids has {length} tokens; TextEncoderConfig.max_positions is {c.max_positions}")
        x = self.token_embedding(input_ids) + self.position_embedding[:length]  # (B, T, D)
        x = self.encoder(x, mask=text_attention_mask(attention_mask, c.causal, length))
        x = self.final_norm(x)
        pooled = pool_tokens(x, input_ids, attention_mask, c.pool, c.eos_token_id, c.legacy_eos_argmax)  # (B, D)
        if self.head is not None:
            pooled = self.head(pooled)
        return TextEncoderOutput(x, pooled)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`forward(...).pooler_output` (B, D) computing the last layer at the pooled token only.

        Same values (up to float rounding) for the one-token pool rules; "mean" pooling needs
        every token and takes the full forward.
        """
        c = self.config
        index = pooled_position(input_ids, c.pool, c.eos_token_id, c.legacy_eos_argmax)
        if index is None or not len(self.encoder.layers):
            return self.forward(input_ids, attention_mask).pooler_output
        length = input_ids.shape[1]
        if length > c.max_positions:
            raise ValueError(f"input_ids has {length} tokens; TextEncoderConfig.max_positions is {c.max_positions}")
        x = self.token_embedding(input_ids) + self.position_embedding[:length]  # (B, T, D)
        mask = text_attention_mask(attention_mask, c.causal, length)
        for i, block in enumerate(self.encoder.layers[:-1]):
            x = block(x, mask=mask, layer_idx=i)
        keys = torch.arange(length, device=x.device)[None]  # (1, T)
        allowed = keys <= index[:, None] if c.causal else torch.ones_like(keys, dtype=torch.bool)
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()
        allowed = (allowed | (keys == index[:, None]))[:, None, None, :]  # (B, 1, 1, T), as text_attention_mask
        pooled = self.final_norm(last_block_at(self.encoder.layers[-1], x, index, allowed))  # (B, D)
        return self.head(pooled) if self.head is not None else pooled
