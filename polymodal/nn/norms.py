"""Normalisation layers: RMSNorm (Llama family), LayerNorm (ViT/CLIP family) and the per-head
q/k LayerNorm of Chameleon's attention."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, computed in float32 as Llama does.

    x (..., D) -> (..., D), same dtype as x.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Upcast: the mean of squares underflows/overflows easily in bf16.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class HeadLayerNorm(nn.Module):
    """LayerNorm of each attention head's vector with a separate affine per head (Chameleon's QK-norm).

    x (..., num_heads, head_dim) -> same shape. The mean and variance run over head_dim only;
    weight and bias are (num_heads, head_dim), so every head keeps its own scale and shift (in
    Chameleon's training each model-parallel shard held its own). The formula and the fixed
    eps of 1e-5 follow transformers' `ChameleonLayerNorm`.
    """

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * self.weight + self.bias


def build_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """A norm layer by name: "rms" (RMSNorm) or "layer" (LayerNorm with bias)."""
    if kind == "rms":
        return RMSNorm(dim, eps)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"norm kind must be 'rms' or 'layer', got {kind!r}")
