"""Rotary position embeddings (RoPE) for 1D text and 2D/3D image and video tokens.

We use the "rotate half" layout of HF Llama: dimension j of a head is paired with j + D/2 and
the pair is rotated by angle position * inv_freq[j]. For several axes (2D rows/cols for images,
3D time/rows/cols for video) the D/2 frequency slots are split between the axes and each slot
rotates by the position along its own axis, so one rule covers 1D, 2D and 3D RoPE.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def rope_inv_freq(dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies (dim/2,) for a rotary dim `dim`, with optional context scaling.

    scaling follows HF `rope_scaling`: {"rope_type": "linear", "factor"} or the Llama-3.1 rule
    {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"} (formula from Meta's Llama 3.1 release).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_len / low, old_len / high
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3")


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) tables for positions along one or more axes.

    head_dim: rotary dim D (even). axes: 1 for text, 2 for image rows/cols, 3 for video t/h/w;
    the D/2 frequency slots are split as evenly as possible between axes, each with its own
    geometric frequency ladder.
    forward(positions): (..., T) for one axis or (..., T, axes) -> cos, sin of shape (..., T, D).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict | None = None, axes: int = 1):
        super().__init__()
        if head_dim % (2 * axes):
            raise ValueError(f"head_dim {head_dim} must be divisible by 2*axes={2 * axes}")
        self.axes = axes
        if axes == 1:
            inv_freq, axis_of_slot = rope_inv_freq(head_dim, theta, scaling), torch.zeros(head_dim // 2, dtype=torch.long)
        else:
            per_axis = head_dim // axes
            inv_freq = torch.cat([rope_inv_freq(per_axis, theta) for _ in range(axes)])
            axis_of_slot = torch.arange(axes).repeat_interleave(per_axis // 2)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("axis_of_slot", axis_of_slot, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.axes == 1:
            pos = positions.float().unsqueeze(-1)  # (..., T, 1)
        else:
            pos = positions.float()[..., self.axis_of_slot]  # (..., T, D/2)
        angles = pos * self.inv_freq  # (..., T, D/2)
        emb = torch.cat([angles, angles], dim=-1)  # (..., T, D)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by tables cos/sin of shape (B, T, D) or (T, D)."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return (x * cos.to(x.dtype)) + (rotate_half(x) * sin.to(x.dtype))
