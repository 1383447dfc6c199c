"""Exact attention for short sequences on CPU during training, probabilities kept for the backward:
the plain-PyTorch path, used where `polymodal.kernels` is not built or is turned off (with the
kernels, `polymodal.kernels.attention` takes these calls and more).

PyTorch's CPU SDPA (a flash kernel) recomputes the attention probabilities in its backward and
works in blocks sized for long sequences. Up to `MAX_SHORT_TOKENS` keys and queries (a DiT
over 64 patches, a ViT over 50), three batched matmuls and a softmax, with the (B, H, T, S)
probabilities saved, run the forward and backward faster; past it the flash kernel wins
(`benchmarks/bench_dit.py` with POLYMODAL_FUSED_CPU=0 times DiT steps on both sides of the line:
`--recipe` at 64 tokens, the default config at 256). Inference keeps SDPA: without a backward
there is nothing to save.
"""
from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from polymodal.kernels import ops

MAX_SHORT_TOKENS = 128


def use_short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True for an unmasked float32 CPU call with gradients, outside autocast and torch.compile, at
    most MAX_SHORT_TOKENS queries and keys, and at most MAX_KEPT_SCORES probabilities to keep."""
    # Under autocast the matmuls here would run in bf16 while the backward (outside autocast)
    # meets float32 inputs: SDPA handles that mix, so it keeps those calls.
    return (q.device.type == "cpu" and all(t.dtype == torch.float32 for t in (q, k, v))
            and not torch.is_autocast_enabled("cpu") and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad)
            and max(q.shape[-2], k.shape[-2]) <= MAX_SHORT_TOKENS
            and math.prod(q.shape[:-1]) * k.shape[-2] <= ops.MAX_KEPT_SCORES and not torch.compiler.is_compiling())


class _ShortAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)).mul_(scale), dim=-1)  # (B, H, T, S)
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale = scale
        return torch.matmul(probs, v)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        q, k, v, probs = ctx.saved_tensors
        grad_v = torch.matmul(probs.transpose(-1, -2), grad)
        grad_probs = torch.matmul(grad, v.transpose(-1, -2))
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype).mul_(ctx.scale)
        return torch.matmul(grad_scores, k), torch.matmul(grad_scores.transpose(-1, -2), q), grad_v, None


def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v without a mask; q (B, H, T, D), k and v (B, H, S, D) -> (B, H, T, D).

    scale defaults to 1 / sqrt(D), as SDPA's.
    """
    return _ShortAttention.apply(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)
