"""Normalisation layers: RMSNorm (Llama family) and LayerNorm (ViT/CLIP family)."""
from __future__ import annotations

import torch
import torch.nn as nn


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


def build_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """A norm layer by name: "rms" (RMSNorm) or "layer" (LayerNorm with bias)."""
    if kind == "rms":
        return RMSNorm(dim, eps)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"norm kind must be 'rms' or 'layer', got {kind!r}")
