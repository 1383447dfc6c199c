"""A Stable-Diffusion-shaped U-Net denoiser (Rombach et al., 2022): the `UNet2DConditionModel`
layout of diffusers, built from `polymodal.nn` parts.

    timesteps -> sinusoidal features -> MLP -> temb (+ class embedding)
    latents -> conv_in -> down blocks (resnets [+ spatial transformers], downsample) --skips--+
            -> mid block (resnet, transformer, resnet)                                        |
            -> up blocks (resnets on [map, skip] [+ transformers], upsample) <----------------+
            -> GroupNorm -> SiLU -> conv_out -> prediction, shaped like the latents

The transformers cross-attend to `encoder_hidden_states` (a text encoder's token states). The
network only predicts; schedules, objectives and samplers live in `generators.diffusion`, which
calls it as `f(x_t, t, cond)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from polymodal.bounds import (
    MAX_HEADS,
    MAX_IMAGE_CHANNELS,
    MAX_IMAGE_SIZE,
    MAX_LAYERS,
    MAX_VOCAB,
    MAX_WIDTH,
    check_float,
    check_int,
    check_length,
    check_multiple,
)
from polymodal.errors import ConfigError
from polymodal.generators.unet_blocks import (
    SpatialTransformer,
    UNetDownBlock,
    UNetMidBlock,
    UNetUpBlock,
)
from polymodal.nn.conv_blocks import Downsample2D, ResBlock2D, Upsample2D
from polymodal.nn.mlp import GeluMLP
from polymodal.nn.timestep import timestep_embedding

_PER_BLOCK = ("down_cross_attention", "up_cross_attention", "layers_per_block", "transformer_layers_per_block",
              "num_heads")


@dataclass
class UNetConfig:
    """U-Net sizes and options (defaults: Stable Diffusion 1.x at 64x64 latents).

    Per-block tuples have one entry per resolution level. Down-path entries run from the finest
    level to the coarsest; `up_cross_attention` runs in up-path order (coarsest first), and the
    up path reuses the other per-block sizes reversed. The mid block uses the coarsest level's.

    block_out_channels: width of each level; each a multiple of norm_groups and of its num_heads.
    down_cross_attention / up_cross_attention: which blocks carry spatial transformers.
    layers_per_block: residual blocks per down block (up blocks have one more, for the
        downsampler's skip). transformer_layers_per_block: CrossAttentionBlocks per transformer.
    num_heads: attention heads per level (head width = channels // heads).
    cross_attention_dim: width of `encoder_hidden_states`.
    use_linear_projection: Linear proj_in/proj_out (SD 2) instead of 1x1 convolutions (SD 1).
    flip_sin_to_cos / freq_shift: timestep features as [cos, sin] instead of [sin, cos];
        frequencies exp(-ln(10000) * i / (half - freq_shift)).
    downsample_padding: 1 pads every side of the stride-2 conv, 0 pads right/bottom only.
    mid_block_scale_factor: the mid block's resnets divide their output sum by it.
    num_class_embeds: a class-label table added to the time embedding, or None.
    sample_size: the latent side the model was trained at (metadata for samplers; None: unknown).
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_cross_attention: tuple[bool, ...] = (True, True, True, False)
    up_cross_attention: tuple[bool, ...] = (False, True, True, True)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    num_heads: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    norm_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    num_class_embeds: int | None = None
    dropout: float = 0.0
    sample_size: int | None = 64

    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding every resnet receives (4x the first level's width)."""
        return 4 * self.block_out_channels[0]

    @property
    def num_downsamples(self) -> int:
        """2x downsamplings on the down path: latent sides must be multiples of 2**this."""
        return len(self.block_out_channels) - 1

    def __post_init__(self) -> None:
        """Check every size against `polymodal.bounds` before anything is built."""
        owner = "UNetConfig"
        check_int(owner, "in_channels", self.in_channels, 1, MAX_IMAGE_CHANNELS)
        check_int(owner, "out_channels", self.out_channels, 1, MAX_IMAGE_CHANNELS)
        check_length(owner, "block_out_channels", self.block_out_channels, 1, MAX_LAYERS)
        self.block_out_channels = tuple(self.block_out_channels)
        levels = len(self.block_out_channels)
        for name in _PER_BLOCK:
            check_length(owner, name, getattr(self, name), levels, levels)
            setattr(self, name, tuple(getattr(self, name)))
        check_int(owner, "norm_groups", self.norm_groups, 1, MAX_WIDTH)
        for i, width in enumerate(self.block_out_channels):
            check_int(owner, f"block_out_channels[{i}]", width, 1, MAX_WIDTH)
            check_multiple(owner, f"block_out_channels[{i}]", width, "norm_groups", self.norm_groups)
            check_int(owner, f"num_heads[{i}]", self.num_heads[i], 1, MAX_HEADS)
            check_multiple(owner, f"block_out_channels[{i}]", width, f"num_heads[{i}]", self.num_heads[i])
            check_int(owner, f"layers_per_block[{i}]", self.layers_per_block[i], 1, MAX_LAYERS)
            check_int(owner, f"transformer_layers_per_block[{i}]", self.transformer_layers_per_block[i], 1,
                      MAX_LAYERS)
        for name in ("down_cross_attention", "up_cross_attention"):
            if not all(isinstance(flag, bool) for flag in getattr(self, name)):
                raise ConfigError(f"{owner}.{name} must hold booleans, got {getattr(self, name)!r}")
        # Per-level counts multiply: bound the totals so a hostile config cannot build millions of modules.
        check_int(owner, "sum(layers_per_block)", sum(self.layers_per_block), 1, MAX_LAYERS)
        check_int(owner, "sum(transformer_layers_per_block)", sum(self.transformer_layers_per_block), 1, MAX_LAYERS)
        check_int(owner, "cross_attention_dim", self.cross_attention_dim, 1, MAX_WIDTH)
        check_float(owner, "norm_eps", self.norm_eps, 0, 1, low_open=True)
        if not isinstance(self.flip_sin_to_cos, bool) or not isinstance(self.use_linear_projection, bool):
            raise ConfigError(f"{owner}.flip_sin_to_cos and use_linear_projection must be booleans")
        # The frequency denominator half - freq_shift must stay positive.
        check_int(owner, "freq_shift", self.freq_shift, 0, max(self.block_out_channels[0] // 2 - 1, 0))
        check_int(owner, "downsample_padding", self.downsample_padding, 0, 1)
        check_float(owner, "mid_block_scale_factor", self.mid_block_scale_factor, 0, low_open=True)
        if self.num_class_embeds is not None:
            check_int(owner, "num_class_embeds", self.num_class_embeds, 1, MAX_VOCAB)
        check_float(owner, "dropout", self.dropout, 0, 1, high_open=True)
        if self.sample_size is not None:
            check_int(owner, "sample_size", self.sample_size, 1, MAX_IMAGE_SIZE)


class UNet(nn.Module):
    """The conditional U-Net denoiser; see the module docstring for the data flow.

    forward(latents (B, C_in, H, W), timesteps (B,) or a scalar, class_labels (B,) | None,
    encoder_hidden_states (B, S, cross_attention_dim)) -> (B, C_out, H, W), the prediction
    (noise, x0 or velocity: the objective decides). H and W must be multiples of
    2**config.num_downsamples.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        widths, temb = c.block_out_channels, c.time_embed_dim
        # The time MLP is linear -> SiLU -> linear, which GeluMLP computes with act="silu".
        self.time_embedding = GeluMLP(widths[0], temb, act="silu", out_dim=temb)
        self.class_embedding = nn.Embedding(c.num_class_embeds, temb) if c.num_class_embeds else None
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)

        def resnet(in_ch: int, out_ch: int, scale: float = 1.0) -> ResBlock2D:
            return ResBlock2D(in_ch, out_ch, temb_dim=temb, groups=c.norm_groups, eps=c.norm_eps, dropout=c.dropout,
                              output_scale=scale)

        def transformer(channels: int, heads: int, layers: int) -> SpatialTransformer:
            return SpatialTransformer(channels, heads, c.cross_attention_dim, num_layers=layers, groups=c.norm_groups,
                                      linear_projection=c.use_linear_projection, dropout=c.dropout)

        last = len(widths) - 1
        self.down_blocks = nn.ModuleList()
        out_ch = widths[0]
        for i, width in enumerate(widths):
            in_ch, out_ch = out_ch, width
            n = c.layers_per_block[i]
            self.down_blocks.append(UNetDownBlock(
                [resnet(in_ch if j == 0 else out_ch, out_ch) for j in range(n)],
                [transformer(out_ch, c.num_heads[i], c.transformer_layers_per_block[i]) for _ in range(n)]
                if c.down_cross_attention[i] else None,
                Downsample2D(out_ch, asymmetric_pad=c.downsample_padding == 0) if i < last else None))

        scale = c.mid_block_scale_factor
        self.mid_block = UNetMidBlock(
            [resnet(widths[-1], widths[-1], scale), resnet(widths[-1], widths[-1], scale)],
            [transformer(widths[-1], c.num_heads[-1], c.transformer_layers_per_block[-1])])

        self.up_blocks = nn.ModuleList()
        out_ch = widths[-1]
        for i in range(len(widths)):
            level = last - i  # the down-path level this up block mirrors
            prev_ch, out_ch = out_ch, widths[level]
            # The last resnet takes the skip saved before this level's downsampler: the next level down's width.
            skip_in = widths[max(level - 1, 0)]
            n = c.layers_per_block[level] + 1
            self.up_blocks.append(UNetUpBlock(
                [resnet((prev_ch if j == 0 else out_ch) + (skip_in if j == n - 1 else out_ch), out_ch)
                 for j in range(n)],
                [transformer(out_ch, c.num_heads[level], c.transformer_layers_per_block[level]) for _ in range(n)]
                if c.up_cross_attention[i] else None,
                Upsample2D(out_ch) if i < last else None))

        self.conv_norm_out = nn.GroupNorm(c.norm_groups, widths[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(widths[0], c.out_channels, 3, padding=1)

    def _time_embedding(self, timesteps: torch.Tensor | float, class_labels: torch.Tensor | None,
                        batch: int, like: torch.Tensor) -> torch.Tensor:
        """temb (B, time_embed_dim) from the timesteps (and class labels), in `like`'s dtype."""
        c = self.config
        t = torch.as_tensor(timesteps, device=like.device)
        if t.dim() == 0:
            t = t.expand(batch)
        elif t.shape != (batch,):
            raise ValueError(f"UNet: timesteps must be a scalar or of shape ({batch},), got {tuple(t.shape)}")
        features = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        temb = self.time_embedding(features.to(like.dtype))  # (B, T)
        if self.class_embedding is None:
            if class_labels is not None:
                raise ValueError("UNet: class_labels given, but the model has no class embedding (num_class_embeds)")
            return temb
        if class_labels is None:
            raise ValueError(f"UNet: class_labels (B,) are required: the model embeds {c.num_class_embeds} classes")
        return temb + self.class_embedding(class_labels).to(temb.dtype)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        b, _, h, w = latents.shape
        factor = 2 ** c.num_downsamples
        if h % factor or w % factor:
            raise ValueError(f"UNet: latent size {h}x{w} is not divisible by {factor} (the U-Net downsamples "
                             f"{c.num_downsamples} times); pad or resize the latents")
        if encoder_hidden_states is None or encoder_hidden_states.shape[-1] != c.cross_attention_dim:
            got = None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)
            raise ValueError(f"UNet: encoder_hidden_states of shape (B, S, {c.cross_attention_dim}) are required "
                             f"for cross-attention, got {got}")
        context = encoder_hidden_states
        temb = self._time_embedding(timesteps, class_labels, b, latents)

        x = self.conv_in(latents)  # (B, C0, H, W)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips.extend(block_skips)
        x = self.mid_block(x, temb, context)  # (B, C_last, H / 2**n, W / 2**n)
        for block in self.up_blocks:
            x = block(x, skips, temb, context)  # pops one skip per resnet
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, C_out, H, W)


TINY_UNET = dict(in_channels=4, out_channels=4, block_out_channels=(32, 64), down_cross_attention=(True, False),
                 up_cross_attention=(False, True), layers_per_block=(1, 1), transformer_layers_per_block=(1, 1),
                 num_heads=(2, 4), cross_attention_dim=32, norm_groups=8, sample_size=16)


def unet_tiny(**overrides) -> UNet:
    """A two-level U-Net for tests (16x16x4 latents, 32-wide context); `overrides` replace
    `TINY_UNET` fields."""
    return UNet(UNetConfig(**{**TINY_UNET, **overrides}))
