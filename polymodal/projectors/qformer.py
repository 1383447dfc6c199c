"""BLIP-2 / InstructBLIP Q-Former: learned queries read the image through cross-attention.

Layout (Li et al., 2023, "BLIP-2"; Dai et al., 2023, "InstructBLIP"; weight roles as in
transformers' `Blip2QFormerModel` / `InstructBlipQFormerModel`):

    image = LayerNorm(features)                        # BLIP-2's `vision_model.post_layernorm` (LAVIS `ln_vision`)
    x = LayerNorm([queries ; text_embed + text_pos])   # text only with `instruction_aware`
    per layer (BERT-style post-LN):
        x = LN(x + SelfAttn(x))                        # queries and instruction attend to each other
        q = x[:, :Q]
        q = LN(q + CrossAttn(q, image))                # every `cross_attention_every`-th layer (0, k, 2k, ...)
        q = LN(q + FFN_query(q));  t = LN(t + FFN_text(t))   # separate feed-forwards for queries / text
    out = language_projection(q)                       # Q-Former width -> LM width (MiniGPT-4 style)

Dropout is omitted: the projector is used for inference and fine-tuning without it.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from polymodal.nn.attention import Attention
from polymodal.nn.mlp import GeluMLP
from polymodal.projectors.config import ProjectorConfig


class QFormerLayer(nn.Module):
    """One post-LN Q-Former layer. x (N, Q + L, H), image (N, P, Dv) -> (N, Q + L, H).

    vision_dim: width of the image features for cross-attention (None = no cross-attention);
    text_ffn: give instruction tokens (positions after the Q queries) their own feed-forward.
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float, vision_dim: int | None,
                 text_ffn: bool):
        super().__init__()
        self.self_attn = Attention(dim, num_heads, qkv_bias=True, out_bias=True)
        self.self_norm = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = self.cross_norm = None
        if vision_dim is not None:
            self.cross_attn = Attention(dim, num_heads, qkv_bias=True, out_bias=True, kv_dim=vision_dim)
            self.cross_norm = nn.LayerNorm(dim, eps=eps)
        self.query_mlp = GeluMLP(dim, mlp_hidden, "gelu")
        self.query_norm = nn.LayerNorm(dim, eps=eps)
        self.text_mlp = GeluMLP(dim, mlp_hidden, "gelu") if text_ffn else None
        self.text_norm = nn.LayerNorm(dim, eps=eps) if text_ffn else None

    def forward(self, x: torch.Tensor, image: torch.Tensor, num_queries: int, mask=None) -> torch.Tensor:
        x = self.self_norm(x + self.self_attn(x, mask=mask))  # (N, Q + L, H)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        if self.cross_attn is not None:
            queries = self.cross_norm(queries + self.cross_attn(queries, context=image))  # (N, Q, H)
        queries = self.query_norm(queries + self.query_mlp(queries))
        if text.shape[1] == 0:
            return queries
        text = self.text_norm(text + self.text_mlp(text))  # (N, L, H)
        return torch.cat([queries, text], dim=1)


class QFormerProjector(nn.Module):
    """Image features (N, P, Dv) -> `num_queries` LM embeddings (N, Q, D_lm).

    config fields used: num_queries, num_layers, num_heads, hidden_size (default: vision_dim),
    intermediate_size (default: 4 x hidden), layer_norm_eps, vision_norm_eps,
    cross_attention_every; instruction_aware with text_vocab_size and max_text_positions.
    forward(features, qformer_input_ids (N, L), qformer_attention_mask (N, L)) — the instruction
    inputs are required with `instruction_aware` and refused without it.
    """

    def __init__(self, config: ProjectorConfig, vision_dim: int, lm_dim: int):
        super().__init__()
        c = self.config = config
        hidden = c.hidden_size or vision_dim
        if hidden % c.num_heads:
            raise ValueError(f"ProjectorConfig.hidden_size {hidden} must be a multiple of num_heads {c.num_heads}")
        if c.cross_attention_every < 1:
            raise ValueError(f"ProjectorConfig.cross_attention_every must be >= 1, got {c.cross_attention_every}")
        if c.instruction_aware and c.text_vocab_size <= 0:
            raise ValueError("ProjectorConfig.instruction_aware needs text_vocab_size > 0 "
                             "(the Q-Former's own vocabulary)")
        self.num_queries = c.num_queries
        self.vision_norm = nn.LayerNorm(vision_dim, eps=c.vision_norm_eps)
        self.query_tokens = nn.Parameter(torch.randn(c.num_queries, hidden) * 0.02)
        self.text_embed = self.text_pos = None
        if c.instruction_aware:
            self.text_embed = nn.Embedding(c.text_vocab_size, hidden)
            self.text_pos = nn.Embedding(c.max_text_positions, hidden)
        self.embed_norm = nn.LayerNorm(hidden, eps=c.layer_norm_eps)
        mlp_hidden = c.intermediate_size or 4 * hidden
        self.layers = nn.ModuleList([
            QFormerLayer(hidden, c.num_heads, mlp_hidden, c.layer_norm_eps,
                         vision_dim if i % c.cross_attention_every == 0 else None, c.instruction_aware)
            for i in range(c.num_layers)
        ])
        self.language_projection = nn.Linear(hidden, lm_dim)

    def num_tokens(self, num_patches: int) -> int:
        """LM tokens produced per image: always `num_queries`, whatever the patch count."""
        return self.num_queries

    def _embed(self, batch: int, input_ids: torch.Tensor | None) -> torch.Tensor:
        """[queries ; instruction word + position embeddings] -> (N, Q + L, H), layer-normed."""
        x = self.query_tokens.expand(batch, -1, -1)  # (N, Q, H)
        if input_ids is not None:
            if input_ids.shape[1] > self.text_pos.num_embeddings:
                raise ValueError(f"qformer_input_ids hold {input_ids.shape[1]} tokens; max_text_positions is "
                                 f"{self.text_pos.num_embeddings}")
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            text = self.text_embed(input_ids) + self.text_pos(positions)  # (N, L, H)
            x = torch.cat([x, text.to(x.dtype)], dim=1)
        return self.embed_norm(x)

    def forward(self, features: torch.Tensor, qformer_input_ids: torch.Tensor | None = None,
                qformer_attention_mask: torch.Tensor | None = None, **_unused) -> torch.Tensor:
        """features (N, P, Dv) [+ instruction ids/mask (N, L)] -> (N, Q, D_lm)."""
        n = features.shape[0]
        if self.text_embed is None and qformer_input_ids is not None:
            raise ValueError("qformer_input_ids given, but this Q-Former is not instruction_aware")
        if self.text_embed is not None:
            if qformer_input_ids is None:
                raise ValueError("an instruction_aware Q-Former needs qformer_input_ids (N, L), one row per image")
            if qformer_input_ids.shape[0] != n:
                raise ValueError(f"qformer_input_ids have {qformer_input_ids.shape[0]} rows for {n} images")
        image = self.vision_norm(features)  # (N, P, Dv)
        x = self._embed(n, qformer_input_ids)  # (N, Q + L, H)
        mask = None
        if qformer_attention_mask is not None and qformer_input_ids is not None:
            # Keys only: every query and instruction token may see the queries and the real text tokens.
            keys = torch.cat([qformer_attention_mask.new_ones(n, self.num_queries), qformer_attention_mask], dim=1)
            mask = keys.bool()[:, None, None, :]  # (N, 1, 1, Q + L)
        for layer in self.layers:
            x = layer(x, image, self.num_queries, mask)
        return self.language_projection(x[:, :self.num_queries])  # (N, Q, D_lm)
