"""Patch embeddings: 2D image patches (ViT) and 3D spacetime tubelets (video)."""
from __future__ import annotations

import torch
import torch.nn as nn


class PatchEmbed2D(nn.Module):
    """Non-overlapping p x p patches linearly embedded (a strided conv).

    pixel_values (B, C, H, W) -> tokens (B, (H/p)*(W/p), D), row-major patch order.
    """

    def __init__(self, patch_size: int, in_channels: int, dim: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        _, _, h, w = pixel_values.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of patch_size {self.patch_size}")
        x = self.proj(pixel_values.to(self.proj.weight.dtype))  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class PatchEmbed3D(nn.Module):
    """Spacetime tubelets of t x p x p voxels linearly embedded (Sora/ViViT style).

    video (B, C, T, H, W) -> tokens (B, (T/t)*(H/p)*(W/p), D), time-major order.
    """

    def __init__(self, tubelet: int, patch_size: int, in_channels: int, dim: int, bias: bool = True):
        super().__init__()
        self.tubelet, self.patch_size = tubelet, patch_size
        size = (tubelet, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=size, stride=size, bias=bias)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        _, _, t, h, w = video.shape
        if t % self.tubelet or h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"video size {t}x{h}x{w} is not a multiple of tubelet {self.tubelet} x patch {self.patch_size}"
            )
        x = self.proj(video.to(self.proj.weight.dtype))  # (B, D, T/t, H/p, W/p)
        return x.flatten(2).transpose(1, 2)


def grid_positions(*sizes: int, device=None) -> torch.Tensor:
    """Integer coordinates of a row-major grid: sizes (h, w) -> (h*w, 2); (t, h, w) -> (t*h*w, 3).

    Feed these to `RotaryEmbedding(axes=len(sizes))` for 2D/3D RoPE on patch tokens.
    """
    axes = torch.meshgrid(*[torch.arange(s, device=device) for s in sizes], indexing="ij")
    return torch.stack([a.reshape(-1) for a in axes], dim=-1)
