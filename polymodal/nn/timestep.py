"""Sinusoidal timestep features, the input of every denoiser's time embedding (DiT, U-Net)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps, as in the Transformer's positions.

    timesteps (B,) -> (B, dim) float32: [sin(t f_i), cos(t f_i)] (or [cos, sin] when
    flip_sin_to_cos) for f_i = max_period ** (-i / (dim // 2 - freq_shift)), zero-padded when dim
    is odd. Float32 whatever the timesteps' dtype, so integer steps near 1000 keep their precision.
    diffusers' DiT uses [cos, sin] with freq_shift 1, the original DiT code freq_shift 0; Stable
    Diffusion's U-Net [cos, sin] with freq_shift 0.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))  # (half,)
    angles = timesteps[:, None].float() * freqs[None]  # (B, half)
    parts = (torch.cos(angles), torch.sin(angles)) if flip_sin_to_cos else (torch.sin(angles), torch.cos(angles))
    return F.pad(torch.cat(parts, dim=-1), (0, dim % 2))
