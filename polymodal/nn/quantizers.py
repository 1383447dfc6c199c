"""Vector quantizers that turn continuous vectors into discrete codes, for any modality.

An image tokenizer quantizes a grid of latents, an audio codec a sequence of frames; both hand
these modules a tensor (..., D) and get back codes plus the quantized vectors.

- `VectorQuantizer`: the nearest of K learned code vectors (VQ-VAE, van den Oord et al. 2017,
  arXiv:1711.00937). Options: a codebook updated by exponential moving averages instead of
  gradients (VQ-VAE-2, Razavi et al. 2019, arXiv:1906.00446, appendix), cosine-similarity lookup
  on l2-normalised vectors (ViT-VQGAN, Yu et al. 2021, arXiv:2110.04627), and restarting codes
  that go unused (as in Jukebox, Dhariwal et al. 2020, arXiv:2005.00341).
- `ResidualVQ`: a stack of VectorQuantizers, each quantizing what the previous ones left over;
  the codes of the first k stages give a coarse-to-fine reconstruction, and quantizer dropout
  trains every prefix (SoundStream, Zeghidour et al. 2021, arXiv:2107.03312).
- `FSQ`: finite scalar quantization, no codebook at all: each channel is squashed to a small
  range and rounded to one of `levels[i]` values (Mentzer et al. 2023, arXiv:2309.15505).

All three return a `QuantizerOutput` whose `quantized` carries a straight-through gradient
(Bengio et al. 2013): the forward value is the quantized vector, the backward pass treats the
rounding as the identity. Distances and rounding run in float32 whatever the input dtype.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from polymodal.bounds import MAX_LAYERS, MAX_STEPS, MAX_VOCAB, MAX_WIDTH, check_float, check_int, check_length
from polymodal.errors import ConfigError

# FSQ shrinks its bound by this fraction so tanh never reaches a rounding boundary (the paper's value).
_FSQ_BOUND_EPS = 1e-3
# With that margin, rounding reaches all L values only while (L - 1) * eps < 1.
_FSQ_MAX_LEVEL = 1000


@dataclass
class QuantizerOutput:
    """What a quantizer returns.

    quantized: (..., D) the quantized vectors in the input's dtype, with a straight-through
        gradient (forward value = the code vectors).
    codes: long, (...) for VectorQuantizer and FSQ, (..., k) for ResidualVQ with k stages used.
    loss: scalar float32, the quantizer's auxiliary loss (0 for FSQ).
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor


def _check_last_dim(owner: str, z: torch.Tensor, dim: int) -> None:
    if z.dim() == 0 or z.shape[-1] != dim:
        raise ValueError(f"{owner} expects inputs with last dim {dim}, got shape {tuple(z.shape)}")


def _check_codes(owner: str, codes: torch.Tensor, size: int) -> None:
    """Raise ValueError unless `codes` is an integer tensor with every id in [0, size)."""
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"{owner}.lookup expects integer codes, got dtype {codes.dtype}")
    if codes.numel() and (codes.min() < 0 or codes.max() >= size):
        raise ValueError(f"{owner}.lookup: codes must be in [0, {size}), "
                         f"got ids in [{int(codes.min())}, {int(codes.max())}]")


def _count_codes(codes: torch.Tensor, size: int) -> torch.Tensor:
    """How often each id occurs: codes (N,) long -> (size,) long."""
    # index_put_ with accumulate rather than bincount: it has a deterministic CUDA path.
    counts = torch.zeros(size, dtype=torch.long, device=codes.device)
    return counts.index_put_((codes,), torch.ones_like(codes), accumulate=True)


class _TracksUsage(nn.Module):
    """Base for quantizers keeping `usage_counts`, a (codebook_size,) buffer of training hits."""

    def usage(self) -> float:
        """Fraction of codes selected at least once by training forwards since `reset_usage()`."""
        return (self.usage_counts > 0).float().mean().item()

    def reset_usage(self) -> None:
        """Forget the hit counts behind `usage()`."""
        self.usage_counts.zero_()


class VectorQuantizer(_TracksUsage):
    """Replace each vector by the nearest of `num_codes` learned code vectors (VQ-VAE).

    z (..., dim) -> QuantizerOutput with quantized (..., dim), codes (...) and the loss
    ||sg[z_q] - z||^2 * beta + ||z_q - sg[z]||^2 (means over all elements; sg = stop-gradient).

    ema_decay: when set, the codebook takes no gradient; each training forward moves it toward
        the mean of the vectors assigned to each code (VQ-VAE-2), and the loss is only the
        commitment term. The running statistics are buffers `cluster_size_ema` (K,) and
        `embed_sum_ema` (K, dim), started at 1 and at the initial codebook so that an unused
        code stays put; if you overwrite `embedding.weight` by hand, copy it into
        `embed_sum_ema` and fill `cluster_size_ema` with 1 as well.
    cosine: compare and return l2-normalised vectors (the loss is on the normalised vectors too).
    restart_after: when > 0, a code that no training forward selected `restart_after` times in a
        row is moved onto a vector of the current batch drawn with probability proportional to
        its squared quantization error (torch's global RNG), so dead codes go where the codebook
        fits worst. The count is the buffer `steps_unused` (K,).
    eps: Laplace smoothing of the EMA cluster sizes, so that a code with no vectors does not
        divide by zero.

    Training forwards (module.training) update the hit counts behind `usage()`, the EMA codebook
    and the restarts, after the codes are chosen: `quantized` always holds the codebook as it
    was at the start of the call. The usage counts are not saved in the state dict; the EMA
    statistics and `steps_unused` are, so a resumed run continues exactly.
    """

    def __init__(self, num_codes: int, dim: int, *, beta: float = 0.25, ema_decay: float | None = None,
                 cosine: bool = False, restart_after: int = 0, eps: float = 1e-5):
        super().__init__()
        owner = type(self).__name__
        check_int(owner, "num_codes", num_codes, 1, MAX_VOCAB)
        check_int(owner, "dim", dim, 1, MAX_WIDTH)
        check_float(owner, "beta", beta, 0.0)
        if ema_decay is not None:
            check_float(owner, "ema_decay", ema_decay, 0.0, 1.0, low_open=True, high_open=True)
        if not isinstance(cosine, bool):
            raise ConfigError(f"{owner}.cosine must be True or False, got {cosine!r}")
        check_int(owner, "restart_after", restart_after, 0, MAX_STEPS)
        check_float(owner, "eps", eps, 0.0, low_open=True)
        self.dim = dim
        self.beta = beta
        self.ema_decay = ema_decay
        self.cosine = cosine
        self.restart_after = restart_after
        self.eps = eps
        self.embedding = nn.Embedding(num_codes, dim)
        self.register_buffer("usage_counts", torch.zeros(num_codes, dtype=torch.long), persistent=False)
        if ema_decay is not None:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("cluster_size_ema", torch.ones(num_codes))
            self.register_buffer("embed_sum_ema", self.embedding.weight.detach().clone())
        if restart_after:
            self.register_buffer("steps_unused", torch.zeros(num_codes, dtype=torch.long))

    @property
    def codebook_size(self) -> int:
        """Number of codes K."""
        return self.embedding.num_embeddings

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize z (..., dim): quantized (..., dim) in z's dtype, codes (...) long, scalar loss."""
        _check_last_dim(type(self).__name__, z, self.dim)
        flat = z.reshape(-1, self.dim).float()  # (N, D)
        codebook = self.embedding.weight.detach().float()  # (K, D)
        if self.cosine:
            flat, codebook = F.normalize(flat, dim=-1), F.normalize(codebook, dim=-1)
        codes = _nearest(flat.detach(), codebook)  # (N,)
        z_q = self._vectors(codes)  # (N, D), differentiable w.r.t. the codebook
        commitment = F.mse_loss(flat, z_q.detach())
        if self.ema_decay is None:
            loss = F.mse_loss(z_q, flat.detach()) + self.beta * commitment
        else:
            loss = self.beta * commitment
        if self.training and flat.shape[0]:
            self._update(flat.detach(), codes)
        # Written as z_q + 0 rather than z + (z_q - z): the forward value is exactly the code vector.
        quantized = z_q.detach().to(z.dtype).view(z.shape) + (z - z.detach())  # (..., D)
        return QuantizerOutput(quantized, codes.view(z.shape[:-1]), loss)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """The code vectors (normalised if cosine): codes (...) long -> (..., dim) float32."""
        _check_codes(type(self).__name__, codes, self.codebook_size)
        return self._vectors(codes.long())

    def _vectors(self, codes: torch.Tensor) -> torch.Tensor:
        # Gather first, normalise after: the graph then never holds the whole codebook, so the
        # in-place EMA/restart updates of `embedding.weight` cannot invalidate a pending backward.
        vectors = F.embedding(codes, self.embedding.weight).float()  # (..., D)
        return F.normalize(vectors, dim=-1) if self.cosine else vectors

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        """Training-time bookkeeping for one batch: flat (N, D) the compared vectors, codes (N,)."""
        counts = _count_codes(codes, self.codebook_size)  # (K,)
        self.usage_counts += counts
        weight = self.embedding.weight
        errors = (flat - self._vectors(codes)).pow(2).sum(1) if self.restart_after else None  # (N,), before updates
        if self.ema_decay is not None:
            # VQ-VAE-2 appendix: N_k <- d N_k + (1 - d) n_k,  m_k <- d m_k + (1 - d) sum_{i in k} z_i,
            # e_k = m_k / N_k with N_k Laplace-smoothed so empty clusters keep a positive size.
            d = self.ema_decay
            onehot = F.one_hot(codes, self.codebook_size).to(flat.dtype)  # (N, K)
            self.cluster_size_ema.mul_(d).add_(counts.to(self.cluster_size_ema.dtype), alpha=1 - d)
            self.embed_sum_ema.mul_(d).add_(onehot.t() @ flat, alpha=1 - d)  # (K, D)
            n = self.cluster_size_ema.sum()
            size = (self.cluster_size_ema + self.eps) / (n + self.codebook_size * self.eps) * n  # (K,)
            weight.copy_(self.embed_sum_ema / size[:, None])
        if self.restart_after:
            self._restart_dead_codes(flat, counts, errors)

    def _restart_dead_codes(self, flat: torch.Tensor, counts: torch.Tensor, errors: torch.Tensor) -> None:
        unused = torch.where(counts > 0, 0, self.steps_unused + 1)  # (K,)
        dead = unused >= self.restart_after  # (K,)
        # Candidates drawn with probability proportional to each vector's squared quantization
        # error (k-means++ seeding, Arthur & Vassilvitskii 2007): dead codes go where the codebook
        # fits worst. Uniform draws sent them mostly to the most frequent vectors (a plain image
        # background), which the codebook already fit. A candidate for every code, not just the
        # dead ones: a fixed-size draw needs no device-to-host sync to learn how many codes died.
        pick = torch.multinomial(errors + 1e-12, self.codebook_size, replacement=True)  # (K,)
        candidates = flat[pick]  # (K, D)
        weight = self.embedding.weight
        weight.copy_(torch.where(dead[:, None], candidates.to(weight.dtype), weight))
        if self.ema_decay is not None:
            # A fresh cluster of one vector: the next EMA step starts from the new position.
            self.embed_sum_ema.copy_(torch.where(dead[:, None], candidates, self.embed_sum_ema))
            self.cluster_size_ema.copy_(torch.where(dead, 1.0, self.cluster_size_ema))
        self.steps_unused.copy_(torch.where(dead, 0, unused))


def _nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row to each row of x: x (N, D), codebook (K, D) -> (N,) long.

    Squared distances as ||x||^2 + ||e||^2 - 2 x.e, one matmul with no (N, K, D) intermediate;
    ties go to the lowest index.
    """
    norms = x.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)  # (N, K)
    return torch.addmm(norms, x, codebook.t(), alpha=-2).argmin(dim=1)


class ResidualVQ(nn.Module):
    """Residual vector quantization: stage i quantizes what stages 0..i-1 left unexplained.

    z (..., dim) -> quantized (..., dim) = the sum of the stage vectors, codes (..., k), loss = the
    sum of the stage losses. Every stage is a `VectorQuantizer(num_codes, dim, **vq_kwargs)`.

    quantizer_dropout: probability that a training forward uses only the first k ~ Uniform{1..K}
        stages (SoundStream), so that every prefix of the codes is a usable reconstruction.
    """

    def __init__(self, num_stages: int, num_codes: int, dim: int, *, quantizer_dropout: float = 0.0,
                 **vq_kwargs):
        super().__init__()
        check_int(type(self).__name__, "num_stages", num_stages, 1, MAX_LAYERS)
        check_float(type(self).__name__, "quantizer_dropout", quantizer_dropout, 0.0, 1.0)
        self.num_stages = num_stages
        self.dim = dim
        self.quantizer_dropout = quantizer_dropout
        self.stages = nn.ModuleList(VectorQuantizer(num_codes, dim, **vq_kwargs) for _ in range(num_stages))

    @property
    def codebook_size(self) -> int:
        """Number of codes per stage."""
        return self.stages[0].codebook_size

    def forward(self, z: torch.Tensor, num_stages: int | None = None) -> QuantizerOutput:
        """Quantize z (..., dim) with the first `num_stages` stages (all by default).

        Returns quantized (..., dim) in z's dtype, codes (..., k) long and the summed loss; k is
        `num_stages`, or fewer when quantizer dropout fires in training.
        """
        _check_last_dim(type(self).__name__, z, self.dim)
        k = self._stages_to_use(num_stages)
        residual = z.float()  # (..., D), float32 so that the running sums do not lose bits in bf16
        total, codes, loss = None, [], None
        for stage in self.stages[:k]:
            out = stage(residual)
            # Detached: the next residual keeps an identity gradient to z, so every stage's
            # commitment term trains the encoder, and the returned sum gets its own clean
            # straight-through gradient below.
            vectors = out.quantized.detach()
            residual = residual - vectors
            total = vectors if total is None else total + vectors
            loss = out.loss if loss is None else loss + out.loss
            codes.append(out.codes)
        quantized = total.to(z.dtype) + (z - z.detach())  # (..., D)
        return QuantizerOutput(quantized, torch.stack(codes, dim=-1), loss)  # codes (..., k)

    def _stages_to_use(self, num_stages: int | None) -> int:
        k = self.num_stages if num_stages is None else num_stages
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_stages:
            raise ValueError(f"ResidualVQ.forward: num_stages must be in [1, {self.num_stages}], "
                             f"got {num_stages!r}")
        # Drawn on the CPU generator: deciding the stage count never waits for the GPU.
        if self.training and self.quantizer_dropout > 0 and torch.rand(()) < self.quantizer_dropout:
            k = int(torch.randint(1, k + 1, ()))
        return k

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum of the first k stages' code vectors: codes (..., k), k <= num_stages -> (..., dim) float32."""
        if codes.dim() == 0 or not 1 <= codes.shape[-1] <= self.num_stages:
            raise ValueError(f"ResidualVQ.lookup expects codes (..., k) with 1 <= k <= {self.num_stages}, "
                             f"got shape {tuple(codes.shape)}")
        _check_codes(type(self).__name__, codes, self.codebook_size)
        # Same float32 additions in the same order as forward, so lookup(codes) == quantized exactly.
        total = self.stages[0].lookup(codes[..., 0])  # (..., D)
        for i in range(1, codes.shape[-1]):
            total = total + self.stages[i].lookup(codes[..., i])
        return total

    def usage(self) -> float:
        """Mean over stages of each stage's `usage()`."""
        return sum(stage.usage() for stage in self.stages) / self.num_stages

    def reset_usage(self) -> None:
        """Reset every stage's usage counts."""
        for stage in self.stages:
            stage.reset_usage()


class FSQ(_TracksUsage):
    """Finite scalar quantization (Mentzer et al. 2023): round each channel to one of a few values.

    z (..., len(levels)) -> quantized (..., len(levels)) with channel i in a grid of `levels[i]`
    values within [-1, 1], codes (...) in [0, prod(levels)) (mixed radix, channel 0 the least
    significant digit) and a zero loss: with no codebook there is nothing to pull together.

    Each channel is bounded by tanh to an open interval that holds exactly `levels[i]` integers,
    rounded with a straight-through gradient and divided by levels[i] // 2. As in the paper, the
    gradient flows through the tanh bound (only the rounding is treated as the identity), which
    tells the encoder when it pushes a channel into saturation.
    """

    def __init__(self, levels: Sequence[int]):
        super().__init__()
        check_length("FSQ", "levels", levels, 1, MAX_WIDTH)
        for i, level in enumerate(levels):
            check_int("FSQ", f"levels[{i}]", level, 2, _FSQ_MAX_LEVEL)
        size = math.prod(levels)
        if size > MAX_VOCAB:
            raise ConfigError(f"FSQ.levels must give a codebook of at most {MAX_VOCAB} codes, "
                              f"got prod(levels) = {size}")
        self.dim = len(levels)
        # Integer buffers: unlike float ones they survive module.to(torch.bfloat16) exactly.
        self.register_buffer("levels", torch.tensor(list(levels)), persistent=False)
        self.register_buffer("basis", torch.tensor([math.prod(levels[:i]) for i in range(len(levels))]),
                             persistent=False)
        self.register_buffer("usage_counts", torch.zeros(size, dtype=torch.long), persistent=False)

    @property
    def codebook_size(self) -> int:
        """Number of codes, prod(levels)."""
        return self.usage_counts.numel()

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize z (..., len(levels)): quantized in z's dtype, codes (...) long, loss 0."""
        _check_last_dim(type(self).__name__, z, self.dim)
        levels = self.levels.float()
        half_width = (self.levels // 2).float()
        # Odd L: integers -(L-1)/2 .. (L-1)/2. Even L: the interval is moved down by half a step to
        # hold -L/2 .. L/2-1. The shift is the paper's: it only moves which z lands on the middle.
        half_l = (levels - 1) * (1 - _FSQ_BOUND_EPS) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.tan(offset / half_l)
        bounded = torch.tanh(z.float() + shift) * half_l - offset  # (..., C), strictly inside the interval
        rounded = bounded.detach().round()
        # rounded + 0 rather than bounded + (rounded - bounded): the forward value is exact.
        quantized = ((rounded + (bounded - bounded.detach())) / half_width).to(z.dtype)
        digits = (rounded + half_width).long()  # (..., C) in [0, levels)
        codes = (digits * self.basis).sum(-1)  # (...)
        if self.training:
            with torch.no_grad():
                self.usage_counts += _count_codes(codes.reshape(-1), self.codebook_size)
        return QuantizerOutput(quantized, codes, torch.zeros((), device=z.device))

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """The grid point of each code: codes (...) -> (..., len(levels)) float32, as forward gives them."""
        _check_codes(type(self).__name__, codes, self.codebook_size)
        digits = codes.long()[..., None] // self.basis % self.levels  # (..., C)
        half_width = (self.levels // 2).float()
        return (digits.float() - half_width) / half_width
