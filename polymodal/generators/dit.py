"""Diffusion Transformer (DiT, Peebles & Xie 2023): a ViT over latent patches, conditioned by adaLN-Zero.

The network only; the diffusion process (schedules, objectives, samplers, guidance) lives in
`polymodal.generators.diffusion` and calls it as `f(x_t, t, cond) -> prediction`.

- patchify: a strided conv (`PatchEmbed2D`) plus a fixed 2D sin-cos position table;
- conditioning vector c (B, D): an MLP over the sinusoidal frequency embedding of t, plus any of
  a class-label embedding (one extra row, label `num_classes`, is the null class for
  classifier-free guidance), a projected pooled text embedding;
- blocks: x += gate * attn(modulate(norm(x))); [x += cross_attn(norm(x), text tokens)];
  x += gate * mlp(modulate(norm(x))), with shift/scale/gate of each block regressed from c by
  a zero-initialised linear layer, so every block starts as the identity (adaLN-Zero);
- a final adaLN layer and a zero-initialised linear layer, then unpatchify. With `learn_sigma`
  the output carries twice the input channels (prediction, then variance interpolation).

Defaults and formulas follow diffusers' `DiTTransformer2DModel` (which holds the same weights as
the original DiT code) so its checkpoints load exactly (`polymodal.interop.diffusers_dit`).
Label dropout for classifier-free guidance is the objective's job: pass label `num_classes`.
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
    MAX_INTERMEDIATE,
    MAX_LAYERS,
    MAX_VOCAB,
    MAX_WIDTH,
    check_float,
    check_int,
    check_multiple,
)
from polymodal.errors import ConfigError
from polymodal.kernels import adaln_modulate, gated_residual
from polymodal.nn.attention import Attention
from polymodal.nn.mlp import ACTIVATIONS, GeluMLP
from polymodal.nn.patch_embed import PatchEmbed2D
from polymodal.nn.timestep import timestep_embedding


@dataclass
class DiTConfig:
    """DiT sizes and conditioning (defaults: DiT-S/2 on 32x32x4 latents, 1000 classes).

    num_classes / pooled_dim / cross_attention_dim: 0 turns that conditioning off; any
    combination may be on. norm_eps: the adaLN norms before attention and in the final layer;
    mlp_norm_eps: the adaLN norm before the MLP (diffusers' `norm_eps`, 1e-5 by default there).
    freq_shift: the timestep frequencies are exp(-ln(10000) * i / (freq_dim/2 - freq_shift));
    1 as in diffusers' DiT, 0 as in the original DiT code.
    """

    sample_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 384
    num_layers: int = 12
    num_heads: int = 6
    intermediate_size: int = 1536
    act: str = "gelu_tanh"
    qkv_bias: bool = True
    learn_sigma: bool = False
    num_classes: int = 1000
    pooled_dim: int = 0
    cross_attention_dim: int = 0
    norm_eps: float = 1e-6
    mlp_norm_eps: float = 1e-6
    freq_dim: int = 256
    freq_shift: float = 1.0

    @property
    def out_channels(self) -> int:
        """Output channels: the input's, twice over with a learned variance."""
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid(self) -> int:
        """Patches per side at the native `sample_size`."""
        return self.sample_size // self.patch_size

    def __post_init__(self) -> None:
        """Check every field against `polymodal.bounds` before anything is built."""
        owner = "DiTConfig"
        check_int(owner, "sample_size", self.sample_size, 1, MAX_IMAGE_SIZE)
        check_int(owner, "patch_size", self.patch_size, 1, self.sample_size)
        check_multiple(owner, "sample_size", self.sample_size, "patch_size", self.patch_size)
        check_int(owner, "in_channels", self.in_channels, 1, MAX_IMAGE_CHANNELS)
        check_int(owner, "hidden_size", self.hidden_size, 4, MAX_WIDTH)
        # The 2D sin-cos table gives each axis half the width, as sine and cosine halves.
        check_multiple(owner, "hidden_size", self.hidden_size, "4 (2D sin-cos positions)", 4)
        check_int(owner, "num_layers", self.num_layers, 1, MAX_LAYERS)
        check_int(owner, "num_heads", self.num_heads, 1, MAX_HEADS)
        check_multiple(owner, "hidden_size", self.hidden_size, "num_heads", self.num_heads)
        check_int(owner, "intermediate_size", self.intermediate_size, 1, MAX_INTERMEDIATE)
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"{owner}.act must be one of {sorted(ACTIVATIONS)}, got {self.act!r}")
        check_int(owner, "num_classes", self.num_classes, 0, MAX_VOCAB)
        check_int(owner, "pooled_dim", self.pooled_dim, 0, MAX_WIDTH)
        check_int(owner, "cross_attention_dim", self.cross_attention_dim, 0, MAX_WIDTH)
        check_float(owner, "norm_eps", self.norm_eps, 0, 1, low_open=True)
        check_float(owner, "mlp_norm_eps", self.mlp_norm_eps, 0, 1, low_open=True)
        check_int(owner, "freq_dim", self.freq_dim, 2, MAX_WIDTH)
        check_multiple(owner, "freq_dim", self.freq_dim, "2 (cosine and sine halves)", 2)
        check_float(owner, "freq_shift", self.freq_shift, 0, self.freq_dim // 2, high_open=True)


def sincos_positions_2d(dim: int, grid_h: int, grid_w: int, base: int) -> torch.Tensor:
    """Fixed 2D sin-cos position table (grid_h * grid_w, dim), row-major patches, float32.

    The first dim/2 channels encode the column, the last dim/2 the row, each as [sin | cos] over
    frequencies 1 / 10000^(i / (dim/4)). Coordinates are stretched to span `base` cells (the
    native grid), so another resolution interpolates the table rather than extending it.
    Computed in float64, as diffusers does, so both round to the same float32 table.
    """
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (D/4,)

    def axis(n: int) -> torch.Tensor:  # n coordinates -> (n, D/2)
        angles = torch.outer(torch.arange(n, dtype=torch.float64) / (n / base), omega)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    cols = axis(grid_w)[None].expand(grid_h, -1, -1)  # (h, w, D/2)
    rows = axis(grid_h)[:, None].expand(-1, grid_w, -1)  # (h, w, D/2)
    return torch.cat([cols, rows], dim=-1).reshape(grid_h * grid_w, dim).float()


class DiTBlock(nn.Module):
    """One adaLN-Zero transformer block, with an optional cross-attention sublayer.

    forward(x (B, N, D), c (B, D) = SiLU of the conditioning vector, context (B, S, cross_dim) |
    None) -> (B, N, D). `modulation` regresses (shift, scale, gate) for attention and the MLP.
    The affine-free norms, their modulation and the gated residuals run as `polymodal.kernels`
    (one fused pass each on CPU).
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        c, d = config, config.hidden_size
        self.attn_norm_eps, self.mlp_norm_eps = c.norm_eps, c.mlp_norm_eps
        self.attn = Attention(d, c.num_heads, qkv_bias=c.qkv_bias, out_bias=True)
        if c.cross_attention_dim:
            self.cross_norm = nn.LayerNorm(d, eps=c.norm_eps)
            self.cross_attn = Attention(d, c.num_heads, qkv_bias=c.qkv_bias, out_bias=True, kv_dim=c.cross_attention_dim)
        else:
            self.cross_norm = self.cross_attn = None
        self.mlp = GeluMLP(d, c.intermediate_size, act=c.act)
        self.modulation = nn.Linear(d, 6 * d)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # Six (B, 1, D) views of one (B, 6D) row, in the DiT paper's order.
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(c)[:, None].chunk(6, dim=-1)
        x = gated_residual(x, gate_a, self.attn(adaln_modulate(x, shift_a, scale_a, self.attn_norm_eps)))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_norm(x), context=context)
        return gated_residual(x, gate_m, self.mlp(adaln_modulate(x, shift_m, scale_m, self.mlp_norm_eps)))


class DiT(nn.Module):
    """Diffusion Transformer: noisy latents + timesteps (+ conditioning) -> prediction.

    forward(latents (B, C, H, W), timesteps (B,) or scalar, class_labels (B,) long | None,
    encoder_hidden_states (B, S, cross_dim) | None, pooled (B, pooled_dim) | None)
    -> (B, C_out, H, W), C_out = config.out_channels. H and W must be multiples of patch_size;
    other sizes than `sample_size` interpolate the position table. Each input the config
    enables is required, and the others must be None.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = c = config
        d = c.hidden_size
        self.patch_embed = PatchEmbed2D(c.patch_size, c.in_channels, d)
        self.register_buffer("pos_embed", sincos_positions_2d(d, c.grid, c.grid, c.grid), persistent=False)
        self.t_embedder = GeluMLP(c.freq_dim, d, act="silu", out_dim=d)
        # Row num_classes is the null class of classifier-free guidance.
        self.class_embedding = nn.Embedding(c.num_classes + 1, d) if c.num_classes else None
        self.pooled_embedder = GeluMLP(c.pooled_dim, d, act="silu", out_dim=d) if c.pooled_dim else None
        self.blocks = nn.ModuleList([DiTBlock(c) for _ in range(c.num_layers)])
        self.final_modulation = nn.Linear(d, 2 * d)
        self.final_proj = nn.Linear(d, c.patch_size ** 2 * c.out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT's init: Xavier-uniform linears (and patch conv), normal(0.02) embeddings, and zeros for
        every adaLN modulation and the output layer, so a fresh model predicts exactly zero. The
        cross-attention output is zeroed too (as PixArt-alpha does) so each block starts as the identity."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        conv = self.patch_embed.proj
        nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(conv.bias)
        embedders = [self.t_embedder] + ([self.pooled_embedder] if self.pooled_embedder is not None else [])
        for mlp in embedders:
            nn.init.normal_(mlp.fc1.weight, std=0.02)
            nn.init.normal_(mlp.fc2.weight, std=0.02)
        if self.class_embedding is not None:
            nn.init.normal_(self.class_embedding.weight, std=0.02)
        zeroed = [self.final_modulation, self.final_proj] + [b.modulation for b in self.blocks]
        zeroed += [b.cross_attn.o_proj for b in self.blocks if b.cross_attn is not None]
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def condition(self, timesteps: torch.Tensor | float, batch: int, class_labels: torch.Tensor | None = None,
                  pooled: torch.Tensor | None = None) -> torch.Tensor:
        """The conditioning vector c (B, D): timestep MLP + class embedding + pooled-text projection."""
        c = self.config
        given = {"class_labels": class_labels is not None, "pooled": pooled is not None}
        wanted = {"class_labels": c.num_classes > 0, "pooled": c.pooled_dim > 0}
        for name, needed in (("class_labels", "num_classes"), ("pooled", "pooled_dim")):
            if given[name] != wanted[name]:
                raise ValueError(f"DiT: {name} must be {'given' if wanted[name] else 'None'} when "
                                 f"config.{needed} = {getattr(c, needed)}")
        dtype = self.t_embedder.fc1.weight.dtype
        t = torch.as_tensor(timesteps, device=self.pos_embed.device)
        if t.ndim == 0:
            t = t.expand(batch)
        elif t.shape != (batch,):
            raise ValueError(f"DiT: timesteps must be a scalar or of shape ({batch},), got {tuple(t.shape)}")
        cond = self.t_embedder(timestep_embedding(t, c.freq_dim, freq_shift=c.freq_shift).to(dtype))  # (B, D)
        if self.class_embedding is not None:
            cond = cond + self.class_embedding(class_labels)
        if self.pooled_embedder is not None:
            cond = cond + self.pooled_embedder(pooled.to(dtype))
        return cond

    def positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position table (grid_h * grid_w, D): the cached native one, or one interpolated to the grid."""
        if grid_h == grid_w == self.config.grid:
            return self.pos_embed
        table = sincos_positions_2d(self.config.hidden_size, grid_h, grid_w, self.config.grid)
        return table.to(self.pos_embed.device)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, pooled: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        b, _, height, width = latents.shape
        p = c.patch_size
        if height % p or width % p:
            raise ValueError(f"DiT: latent size {height}x{width} is not a multiple of patch_size {p}")
        if (encoder_hidden_states is not None) != (c.cross_attention_dim > 0):
            raise ValueError(f"DiT: encoder_hidden_states must be {'given' if c.cross_attention_dim else 'None'} "
                             f"when config.cross_attention_dim = {c.cross_attention_dim}")
        h, w = height // p, width // p
        x = self.patch_embed(latents)  # (B, N, D), a transposed view of the conv output
        # Positions first: the sum takes their row-major layout. With the transposed view first it
        # would keep that layout, and every norm and matmul downstream would copy to row-major.
        x = self.positions(h, w).to(x.dtype) + x
        cond = F.silu(self.condition(timesteps, b, class_labels, pooled))  # (B, D), shared by every adaLN
        context = None if encoder_hidden_states is None else encoder_hidden_states.to(x.dtype)
        for block in self.blocks:
            x = block(x, cond, context)
        shift, scale = self.final_modulation(cond)[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        x = self.final_proj(adaln_modulate(x, shift, scale, c.norm_eps))  # (B, N, p*p*C_out)
        # Each token holds a p x p x C_out patch, channels last: back to (B, C_out, H, W).
        x = x.view(b, h, w, p, p, c.out_channels).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
        return x.reshape(b, c.out_channels, height, width)


def dit_tiny(**overrides) -> DiTConfig:
    """A two-layer DiT for tests: 8x8x4 latents, patch 2, width 32, 10 classes (overrides apply)."""
    fields = dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_heads=4,
                  intermediate_size=64, num_classes=10)
    return DiTConfig(**{**fields, **overrides})
