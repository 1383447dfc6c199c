"""Cross-attention resampler (Qwen-VL; Perceiver-style when deeper): P features -> K learned queries.

Qwen-VL compresses 1024 ViT patches into 256 tokens with one cross-attention layer whose
queries are learned and whose keys carry 2D absolute sin-cos positions (the values do not), so
the compressed tokens still know where in the image they looked. With `num_layers` > 1 the
queries are refined Perceiver-style: each layer adds cross-attention and an MLP to them
(pre-norm, residual). The output is layer-normed and linearly mapped into the LM's width.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from polymodal.nn.mlp import GeluMLP
from polymodal.projectors.config import ProjectorConfig


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    """2D absolute sin-cos positions (grid_h * grid_w, dim), row-major (MAE / Qwen-VL layout):
    the first half of the channels encodes the row, the second half the column."""
    if dim % 4:
        raise ValueError(f"sincos_2d: dim must be a multiple of 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.double()[:, None] * omega[None]  # (M, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (M, dim/2)

    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    return torch.cat([one_axis(rows.flatten()), one_axis(cols.flatten())], dim=1).float()


class ResamplerLayer(nn.Module):
    """Queries (N, K, D) cross-attend to features (N, P, D) whose keys carry positions (P, D)."""

    def __init__(self, dim: int, num_heads: int, intermediate: int | None, eps: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"resampler: hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim, eps=eps)
        self.norm_kv = nn.LayerNorm(dim, eps=eps)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim, eps=eps) if intermediate else None
        self.mlp = GeluMLP(dim, intermediate) if intermediate else None

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(N, S, D) -> (N, H, S, D/H)."""
        n, s, d = t.shape
        return t.view(n, s, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, queries: torch.Tensor, features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        n, k, d = queries.shape
        kv = self.norm_kv(features)  # (N, P, D)
        q = self._heads(self.q_proj(self.norm_q(queries)))  # (N, H, K, D/H)
        key = self._heads(self.k_proj(kv + positions))  # positions enter the keys only
        value = self._heads(self.v_proj(kv))
        attended = F.scaled_dot_product_attention(q, key, value).transpose(1, 2).reshape(n, k, d)
        queries = queries + self.o_proj(attended)
        if self.mlp is not None:
            queries = queries + self.mlp(self.norm_mlp(queries))
        return queries


class ResamplerProjector(nn.Module):
    """features (N, P, Dv) on a square patch grid -> (N, num_queries, D_lm).

    Width `hidden_size` (default: lm_dim), `num_heads` heads, `num_layers` cross-attention
    layers (one = Qwen-VL; more = Perceiver-style, each with an MLP of `intermediate_size`,
    default 4x width). A class token, if the features have one, must be dropped beforehand.
    """

    def __init__(self, config: ProjectorConfig, vision_dim: int, lm_dim: int):
        super().__init__()
        if config.num_layers < 1 or config.num_queries < 1:
            raise ValueError(f"ProjectorConfig: resampler needs num_layers >= 1 and num_queries >= 1, got "
                             f"{config.num_layers} and {config.num_queries}")
        dim = config.hidden_size or lm_dim
        self.dim = dim
        self.queries = nn.Parameter(torch.randn(config.num_queries, dim) * 0.02)
        self.kv_proj = nn.Linear(vision_dim, dim, bias=False) if vision_dim != dim else nn.Identity()
        intermediate = (config.intermediate_size or 4 * dim) if config.num_layers > 1 else None
        self.layers = nn.ModuleList(
            ResamplerLayer(dim, config.num_heads, intermediate, config.layer_norm_eps) for _ in range(config.num_layers)
        )
        self.norm_out = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.proj = nn.Linear(dim, lm_dim)

    def num_tokens(self, num_patches: int) -> int:
        """LM tokens per image: always `num_queries`, whatever the patch count."""
        return self.queries.shape[0]

    def forward(self, features: torch.Tensor, **_unused) -> torch.Tensor:
        n, p, _ = features.shape
        side = math.isqrt(p)
        if side * side != p:
            raise ValueError(f"ResamplerProjector: {p} features do not form a square patch grid (drop the class token)")
        x = self.kv_proj(features)  # (N, P, D)
        positions = sincos_2d(side, side, self.dim).to(device=x.device, dtype=x.dtype)  # (P, D)
        latents = self.queries.to(x.dtype).expand(n, -1, -1)  # (N, K, D)
        for layer in self.layers:
            latents = layer(latents, x, positions)
        return self.proj(self.norm_out(latents))  # (N, K, D_lm)
