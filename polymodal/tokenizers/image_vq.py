"""A VQGAN-style image tokenizer (Esser et al. 2021; the image tokenizer of Chameleon and Emu3):
a convolutional encoder, a quantizer that rounds each latent pixel to one of `codebook_size`
codes, and a convolutional decoder back to pixels.

    encoder:  conv_in -> [ResBlock2D (+ SpatialSelfAttention) x layers_per_block (+ Downsample2D)]
              per width -> mid (ResBlock2D, SpatialSelfAttention, ResBlock2D)
              -> GroupNorm, SiLU, conv_out (latent_channels) -> quant_conv (1x1, embed_dim)
              -> quantizer, channels-last: codes (B, h, w)
    decoder:  codebook vectors -> post_quant_conv (1x1) -> conv_in -> mid -> [ResBlock2D
              (+ attention) x (layers_per_block + 1) (+ Upsample2D)] per width, widest first
              -> GroupNorm, SiLU, conv_out

The layout is the KL autoencoder's (`polymodal.generators.vae`: its mid block is reused as is)
plus the taming-transformers VQGAN's attention inside the levels whose resolution is listed in
`attn_resolutions` (a self-attention after every ResBlock of such a level). Every width but the
last halves the resolution, so the downsampling factor is 2 ** (len(block_out_channels) - 1).
Chameleon's released tokenizer is factor 16 with 8192 codes of width 256 (32 x 32 codes for a
512 px image); transformers ships its encoder only, so an imported Chameleon tokenizer has
`has_decoder=False` (`polymodal.interop.hf_chameleon_vq`).
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
    MAX_STEPS,
    MAX_VOCAB,
    MAX_WIDTH,
    check_float,
    check_int,
    check_length,
    check_multiple,
)
from polymodal.errors import ConfigError, UsageError
from polymodal.generators.vae import NORM_EPS, VAEMidBlock
from polymodal.nn.conv_blocks import (
    Downsample2D,
    ResBlock2D,
    SpatialSelfAttention,
    Upsample2D,
)
from polymodal.nn.quantizers import FSQ, QuantizerOutput, VectorQuantizer

QUANTIZERS = ("vq", "fsq")


@dataclass
class ImageVQConfig:
    """Sizes of an `ImageVQ` tokenizer (defaults: Chameleon's, factor 16, 8192 codes of width 256).

    image_size: the side the tokenizer is built for; it places the attention (`attn_resolutions`
    lists the feature-map sides, image_size / 2**level, whose levels get attention) and is the
    size the recipes render. Any image whose sides are multiples of the factor can be encoded.
    block_out_channels: the width of each level, finest first (multiples of norm_num_groups).
    latent_channels: the encoder's output width; quant_conv maps it to embed_dim, the width of a
    codebook vector. quantizer: "vq" (a learned codebook of codebook_size vectors: beta, ema_decay,
    cosine and restart_after as `VectorQuantizer` takes them) or "fsq" (finite scalar quantization
    on fsq_levels; then embed_dim = len(fsq_levels) and codebook_size = prod(fsq_levels)).
    has_decoder: False for an encoder-only tokenizer (Chameleon as transformers ships it).
    """

    in_channels: int = 3
    image_size: int = 512
    block_out_channels: tuple[int, ...] = (128, 128, 256, 256, 512)
    layers_per_block: int = 2
    attn_resolutions: tuple[int, ...] = ()
    mid_block_attention: bool = True
    norm_num_groups: int = 32
    latent_channels: int = 256
    embed_dim: int = 256
    quantizer: str = "vq"
    codebook_size: int = 8192
    beta: float = 0.25
    ema_decay: float | None = None
    cosine: bool = False
    restart_after: int = 0
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)
    has_decoder: bool = True

    def __post_init__(self) -> None:
        """Check every size against `polymodal.bounds` before anything is built."""
        owner = "ImageVQConfig"
        check_int(owner, "in_channels", self.in_channels, 1, MAX_IMAGE_CHANNELS)
        check_length(owner, "block_out_channels", self.block_out_channels, 1, 16)
        self.block_out_channels = tuple(self.block_out_channels)
        check_int(owner, "norm_num_groups", self.norm_num_groups, 1, MAX_WIDTH)
        for i, width in enumerate(self.block_out_channels):
            check_int(owner, f"block_out_channels[{i}]", width, 1, MAX_WIDTH)
            check_multiple(owner, f"block_out_channels[{i}]", width, "norm_num_groups", self.norm_num_groups)
        check_int(owner, "image_size", self.image_size, 1, MAX_IMAGE_SIZE)
        check_multiple(owner, "image_size", self.image_size, "the downsampling factor", self.downsample_factor)
        check_int(owner, "layers_per_block", self.layers_per_block, 1, MAX_LAYERS)
        check_length(owner, "attn_resolutions", self.attn_resolutions, 0, 16)
        self.attn_resolutions = tuple(self.attn_resolutions)
        for i, side in enumerate(self.attn_resolutions):
            check_int(owner, f"attn_resolutions[{i}]", side, 1, MAX_IMAGE_SIZE)
        check_int(owner, "latent_channels", self.latent_channels, 1, MAX_WIDTH)
        check_int(owner, "embed_dim", self.embed_dim, 1, MAX_WIDTH)
        if self.quantizer not in QUANTIZERS:
            raise ConfigError(f"{owner}.quantizer must be one of {list(QUANTIZERS)}, got {self.quantizer!r}")
        check_int(owner, "codebook_size", self.codebook_size, 1, MAX_VOCAB)
        check_float(owner, "beta", self.beta, 0, math.inf)
        if self.ema_decay is not None:
            check_float(owner, "ema_decay", self.ema_decay, 0, 1, low_open=True, high_open=True)
        check_int(owner, "restart_after", self.restart_after, 0, MAX_STEPS)
        check_length(owner, "fsq_levels", self.fsq_levels, 1, 16)
        self.fsq_levels = tuple(self.fsq_levels)
        for i, level in enumerate(self.fsq_levels):
            check_int(owner, f"fsq_levels[{i}]", level, 2, MAX_VOCAB)
        for flag in ("mid_block_attention", "cosine", "has_decoder"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{owner}.{flag} must be a bool, got {getattr(self, flag)!r}")
        if self.quantizer == "fsq":
            if self.embed_dim != len(self.fsq_levels):
                raise ConfigError(f"{owner}.embed_dim ({self.embed_dim}) must equal the number of fsq_levels "
                                  f"({len(self.fsq_levels)}) for the fsq quantizer")
            if self.codebook_size != math.prod(self.fsq_levels):
                raise ConfigError(f"{owner}.codebook_size ({self.codebook_size}) must equal the product of "
                                  f"fsq_levels ({math.prod(self.fsq_levels)}) for the fsq quantizer")

    @property
    def downsample_factor(self) -> int:
        """Pixels per code along each side: 2 ** (number of widths - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def grid(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """The code grid (h, w) of an image of side `image_size` (or (height, width)); a ValueError
        naming the size when a side is not a multiple of the downsampling factor."""
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        f = self.downsample_factor
        if height % f or width % f:
            raise UsageError(f"a {height}x{width} image is an image whose size the tokenizer cannot tile: height and "
                             f"width must be multiples of its downsampling factor {f} (resize or pad to "
                             f"{math.ceil(height / f) * f}x{math.ceil(width / f) * f})")
        return height // f, width // f


@dataclass
class ImageVQOutput:
    """What `ImageVQ.forward` returns: reconstruction (B, C, H, W), codes (B, h, w) long and the
    quantizer's loss (a scalar: codebook + beta * commitment for "vq", zero for "fsq")."""

    reconstruction: torch.Tensor
    codes: torch.Tensor
    quantizer_loss: torch.Tensor


class ImageVQStage(nn.Module):
    """One resolution level: `num_blocks` ResBlock2D (the first changes the width), each followed by
    one-head self-attention over the pixels when `attention`, then an optional resampler.
    x (B, C_in, H, W) -> (B, C_out, H', W') with H' = H/2, 2H or H."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, groups: int, attention: bool,
                 downsample: Downsample2D | None = None, upsample: Upsample2D | None = None):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResBlock2D(in_channels if i == 0 else out_channels, out_channels, groups=groups, eps=NORM_EPS)
            for i in range(num_blocks))
        self.attentions = nn.ModuleList(
            SpatialSelfAttention(out_channels, groups=groups, eps=NORM_EPS) for _ in range(num_blocks)
        ) if attention else None
        self.downsample = downsample
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.resnets):
            x = block(x)
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class ImageVQEncoder(nn.Module):
    """pixels (B, in_channels, H, W) -> latents (B, latent_channels, H/f, W/f), before quant_conv."""

    def __init__(self, config: ImageVQConfig):
        super().__init__()
        widths, groups, last = config.block_out_channels, config.norm_num_groups, len(config.block_out_channels) - 1
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            ImageVQStage(widths[max(i - 1, 0)], width, config.layers_per_block, groups,
                         attention=config.image_size // 2 ** i in config.attn_resolutions,
                         downsample=Downsample2D(width, asymmetric_pad=True) if i < last else None)
            for i, width in enumerate(widths))
        self.mid_block = VAEMidBlock(widths[-1], groups, config.mid_block_attention)
        self.norm_out = nn.GroupNorm(groups, widths[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], config.latent_channels, 3, padding=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(pixels)  # (B, widths[0], H, W)
        for stage in self.down_blocks:
            x = stage(x)  # (B, width, H/2**i, W/2**i) after the i-th halving
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, latent_channels, H/f, W/f)


class ImageVQDecoder(nn.Module):
    """latents (B, latent_channels, h, w), after post_quant_conv -> pixels (B, in_channels, h*f, w*f)."""

    def __init__(self, config: ImageVQConfig):
        super().__init__()
        widths, groups = config.block_out_channels[::-1], config.norm_num_groups  # widest first
        smallest = config.image_size // config.downsample_factor
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = VAEMidBlock(widths[0], groups, config.mid_block_attention)
        # One more ResBlock per level than the encoder, as in taming's VQGAN decoder.
        self.up_blocks = nn.ModuleList(
            ImageVQStage(widths[max(i - 1, 0)], width, config.layers_per_block + 1, groups,
                         attention=smallest * 2 ** i in config.attn_resolutions,
                         upsample=Upsample2D(width) if i < len(widths) - 1 else None)
            for i, width in enumerate(widths))
        self.norm_out = nn.GroupNorm(groups, widths[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], config.in_channels, 3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(latents))  # (B, widest, h, w)
        for stage in self.up_blocks:
            x = stage(x)  # doubles h and w at every level but the last
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, in_channels, H, W)


def build_quantizer(config: ImageVQConfig) -> nn.Module:
    """The quantizer a config names: a `VectorQuantizer` or an `FSQ` over embed_dim channels."""
    if config.quantizer == "fsq":
        return FSQ(config.fsq_levels)
    return VectorQuantizer(config.codebook_size, config.embed_dim, beta=config.beta, ema_decay=config.ema_decay,
                           cosine=config.cosine, restart_after=config.restart_after)


class ImageVQ(nn.Module):
    """The image tokenizer (see the module docstring).

    encode(pixels (B, C, H, W) in [-1, 1]) -> codes (B, H/f, W/f) long; decode(codes) -> pixels
    (B, C, H, W) in the [-1, 1] scale (not clamped); forward(pixels) -> `ImageVQOutput` for
    training. H and W must be multiples of `downsample_factor`. The quantizer counts the codes
    that training-mode forwards emit (`usage()`, `reset_usage()`).
    """

    family = "image_vq"  # its registry family (polymodal.models.image_vq)

    def __init__(self, config: ImageVQConfig):
        super().__init__()
        self.config = config
        self.encoder = ImageVQEncoder(config)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.embed_dim, 1)
        self.quantizer = build_quantizer(config)
        # Kept without a decoder too: Chameleon's checkpoint stores it, and a decoder trained later
        # for its codes starts from it.
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.latent_channels, 1)
        self.decoder = ImageVQDecoder(config) if config.has_decoder else None

    @property
    def downsample_factor(self) -> int:
        """Pixels per code along each side."""
        return self.config.downsample_factor

    @property
    def codebook_size(self) -> int:
        """How many distinct codes the quantizer emits (ids 0 .. codebook_size - 1)."""
        return self.config.codebook_size

    def grid(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """The code grid (h, w) of an image of side `image_size` (or (height, width))."""
        return self.config.grid(image_size)

    def usage(self) -> float:
        """The fraction of the codebook that training-mode forwards have emitted since `reset_usage`."""
        return self.quantizer.usage()

    def reset_usage(self) -> None:
        """Start counting codebook usage afresh."""
        self.quantizer.reset_usage()

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output convolution weight: where the adaptive GAN weight compares gradients."""
        return self._require_decoder("last_layer").conv_out.weight

    def _require_decoder(self, what: str) -> ImageVQDecoder:
        if self.decoder is None:
            raise UsageError(f"ImageVQ.{what}: this tokenizer has no decoder (an encoder-only import such as "
                             "Chameleon's); it can encode images to codes but not turn codes back into pixels")
        return self.decoder

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """What the quantizer rounds: the encoder's output after quant_conv, (B, embed_dim, H/f, W/f)."""
        c = self.config.in_channels
        if pixels.ndim != 4 or pixels.shape[1] != c:
            raise UsageError(f"ImageVQ expects pixels of shape (B, {c}, H, W), got {tuple(pixels.shape)}")
        self.grid(tuple(pixels.shape[-2:]))
        return self.quant_conv(self.encoder(pixels))

    def quantize(self, features: torch.Tensor) -> QuantizerOutput:
        """The quantizer on features (B, D, h, w): quantized (B, D, h, w) straight-through, codes (B, h, w)."""
        out = self.quantizer(features.permute(0, 2, 3, 1))  # channels-last (B, h, w, D)
        return QuantizerOutput(out.quantized.permute(0, 3, 1, 2), out.codes, out.loss)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Codes (B, H/f, W/f) long of pixels (B, C, H, W) in [-1, 1]; call it in eval mode (a VQ
        quantizer in training mode may update its codebook)."""
        return self.quantize(self.features(pixels)).codes

    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """The codebook vectors (B, embed_dim, h, w) of codes (B, h, w); a ValueError names the range
        for a code outside the codebook."""
        if codes.ndim != 3 or codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise UsageError(f"ImageVQ expects integer codes of shape (B, h, w), got {codes.dtype} "
                             f"{tuple(codes.shape)}")
        n = self.codebook_size
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= n):
            raise UsageError(f"ImageVQ: codes must be in [0, {n - 1}] (the codebook has {n}), got values in "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        return self.quantizer.lookup(codes.long()).permute(0, 3, 1, 2)

    def decode_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """Pixels (B, C, h*f, w*f) of quantized vectors (B, embed_dim, h, w)."""
        decoder = self._require_decoder("decode")
        return decoder(self.post_quant_conv(vectors))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Pixels (B, C, h*f, w*f), roughly in [-1, 1] (not clamped), of codes (B, h, w)."""
        self._require_decoder("decode")  # before the codes are checked: the more useful error
        return self.decode_vectors(self.code_vectors(codes))

    def forward(self, pixels: torch.Tensor) -> ImageVQOutput:
        """Encode, quantize (straight-through) and decode pixels (B, C, H, W) -> `ImageVQOutput`.
        The training objective calls this (not encode/decode), so gradients reach the encoder."""
        self._require_decoder("forward")
        quantized = self.quantize(self.features(pixels))
        return ImageVQOutput(self.decode_vectors(quantized.quantized), quantized.codes, quantized.loss)


def image_vq_tiny() -> ImageVQConfig:
    """A three-level (factor 4) tokenizer for unit tests: 16 px images -> 4x4 codes, 32 codes of
    width 8, attention in the coarsest level and the mid block."""
    return ImageVQConfig(image_size=16, block_out_channels=(16, 32, 32), layers_per_block=1, attn_resolutions=(4,),
                         norm_num_groups=8, latent_channels=8, embed_dim=8, codebook_size=32)


__all__ = ["ImageVQ", "ImageVQConfig", "ImageVQOutput", "build_quantizer", "image_vq_tiny"]
