"""BERT-style bidirectional text encoder (BERT, MiniLM, sentence-transformers embedders).

Layout as in Devlin et al. (2019): word + absolute position + token-type embeddings, a LayerNorm,
then post-norm blocks `x = norm(x + attn(x)); x = norm(x + mlp(x))`. Our shared `TransformerBlock`
is pre-norm, so the post-norm block lives here; it reuses `Attention` and `GeluMLP` unchanged.

The sentence embedding (`pooler_output`) is the masked mean of the last hidden states, as
sentence-transformers computes it for all-MiniLM-L6-v2 and most BERT embedders. BERT's own tanh
pooler over the [CLS] token is kept when a checkpoint has one (`cls_pooler=True`), as `cls_pooled`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from polymodal.bounds import (
    MAX_POSITIONS,
    MAX_VOCAB,
    check_float,
    check_int,
    check_token_id,
    check_transformer_sizes,
)
from polymodal.nn.attention import Attention
from polymodal.nn.mlp import GeluMLP


@dataclass
class BertConfig:
    """BERT sizes and options (defaults: bert-base-uncased)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    act: str = "gelu"
    norm_eps: float = 1e-12
    pad_token_id: int = 0
    cls_pooler: bool = True

    def __post_init__(self) -> None:
        """Check every size against `polymodal.bounds` before anything is built."""
        owner = "BertConfig"
        check_int(owner, "vocab_size", self.vocab_size, 1, MAX_VOCAB)
        check_transformer_sizes(owner, self)
        check_int(owner, "max_position_embeddings", self.max_position_embeddings, 1, MAX_POSITIONS)
        check_int(owner, "type_vocab_size", self.type_vocab_size, 1, MAX_VOCAB)
        check_float(owner, "norm_eps", self.norm_eps, 0, 1, low_open=True)
        check_token_id(owner, "pad_token_id", self.pad_token_id, self.vocab_size)


@dataclass
class BertOutput:
    """last_hidden_state (B, T, D); pooler_output (B, D) masked mean; cls_pooled (B, D) tanh pooler or None."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    cls_pooled: torch.Tensor | None = None


class PostNormBlock(nn.Module):
    """Post-norm residual block (BERT): x = attn_norm(x + attn(x)); x = mlp_norm(x + mlp(x)). (B, T, D) -> (B, T, D)."""

    def __init__(self, attn: Attention, mlp: nn.Module, attn_norm: nn.Module, mlp_norm: nn.Module):
        super().__init__()
        self.attn, self.attn_norm = attn, attn_norm
        self.mlp, self.mlp_norm = mlp, mlp_norm

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn_norm(x + self.attn(x, mask=mask))
        return self.mlp_norm(x + self.mlp(x))


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the tokens whose mask is 1: hidden (B, T, D), attention_mask (B, T) or None -> (B, D)."""
    if attention_mask is None:
        return hidden.mean(1)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    # The clamp keeps an all-padding row at zero instead of NaN (sentence-transformers does the same).
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


class BertEncoder(nn.Module):
    """input_ids (B, T), attention_mask (B, T) of 1/0, token_type_ids (B, T) -> BertOutput."""

    family = "bert"

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = c = config
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.embed_norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.layers = nn.ModuleList([
            PostNormBlock(Attention(c.hidden_size, c.num_heads, qkv_bias=True, out_bias=True),
                          GeluMLP(c.hidden_size, c.intermediate_size, c.act),
                          nn.LayerNorm(c.hidden_size, eps=c.norm_eps), nn.LayerNorm(c.hidden_size, eps=c.norm_eps))
            for _ in range(c.num_layers)
        ])
        self.pooler = nn.Linear(c.hidden_size, c.hidden_size) if c.cls_pooler else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> BertOutput:
        c = self.config
        t = input_ids.shape[1]
        if t > c.max_position_embeddings:
            raise ValueError(f"input_ids has {t} tokens; BertConfig.max_position_embeddings is "
                             f"{c.max_position_embeddings}")
        positions = torch.arange(t, device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = x + self.token_type_embeddings(token_type_ids)
        x = self.embed_norm(x)  # (B, T, D)
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): every query sees the real keys
        for block in self.layers:
            x = block(x, mask)
        cls_pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None
        return BertOutput(x, masked_mean(x, attention_mask), cls_pooled)
