"""The parts of the latent-diffusion U-Net (Rombach et al., 2022) between its stem and its head.

- `GEGLUFeedForward` and `CrossAttentionBlock`: the pre-norm transformer block that runs over the
  pixels of a feature map (self-attention, cross-attention to the conditioning sequence, GEGLU).
- `SpatialTransformer`: GroupNorm, a projection in, a stack of those blocks, a projection out,
  added to its input (the residual keeps a freshly initialised transformer close to identity).
- `UNetDownBlock`, `UNetMidBlock`, `UNetUpBlock`: residual blocks, optionally interleaved with
  spatial transformers, plus a resampler. They receive their built parts (torchtune style); the
  builder in `polymodal.generators.unet` fixes the widths.

Module names follow diffusers' `UNet2DConditionModel` where our own building blocks allow it
(resnets/attentions/transformer_blocks/norm1..3/attn1/attn2/proj_in/proj_out), so the converter
in `polymodal.interop.diffusers_unet` only renames the attention projections, the feed-forward
and the resamplers.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from polymodal.nn.attention import Attention
from polymodal.nn.conv_blocks import Downsample2D, ResBlock2D, Upsample2D


class GEGLUFeedForward(nn.Module):
    """out(a * gelu(g)) where (a, g) are the two halves of proj(x) (Shazeer, 2020).

    x (..., dim) -> (..., dim); `hidden` is the width of each half (4 * dim by default).
    """

    def __init__(self, dim: int, hidden: int | None = None, dropout: float = 0.0):
        super().__init__()
        hidden = hidden or 4 * dim
        self.proj = nn.Linear(dim, 2 * hidden)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # (..., hidden) each
        return self.out(self.dropout(value * F.gelu(gate)))


class CrossAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block over pixel tokens: self-attention, cross-attention to a
    context sequence, GEGLU feed-forward, each added to the stream.

    x (B, N, dim), context (B, S, context_dim) -> (B, N, dim). Heads are dim // num_heads wide;
    the q/k/v projections carry no bias, the output projections do (Stable Diffusion's layout).
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_heads, qkv_bias=False, out_bias=True)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, num_heads, qkv_bias=False, out_bias=True, kv_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim, dropout=dropout)
        self.dropout = nn.Dropout(dropout)  # on the attention outputs, as in the reference

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn1(self.norm1(x)))
        x = x + self.dropout(self.attn2(self.norm2(x), context))
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """A stack of `CrossAttentionBlock`s over the H*W pixels of a feature map, added to it.

    x (B, C, H, W), context (B, S, context_dim) -> (B, C, H, W). `linear_projection`: proj_in /
    proj_out are Linear layers on the tokens (Stable Diffusion 2) instead of 1x1 convolutions on
    the map (Stable Diffusion 1); the two compute the same function with differently shaped
    weights, so the flag only decides which layout the parameters take.
    """

    def __init__(self, channels: int, num_heads: int, context_dim: int, *, num_layers: int = 1, groups: int = 32,
                 linear_projection: bool = False, dropout: float = 0.0):
        super().__init__()
        # eps 1e-6 regardless of the U-Net's norm_eps: the reference fixes it here.
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.linear_projection = linear_projection
        if linear_projection:
            self.proj_in, self.proj_out = nn.Linear(channels, channels), nn.Linear(channels, channels)
        else:
            self.proj_in, self.proj_out = nn.Conv2d(channels, channels, 1), nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            CrossAttentionBlock(channels, num_heads, context_dim, dropout) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        if self.linear_projection:
            y = self.proj_in(y.flatten(2).transpose(1, 2))  # (B, H*W, C)
        else:
            y = self.proj_in(y).flatten(2).transpose(1, 2)  # (B, H*W, C)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear_projection:
            y = self.proj_out(y).transpose(1, 2).reshape(b, c, h, w)
        else:
            y = self.proj_out(y.transpose(1, 2).reshape(b, c, h, w))  # (B, C, H, W)
        return x + y


class UNetDownBlock(nn.Module):
    """Residual blocks, each optionally followed by a spatial transformer, then an optional 2x
    downsampler. Every intermediate map is kept as a skip connection for the up path.

    forward(x (B, C_in, H, W), temb (B, T), context (B, S, D) | None) -> (x (B, C_out, H', W'),
    skips: one map per residual block, plus the downsampled map when there is a downsampler).
    """

    def __init__(self, resnets: list[ResBlock2D], attentions: list[SpatialTransformer] | None = None,
                 downsample: Downsample2D | None = None):
        super().__init__()
        if attentions is not None and len(attentions) != len(resnets):
            raise ValueError(f"UNetDownBlock: {len(attentions)} attentions for {len(resnets)} resnets")
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions is not None else None
        self.downsample = downsample

    def forward(self, x: torch.Tensor, temb: torch.Tensor,
                context: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)  # (B, C_out, H/2, W/2)
            skips.append(x)
        return x, skips


class UNetMidBlock(nn.Module):
    """The bottleneck: resnets[0], then (attention, resnet) pairs.

    forward(x (B, C, H, W), temb (B, T), context (B, S, D)) -> (B, C, H, W).
    """

    def __init__(self, resnets: list[ResBlock2D], attentions: list[SpatialTransformer]):
        super().__init__()
        if len(resnets) != len(attentions) + 1:
            raise ValueError(f"UNetMidBlock: needs one more resnet than attentions, got {len(resnets)} and "
                             f"{len(attentions)}")
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attention(x, context), temb)
        return x


class UNetUpBlock(nn.Module):
    """Residual blocks, each fed the running map concatenated (on channels) with the most recent
    unused skip connection and optionally followed by a spatial transformer, then an optional 2x
    upsampler.

    forward(x (B, C, H, W), skips (consumed from the end, one per resnet), temb (B, T),
    context (B, S, D) | None) -> (B, C_out, H', W').
    """

    def __init__(self, resnets: list[ResBlock2D], attentions: list[SpatialTransformer] | None = None,
                 upsample: Upsample2D | None = None):
        super().__init__()
        if attentions is not None and len(attentions) != len(resnets):
            raise ValueError(f"UNetUpBlock: {len(attentions)} attentions for {len(resnets)} resnets")
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions is not None else None
        self.upsample = upsample

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor,
                context: torch.Tensor | None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)  # (B, C + C_skip, H, W) in
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsample is not None:
            x = self.upsample(x)  # (B, C_out, 2H, 2W)
        return x
