"""Convolutional blocks shared by the autoencoder and the U-Net: a residual block with an optional
time embedding, 2x down/up-sampling, and self-attention over the pixels of a feature map.

Parameter names follow the Stable Diffusion layout (norm1/conv1/time_emb_proj/norm2/conv2/
conv_shortcut; a `conv` in the samplers; group_norm + an `Attention` over pixels) so that the
converters of `interop/` map names one to one.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from polymodal.nn.attention import Attention


class ResBlock2D(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, (+ a projected time embedding), GroupNorm -> SiLU -> dropout
    -> 3x3 conv, added to the input (through a 1x1 conv when the widths differ).

    x (B, C_in, H, W), temb (B, temb_dim) | None -> (B, C_out, H, W). `output_scale` divides the
    sum (1.0 in Stable Diffusion).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, *, temb_dim: int | None = None,
                 groups: int = 32, eps: float = 1e-6, dropout: float = 0.0, output_scale: float = 1.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_channels) if temb_dim else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale = output_scale

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("this ResBlock2D was built with a time embedding: pass temb")
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return (shortcut + h) / self.output_scale


class Downsample2D(nn.Module):
    """Halve H and W with a stride-2 3x3 conv. `asymmetric_pad`: pad right/bottom by one and use no
    conv padding (the autoencoder's encoder); otherwise pad 1 on every side (the U-Net).

    x (B, C, H, W) -> (B, C, H/2, W/2).
    """

    def __init__(self, channels: int, asymmetric_pad: bool = False):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Double H and W (nearest neighbour), then a 3x3 conv. x (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SpatialSelfAttention(nn.Module):
    """GroupNorm, then multi-head self-attention among the H*W pixels, added to the input.

    x (B, C, H, W) -> (B, C, H, W). One head of width C unless `head_dim` is given.
    """

    def __init__(self, channels: int, *, groups: int = 32, eps: float = 1e-6, head_dim: int | None = None):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        heads = channels // head_dim if head_dim else 1
        self.attn = Attention(channels, heads, qkv_bias=True, out_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        out = self.attn(tokens).transpose(1, 2).reshape(b, c, h, w)
        return x + out
