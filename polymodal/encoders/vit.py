"""Vision Transformer with the options CLIP-ViT and SigLIP need.

- class token (CLIP) or none (SigLIP); pre-norm before the blocks (CLIP's `pre_layrnorm`);
- post-norm on the pooled class token only (CLIP) or on every token (SigLIP);
- pooling: class token ("cls"), multi-head attention pooling with a learned probe ("map",
  SigLIP's head), mean over patches ("mean") or none;
- quick-GELU (CLIP), tanh-GELU (SigLIP) or exact GELU;
- learned position embeddings, bicubically interpolated for other input resolutions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from polymodal.bounds import (
    MAX_IMAGE_CHANNELS,
    MAX_IMAGE_SIZE,
    MAX_POSITIONS,
    check_float,
    check_int,
    check_transformer_sizes,
)
from polymodal.nn.attention import Attention
from polymodal.nn.mlp import GeluMLP
from polymodal.nn.patch_embed import PatchEmbed2D
from polymodal.nn.transformer import TransformerStack, build_block


@dataclass
class ViTConfig:
    """ViT sizes and options (defaults: CLIP ViT-B/16 layout at 224 px)."""

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    act: str = "quick_gelu"
    norm_eps: float = 1e-5
    class_token: bool = True
    pre_norm: bool = True
    post_norm: str = "pooled"  # "pooled" (CLIP), "all" (SigLIP) or "none"
    pool: str = "cls"  # "cls", "map", "mean" or "none"
    patch_bias: bool = False

    @property
    def grid(self) -> int:
        """Patches per side at the native resolution."""
        return self.image_size // self.patch_size

    def __post_init__(self) -> None:
        """Check every size against `polymodal.bounds` before anything is built."""
        owner = "ViTConfig"
        check_int(owner, "image_size", self.image_size, 1, MAX_IMAGE_SIZE)
        check_int(owner, "patch_size", self.patch_size, 1, self.image_size)
        # The position table holds grid^2 rows: keep the patches per image within the positions bound.
        check_int(owner, "image_size // patch_size", self.grid, 1, math.isqrt(MAX_POSITIONS))
        check_int(owner, "num_channels", self.num_channels, 1, MAX_IMAGE_CHANNELS)
        check_transformer_sizes(owner, self, min_layers=0)  # 0 layers: the patch projection alone
        check_float(owner, "norm_eps", self.norm_eps, 0, 1, low_open=True)


@dataclass
class ViTOutput:
    """last_hidden_state (B, N, D); pooler_output (B, D) or None; hidden_states: embeddings + each layer."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None = None
    hidden_states: list[torch.Tensor] | None = None


class AttentionPool(nn.Module):
    """Multi-head attention pooling with one learned probe (SigLIP's MAP head). x (B, N, D) -> (B, D)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float, act: str):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.attn = Attention(dim, num_heads, qkv_bias=True, out_bias=True)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = GeluMLP(dim, mlp_hidden, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.attn(self.probe.expand(x.shape[0], -1, -1), context=x)  # (B, 1, D)
        pooled = pooled + self.mlp(self.norm(pooled))
        return pooled[:, 0]


class VisionTransformer(nn.Module):
    """pixel_values (B, C, H, W) -> ViTOutput. H, W may differ from config.image_size (positions interpolated)."""

    family = "vit"

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = c = config
        if c.post_norm not in ("pooled", "all", "none") or c.pool not in ("cls", "map", "mean", "none"):
            raise ValueError(f"ViTConfig: bad post_norm {c.post_norm!r} or pool {c.pool!r}")
        if c.pool == "cls" and not c.class_token:
            raise ValueError("ViTConfig: pool='cls' needs class_token=True")
        self.patch_embed = PatchEmbed2D(c.patch_size, c.num_channels, c.hidden_size, bias=c.patch_bias)
        self.class_embedding = nn.Parameter(torch.randn(c.hidden_size) * 0.02) if c.class_token else None
        self.position_embedding = nn.Parameter(torch.randn(c.grid ** 2 + int(c.class_token), c.hidden_size) * 0.02)
        self.pre_norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps) if c.pre_norm else None
        self.encoder = TransformerStack([
            build_block(c.hidden_size, c.num_heads, c.intermediate_size, norm="layer", norm_eps=c.norm_eps,
                        mlp="gelu", act=c.act, qkv_bias=True, out_bias=True, mlp_bias=True)
            for _ in range(c.num_layers)
        ])
        self.post_norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps) if c.post_norm != "none" else None
        self.head = AttentionPool(c.hidden_size, c.num_heads, c.intermediate_size, c.norm_eps, c.act) if c.pool == "map" else None

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> ViTOutput:
        c = self.config
        x = self.patch_embed(pixel_values)  # (B, N, D)
        grid_h, grid_w = pixel_values.shape[-2] // c.patch_size, pixel_values.shape[-1] // c.patch_size
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)  # (B, 1+N, D)
        x = x + self.position_embeddings_for(grid_h, grid_w).to(x.dtype)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        x, states = self.encoder(x, return_all=True)
        pooled = None
        if c.post_norm == "all":
            x = self.post_norm(x)
        if c.pool == "cls":
            pooled = x[:, 0] if self.post_norm is None or c.post_norm == "all" else self.post_norm(x[:, 0])
        elif c.pool == "map":
            pooled = self.head(x)
        elif c.pool == "mean":
            pooled = x[:, int(c.class_token):].mean(1)
        return ViTOutput(x, pooled, states if output_hidden_states else None)

    def position_embeddings_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position table (1 + h*w or h*w, D) for a grid_h x grid_w patch grid (bicubic when resized)."""
        c, table = self.config, self.position_embedding
        if grid_h == grid_w == c.grid:
            return table
        cls, patches = table[: int(c.class_token)], table[int(c.class_token):]
        patches = patches.reshape(1, c.grid, c.grid, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        patches = F.interpolate(patches.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patches = patches.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1).to(table.dtype)
        return torch.cat([cls, patches], dim=0)

    def patch_features(self, pixel_values: torch.Tensor, layer: int = -1, drop_class_token: bool = True) -> torch.Tensor:
        """Features of one layer for a projector (LLaVA uses layer -2 without the class token). -> (B, N, D)."""
        states = self.forward(pixel_values, output_hidden_states=True).hidden_states
        feats = states[layer]
        return feats[:, 1:] if drop_class_token and self.class_embedding is not None else feats
