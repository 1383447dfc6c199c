"""A small convolutional image tower for contrastive training from scratch on a CPU.

Stages of [stride-2 3x3 conv -> GroupNorm -> GELU -> residual 3x3 conv block]; the final feature
map is flattened into tokens (for a CoCa decoder's cross-attention) and pooled into one vector.
GroupNorm rather than BatchNorm: a contrastive batch is split across ranks and accumulation
steps, and batch statistics would leak information between the pairs of a batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from polymodal.bounds import (
    MAX_IMAGE_CHANNELS,
    MAX_IMAGE_SIZE,
    MAX_LAYERS,
    MAX_WIDTH,
    check_int,
    check_length,
    check_multiple,
)


@dataclass
class ConvNetConfig:
    """widths: channels per stage (each stage halves the resolution); pool: "mean" (global average)
    or "flatten" (a linear over the whole final map, which keeps where things are);
    position_embedding: add a learned embedding per final-map cell to the tokens, so a consumer
    that reads tokens individually (an LM) knows where each came from — convolutions alone only
    tell it through border effects."""

    image_size: int = 64
    num_channels: int = 3
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    groups: int = 8
    pool: str = "mean"
    position_embedding: bool = False

    def __post_init__(self) -> None:
        """Check every size against `polymodal.bounds` before anything is built."""
        owner = "ConvNetConfig"
        check_int(owner, "image_size", self.image_size, 1, MAX_IMAGE_SIZE)
        check_int(owner, "num_channels", self.num_channels, 1, MAX_IMAGE_CHANNELS)
        check_int(owner, "groups", self.groups, 1, MAX_WIDTH)
        check_length(owner, "widths", self.widths, 1, MAX_LAYERS)
        for i, width in enumerate(self.widths):
            check_int(owner, f"widths[{i}]", width, 1, MAX_WIDTH)
            check_multiple(owner, f"widths[{i}]", width, "groups", self.groups)  # GroupNorm splits channels evenly

    @property
    def hidden_size(self) -> int:
        """Width of the pooled feature and of each output token."""
        return self.widths[-1]

    @property
    def grid(self) -> int:
        """Side of the final feature map at `image_size` (each padded stride-2 conv takes ceil(n / 2))."""
        side = self.image_size
        for _ in self.widths:
            side = (side + 1) // 2
        return side


@dataclass
class ConvNetOutput:
    """last_hidden_state (B, h*w, C) feature-map tokens; pooler_output (B, C)."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor


class ResidualConv(nn.Module):
    """x + conv(gelu(norm(conv(x)))) at constant width. x (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.gelu(self.norm(self.conv1(x))))


class ConvNet(nn.Module):
    """pixel_values (B, C, H, W) -> ConvNetOutput; H = W = config.image_size for pool="flatten"."""

    family = "convnet"

    def __init__(self, config: ConvNetConfig):
        super().__init__()
        self.config = c = config
        if c.pool not in ("mean", "flatten"):
            raise ValueError(f"ConvNetConfig.pool must be 'mean' or 'flatten', got {c.pool!r}")
        if not c.widths or any(w % c.groups for w in c.widths):
            raise ValueError(f"ConvNetConfig.widths {c.widths} must be non-empty multiples of groups={c.groups}")
        if c.grid < 1:
            raise ValueError(f"ConvNetConfig: image_size {c.image_size} is too small for {len(c.widths)} stages")
        stages, cin = [], c.num_channels
        for width in c.widths:
            stages.append(nn.Sequential(nn.Conv2d(cin, width, 3, stride=2, padding=1), nn.GroupNorm(c.groups, width),
                                        nn.GELU(), ResidualConv(width, c.groups)))
            cin = width
        self.stages = nn.Sequential(*stages)
        # Unit scale, like the normalised features it is added to: cells differ from the first step.
        self.position_embedding = nn.Parameter(torch.randn(c.grid ** 2, c.hidden_size)) if c.position_embedding else None
        self.norm = nn.LayerNorm(c.hidden_size)
        self.pool_proj = nn.Linear(c.grid ** 2 * c.hidden_size, c.hidden_size) if c.pool == "flatten" else None

    def forward(self, pixel_values: torch.Tensor) -> ConvNetOutput:
        fmap = self.stages(pixel_values)  # (B, C, h, w)
        tokens = fmap.flatten(2).transpose(1, 2)  # (B, h*w, C)
        if self.position_embedding is not None:
            if tokens.shape[1] != self.config.grid ** 2:
                raise ValueError(f"ConvNet position_embedding needs {self.config.image_size} px inputs, "
                                 f"got {tuple(pixel_values.shape[-2:])}")
            tokens = tokens + self.position_embedding.to(tokens.dtype)
        tokens = self.norm(tokens)
        if self.pool_proj is not None:
            if tokens.shape[1] != self.config.grid ** 2:
                raise ValueError(f"ConvNet pool='flatten' needs {self.config.image_size} px inputs, "
                                 f"got {tuple(pixel_values.shape[-2:])}")
            pooled = self.pool_proj(tokens.flatten(1))  # (B, C)
        else:
            pooled = tokens.mean(1)  # (B, C)
        return ConvNetOutput(tokens, pooled)
