"""A one-layer convolutional image tower that pools its feature map over a coarse grid of cells.

One convolution (a filter bank), ReLU, then the maximum and the mean of every filter's response
over each cell of a `grid` x `grid` partition of the image: one token per cell, 2 x filters wide.
The max over a cell does not depend on where in the cell an object sits, so what an object *is*
(its outline, read by edge filters) stays separable from *where* it is, and the mean keeps how
much of the cell it covers. There is no norm on the tokens: how strongly a cell responds says
whether anything is there (on the shapes world an empty cell's token is ~4x shorter than an
object's), which a per-token norm would erase, leaving empty cells as loud as objects.

Meant to be used frozen at its initialisation, as a fixed feature extractor for a model trained
from scratch in minutes: random filters followed by rectification and pooling are known to be
strong features on their own (Jarrett et al. 2009, "What is the best multi-stage architecture for
object recognition?"; Saxe et al. 2011, "On random weights and unsupervised feature learning").
Measured on the shapes world (`benchmarks/probe_vision_cells.py quickstart`): a linear probe
reads each object's shape from its cell token at 95% against 50% for a frozen random patch
projection of the same cells, whose shape information is tied to the object's offset in the cell.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.bounds import MAX_IMAGE_CHANNELS, MAX_IMAGE_SIZE, MAX_KERNEL_SIZE, MAX_POSITIONS, MAX_WIDTH, check_int
from polymodal.encoders.convnet import ConvNetOutput
from polymodal.errors import ConfigError


@dataclass
class GridPoolConfig:
    """filters: the convolution's output channels (tokens are 2 x filters wide: max, then mean);
    kernel_size / stride: the convolution's (padding kernel_size // 2); grid: cells per side,
    so an image gives grid^2 tokens at any resolution."""

    image_size: int = 96
    num_channels: int = 3
    filters: int = 64
    kernel_size: int = 5
    stride: int = 2
    grid: int = 3

    @property
    def hidden_size(self) -> int:
        """Width of each output token: every filter's max, then its mean, over the cell."""
        return 2 * self.filters

    def __post_init__(self) -> None:
        """Check every size against `polymodal.bounds` before anything is built."""
        ceilings = {"image_size": MAX_IMAGE_SIZE, "num_channels": MAX_IMAGE_CHANNELS, "filters": MAX_WIDTH,
                    "kernel_size": MAX_KERNEL_SIZE, "stride": MAX_KERNEL_SIZE,
                    "grid": math.isqrt(MAX_POSITIONS)}  # grid^2 tokens per image
        for name in ceilings:
            if getattr(self, name) < 1:
                raise ConfigError(f"GridPoolConfig.{name} must be positive, got {getattr(self, name)}")
        for name, ceiling in ceilings.items():
            check_int("GridPoolConfig", name, getattr(self, name), 1, ceiling)
        side = (self.image_size + 2 * (self.kernel_size // 2) - self.kernel_size) // self.stride + 1
        if side < self.grid:
            raise ConfigError(f"GridPoolConfig: a {self.image_size} px image gives a {side} x {side} feature map "
                              f"at stride {self.stride}, smaller than the {self.grid} x {self.grid} grid")


class GridPoolConvNet(nn.Module):
    """pixel_values (B, C, H, W) -> ConvNetOutput(last_hidden_state (B, grid^2, 2F) in row-major
    cell order, pooler_output (B, 2F) = the tokens' mean)."""

    family = "gridpool"

    def __init__(self, config: GridPoolConfig):
        super().__init__()
        self.config = c = config
        self.conv = nn.Conv2d(c.num_channels, c.filters, c.kernel_size, stride=c.stride,
                              padding=c.kernel_size // 2, bias=False)
        self.reset_filters()

    @torch.no_grad()
    def reset_filters(self) -> None:
        """Gaussian filters made zero-mean and unit-norm: a flat region (background, the inside of a
        shape) gives no response, so the rectified maps mark edges, and every filter speaks on the
        same scale."""
        weight = torch.randn_like(self.conv.weight)
        weight -= weight.mean(dim=(1, 2, 3), keepdim=True)
        self.conv.weight.copy_(weight / weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1))

    def forward(self, pixel_values: torch.Tensor) -> ConvNetOutput:
        # channels_last: oneDNN's convolution is ~6x faster in that layout on CPU (64 filters, 96 px).
        pixels = pixel_values.to(self.conv.weight.dtype).contiguous(memory_format=torch.channels_last)
        # In place: allocating a second map this size made the whole forward ~4x slower on CPU (6 against 28 ms, 56 images).
        response = F.relu(self.conv(pixels), inplace=True)  # (B, F, h, w)
        grid = self.config.grid
        cells = torch.cat([F.adaptive_max_pool2d(response, grid), F.adaptive_avg_pool2d(response, grid)], dim=1)
        tokens = cells.flatten(2).transpose(1, 2)  # (B, grid^2, 2F)
        return ConvNetOutput(tokens, tokens.mean(1))
