"""The KL-regularised convolutional autoencoder of latent diffusion (Rombach et al. 2022), laid out
as diffusers' `AutoencoderKL` (the Stable Diffusion VAE) so its checkpoints load one to one.

    encoder:  conv_in -> [ResBlock2D x layers_per_block (+ Downsample2D)] per width
              -> mid (ResBlock2D, SpatialSelfAttention, ResBlock2D) -> GroupNorm, SiLU, conv_out
              -> quant_conv (1x1): the posterior moments (mean, logvar), 2 * latent_channels wide
    decoder:  post_quant_conv (1x1) -> conv_in -> mid -> [ResBlock2D x (layers_per_block + 1)
              (+ Upsample2D)] per width, widest first -> GroupNorm, SiLU, conv_out

Every width but the last halves the resolution, so the downsampling factor is
2 ** (len(block_out_channels) - 1) (8 for Stable Diffusion's four widths).

Latent spaces. `encode` / `decode` work in the autoencoder's own, *unscaled* latent space, as
diffusers' `encode(...).latent_dist` / `decode` do. The diffusion model works in the scaled space
z = (latents - shift_factor) * scaling_factor (unit variance, roughly); `to_diffusion_space` and
`from_diffusion_space` convert, so no caller multiplies by 0.18215 by hand.
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
    MAX_LAYERS,
    MAX_WIDTH,
    check_float,
    check_int,
    check_length,
    check_multiple,
)
from polymodal.errors import ConfigError, UsageError
from polymodal.nn.conv_blocks import (
    Downsample2D,
    ResBlock2D,
    SpatialSelfAttention,
    Upsample2D,
)

NORM_EPS = 1e-6  # every GroupNorm of the SD autoencoder; diffusers fixes it (no config key)
LOGVAR_RANGE = (-30.0, 20.0)  # the posterior log-variance clamp of latent diffusion / diffusers


@dataclass
class VAEConfig:
    """Sizes of an `AutoencoderKL` (defaults: the Stable Diffusion 1.x/2.x VAE, factor 8, 4 latents).

    block_out_channels: the width of each resolution level, finest first; each is a multiple of
    norm_num_groups. scaling_factor / shift_factor: the map to the diffusion model's latent space
    (see the module docstring). use_quant_conv / use_post_quant_conv / mid_block_attention: off in
    some later VAEs (SD3 and Flux drop the 1x1 convs).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_attention: bool = True

    def __post_init__(self) -> None:
        """Check every size against `polymodal.bounds` before anything is built."""
        owner = "VAEConfig"
        check_int(owner, "in_channels", self.in_channels, 1, MAX_IMAGE_CHANNELS)
        check_int(owner, "out_channels", self.out_channels, 1, MAX_IMAGE_CHANNELS)
        check_length(owner, "block_out_channels", self.block_out_channels, 1, 16)  # 16 levels: a 2**15 factor
        self.block_out_channels = tuple(self.block_out_channels)
        check_int(owner, "norm_num_groups", self.norm_num_groups, 1, MAX_WIDTH)
        for i, width in enumerate(self.block_out_channels):
            check_int(owner, f"block_out_channels[{i}]", width, 1, MAX_WIDTH)
            check_multiple(owner, f"block_out_channels[{i}]", width, "norm_num_groups", self.norm_num_groups)
        check_int(owner, "layers_per_block", self.layers_per_block, 1, MAX_LAYERS)
        check_int(owner, "latent_channels", self.latent_channels, 1, MAX_WIDTH)
        check_int(owner, "sample_size", self.sample_size, 1, MAX_IMAGE_SIZE)
        check_float(owner, "scaling_factor", self.scaling_factor, 0, math.inf, low_open=True)
        if self.shift_factor is not None:
            check_float(owner, "shift_factor", self.shift_factor, -math.inf, math.inf)
        for flag in ("use_quant_conv", "use_post_quant_conv", "mid_block_attention"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{owner}.{flag} must be a bool, got {getattr(self, flag)!r}")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side: 2 ** (number of widths - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass
class VAEOutput:
    """What `AutoencoderKL.forward` returns: reconstruction (B, C_out, H, W) and the posterior's
    mean and clamped logvar (B, latent_channels, H/f, W/f), which the KL term reads."""

    reconstruction: torch.Tensor
    mean: torch.Tensor
    logvar: torch.Tensor


class VAEStage(nn.Module):
    """One resolution level: `num_blocks` ResBlock2D (the first changes the width), then an optional
    resampler. x (B, C_in, H, W) -> (B, C_out, H', W') with H' = H/2, 2H or H."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, groups: int,
                 downsample: Downsample2D | None = None, upsample: Upsample2D | None = None):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResBlock2D(in_channels if i == 0 else out_channels, out_channels, groups=groups, eps=NORM_EPS)
            for i in range(num_blocks))
        self.downsample = downsample
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resnets:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class VAEMidBlock(nn.Module):
    """ResBlock2D, self-attention over the pixels (optional), ResBlock2D; (B, C, h, w) -> same."""

    def __init__(self, channels: int, groups: int, attention: bool = True):
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock2D(channels, groups=groups, eps=NORM_EPS) for _ in range(2))
        # One head as wide as the channels, as in latent diffusion.
        self.attention = SpatialSelfAttention(channels, groups=groups, eps=NORM_EPS) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class VAEEncoder(nn.Module):
    """pixels (B, in_channels, H, W) -> moments (B, 2 * latent_channels, H/f, W/f), before quant_conv."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            VAEStage(widths[max(i - 1, 0)], width, config.layers_per_block, groups,
                     downsample=Downsample2D(width, asymmetric_pad=True) if i < len(widths) - 1 else None)
            for i, width in enumerate(widths))
        self.mid_block = VAEMidBlock(widths[-1], groups, config.mid_block_attention)
        self.norm_out = nn.GroupNorm(groups, widths[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(pixels)  # (B, widths[0], H, W)
        for stage in self.down_blocks:
            x = stage(x)  # (B, width, H/2**i, W/2**i) after the i-th halving
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, 2 * latent, H/f, W/f)


class VAEDecoder(nn.Module):
    """latents (B, latent_channels, h, w), after post_quant_conv -> pixels (B, out_channels, h*f, w*f)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups = config.block_out_channels[::-1], config.norm_num_groups  # widest first
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = VAEMidBlock(widths[0], groups, config.mid_block_attention)
        # One more ResBlock per level than the encoder, as in latent diffusion.
        self.up_blocks = nn.ModuleList(
            VAEStage(widths[max(i - 1, 0)], width, config.layers_per_block + 1, groups,
                     upsample=Upsample2D(width) if i < len(widths) - 1 else None)
            for i, width in enumerate(widths))
        self.norm_out = nn.GroupNorm(groups, widths[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(latents))  # (B, widest, h, w)
        for stage in self.up_blocks:
            x = stage(x)  # doubles h and w at every level but the last
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, out_channels, H, W)


def standard_normal_like(mean: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """N(0, I) noise of `mean`'s shape, dtype and device, drawn from `generator`.

    A generator on another device (a CPU generator for CUDA latents) draws there and the noise is
    moved, as diffusers' `randn_tensor` does, so one seed gives the same latents on any device.
    """
    device = generator.device if generator is not None else mean.device
    noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
    return noise.to(mean.device)


def gaussian_sample(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw mean + exp(logvar / 2) * noise from a diagonal Gaussian; all (B, C, h, w)."""
    return mean + torch.exp(0.5 * logvar) * standard_normal_like(mean, generator)


class AutoencoderKL(nn.Module):
    """The latent-diffusion KL autoencoder (diffusers `AutoencoderKL` layout and semantics).

    encode(pixels (B, C_in, H, W) in [-1, 1]) -> latents (B, latent_channels, H/f, W/f), unscaled;
    decode(latents) -> pixels (B, C_out, H, W); forward -> `VAEOutput` for training. H and W must
    be multiples of `downsample_factor`.
    """

    family = "vae"  # its registry family (polymodal.models.vae)

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        latent = config.latent_channels
        self.encoder = VAEEncoder(config)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if config.use_post_quant_conv else None
        self.decoder = VAEDecoder(config)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side (8 for Stable Diffusion)."""
        return self.config.downsample_factor

    @property
    def scaling_factor(self) -> float:
        """The multiplier from unscaled latents to the diffusion model's space."""
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        """The offset subtracted before scaling (0.0 when the config has none)."""
        return self.config.shift_factor or 0.0

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        f, c = self.downsample_factor, self.config.in_channels
        if pixels.ndim != 4 or pixels.shape[1] != c:
            raise UsageError(f"AutoencoderKL expects pixels of shape (B, {c}, H, W), got {tuple(pixels.shape)}")
        h, w = pixels.shape[-2:]
        if h % f or w % f:
            raise UsageError(f"AutoencoderKL: image height and width must be multiples of the downsampling factor "
                             f"{f}, got {h}x{w}; resize or pad to {math.ceil(h / f) * f}x{math.ceil(w / f) * f}")

    def posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The diagonal Gaussian posterior q(z | x): (mean, logvar), each (B, latent, H/f, W/f);
        logvar is clamped to [-30, 20] as in latent diffusion (keeps exp(logvar) finite)."""
        self._check_pixels(pixels)
        moments = self.encoder(pixels)  # (B, 2 * latent, h, w)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode(self, pixels: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Unscaled latents (B, latent, H/f, W/f) of pixels (B, C_in, H, W) in [-1, 1]: the posterior
        mean, or with `sample` a draw mean + exp(logvar / 2) * noise (noise from `generator`)."""
        mean, logvar = self.posterior(pixels)
        return gaussian_sample(mean, logvar, generator) if sample else mean

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels (B, C_out, h*f, w*f), roughly in [-1, 1] (not clamped), of unscaled latents (B, latent, h, w)."""
        c = self.config.latent_channels
        if latents.ndim != 4 or latents.shape[1] != c:
            raise UsageError(f"AutoencoderKL.decode expects latents of shape (B, {c}, h, w), "
                             f"got {tuple(latents.shape)}")
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def forward(self, pixels: torch.Tensor, sample_posterior: bool | None = None,
                generator: torch.Generator | None = None) -> VAEOutput:
        """Encode and decode pixels (B, C_in, H, W) -> `VAEOutput` (reconstruction, mean, logvar).

        sample_posterior: decode a posterior draw (what training optimises) or the mean; None
        follows the module's mode, a draw in training and the mean in eval. The training objective
        calls this (not `encode`/`decode`) so a DDP wrapper sees one forward per step.
        """
        mean, logvar = self.posterior(pixels)
        sample = self.training if sample_posterior is None else sample_posterior
        latents = gaussian_sample(mean, logvar, generator) if sample else mean
        return VAEOutput(self.decode(latents), mean, logvar)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output convolution weight: where the adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight

    def to_diffusion_space(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> the diffusion model's space: (latents - shift_factor) * scaling_factor."""
        return (latents - self.shift_factor) * self.scaling_factor

    def from_diffusion_space(self, z: torch.Tensor) -> torch.Tensor:
        """The diffusion model's latents -> unscaled latents for `decode`: z / scaling_factor + shift_factor."""
        return z / self.scaling_factor + self.shift_factor


def vae_tiny() -> VAEConfig:
    """A two-level (factor 2) autoencoder of widths 32/64 for unit tests, 32 px images."""
    return VAEConfig(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                     sample_size=32)


def vae_sd() -> VAEConfig:
    """The Stable Diffusion 1.x/2.x autoencoder (factor 8, 4 latent channels, ~84M parameters)."""
    return VAEConfig()


__all__ = ["AutoencoderKL", "VAEConfig", "VAEOutput", "gaussian_sample", "standard_normal_like", "vae_sd", "vae_tiny"]
