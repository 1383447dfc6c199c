"""Element-wise pieces of adaLN transformer blocks, the tanh-GELU MLP and short unmasked attention,
fused on CPU, plain PyTorch elsewhere.

Each function computes the same maths on every path. The fused path (float32 CPU tensors, the
kernels built, not under torch.compile) calls the C++ kernels through an autograd function that
saves only what its backward kernel reads. Under torch.compile the plain path is traced so
inductor fuses it; tanh-GELU is then written through the sigmoid identity, which inductor
vectorises with exp rather than the slower tanh.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from polymodal.kernels.loader import fused_cpu, kernels

_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
# gelu_tanh(x) = 0.5 x (1 + tanh(u)) = x sigmoid(2u), 2u = x (_LINEAR + _CUBIC x^2) (Hendrycks & Gimpel 2016).
_LINEAR = 2.0 * math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715 * _LINEAR


def _fused(*tensors: torch.Tensor) -> bool:
    """True when every tensor is a plain float32 CPU tensor, we run eagerly and the kernels are at hand.

    Plain: not a subclass (DTensor and the like) nor wrapped by torch.func (vmap, grad), whose
    data the kernels cannot read directly.
    """
    if torch.compiler.is_compiling():
        return False
    if not all(type(t) in _PLAIN_TENSOR_TYPES and t.device.type == "cpu" and t.dtype == torch.float32
               and not torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        return False
    return kernels() is not None


class _GeluTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return fused_cpu().gelu_tanh_forward(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return fused_cpu().gelu_tanh_backward(grad.contiguous(), x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (as F.gelu(x, approximate="tanh")); any shape."""
    if _fused(x):
        return _GeluTanh.apply(x.contiguous())
    if torch.compiler.is_compiling():
        return x * torch.sigmoid(x * (_LINEAR + _CUBIC * x * x))
    return F.gelu(x, approximate="tanh")


class _AdaLNModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        y, mean, rstd = fused_cpu().adaln_forward(x, shift, scale, eps)
        ctx.save_for_backward(x, mean, rstd, scale)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, mean, rstd, scale = ctx.saved_tensors
        grad_x, grad_shift, grad_scale = fused_cpu().adaln_backward(grad.contiguous(), x, mean, rstd, scale)
        return grad_x, grad_shift, grad_scale, None


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """layer_norm(x) * (1 + scale) + shift, the norm without affine weights (DiT's adaLN).

    x (B, N, D); shift, scale (B, 1, D) or (B, D), one row per sample -> (B, N, D).
    """
    b, _, d = x.shape
    if _fused(x, shift, scale):
        return _AdaLNModulate.apply(x.contiguous(), shift.reshape(b, d).contiguous(),
                                    scale.reshape(b, d).contiguous(), float(eps))
    normed = F.layer_norm(x, (d,), eps=eps)
    return torch.addcmul(shift.reshape(b, 1, d), normed, 1 + scale.reshape(b, 1, d))


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, y)
        return torch.addcmul(x, gate[:, None], y)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        gate, y = ctx.saved_tensors
        grad_y, grad_gate = fused_cpu().gated_residual_backward(grad.contiguous(), y, gate)
        return grad, grad_gate, grad_y


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y, the adaLN-Zero residual. x, y (B, N, D); gate (B, 1, D) or (B, D) -> (B, N, D)."""
    b, _, d = x.shape
    if _fused(x, gate, y):
        return _GatedResidual.apply(x, gate.reshape(b, d).contiguous(), y.contiguous())
    return torch.addcmul(x, gate.reshape(b, 1, d), y)


# Up to this many queries and keys the kernel beat SDPA's flash kernel in every run of
# `benchmarks/bench_attention.py` (1.1-1.5x in training); at 512 the runs split, and past it one
# head's score tile outgrows the cache and the flash kernel wins.
MAX_ATTENTION_TOKENS = 256
# Below this many scores (B * H * T * S) a call is so small that the autograd function's Python
# overhead (tens of microseconds) outweighs the gain, and SDPA keeps it.
MIN_ATTENTION_SCORES = 16384
# Training keeps the probabilities, 4 bytes a score, where SDPA keeps one statistic per row: past
# this many scores per call (128 MiB; a DiT at 256 tokens and batch 32 holds 6.3M) SDPA keeps the
# call, so large batches do not pay gigabytes of activations for a ~15% faster attention.
MAX_KEPT_SCORES = 2 ** 25


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def fused_attention_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True when `attention` runs the fused kernel: 4-D float32 CPU tensors with the same batch and
    heads, at most MAX_ATTENTION_TOKENS queries and keys, between MIN_ATTENTION_SCORES and (in
    training) MAX_KEPT_SCORES scores, outside autocast and torch.compile, and the kernels at hand."""
    # Under autocast SDPA runs the matmuls in bf16 and its backward takes the bf16/float32 mix.
    if torch.is_autocast_enabled("cpu") or not _fused(q, k, v):
        return False
    if not (q.dim() == k.dim() == v.dim() == 4 and q.shape[:2] == k.shape[:2] == v.shape[:2]
            and k.shape[2] == v.shape[2] and q.shape[3] == k.shape[3] > 0 and v.shape[3] > 0):
        return False  # broadcast batches, grouped heads, other ranks: SDPA's own rules
    *rows, queries, _ = q.shape
    keys = k.shape[-2]
    if not (queries <= MAX_ATTENTION_TOKENS and keys <= MAX_ATTENTION_TOKENS):
        return False
    scores = math.prod(rows) * queries * keys
    if scores < MIN_ATTENTION_SCORES or (scores > MAX_KEPT_SCORES and _needs_grad(q, k, v)):
        return False
    return fused_cpu().blas_available()


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        out, probs = fused_cpu().attention_forward(q, k, v, scale, True)
        ctx.save_for_backward(q, k, v, out, probs)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        q, k, v, out, probs = ctx.saved_tensors
        grads = fused_cpu().attention_backward(_blas_rows(grad), q, k, v, out, probs, ctx.scale)
        return *grads, None


def _blas_rows(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy unless its rows are BLAS operands as they are: a unit stride along a
    row and rows at least a row apart (an expanded gradient has a row stride of 0)."""
    if t.stride(-1) == 1 and (t.shape[-2] <= 1 or t.stride(-2) >= t.shape[-1]):
        return t
    return t.contiguous()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v without a mask, as F.scaled_dot_product_attention.

    q (B, H, T, D), k (B, H, S, D), v (B, H, S, Dv) -> (B, H, T, Dv); scale defaults to 1/sqrt(D).
    Where `fused_attention_applies`, one fused pass per head: training keeps the (B, H, T, S)
    probabilities for the backward (more memory than SDPA, which keeps a row statistic, and no
    second QK^T product); the output is laid out (B, T, H, Dv). Elsewhere SDPA.
    """
    if not fused_attention_applies(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return fused_attention(q, k, v, scale)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """`attention`'s fused path, for a caller that has already checked `fused_attention_applies`."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = _blas_rows(q), _blas_rows(k), _blas_rows(v)
    if _needs_grad(q, k, v):
        return _Attention.apply(q, k, v, scale)
    return fused_cpu().attention_forward(q, k, v, scale, False)[0]


class _GeluMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                b2: torch.Tensor | None) -> torch.Tensor:
        y, h = fused_cpu().mlp_gelu_forward(x, w1, b1, w2, b2, True)
        ctx.save_for_backward(x, h, w1, b1, w2, b2)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, h, w1, b1, w2, b2 = ctx.saved_tensors
        grad_x, grad_w1, grad_b1, grad_w2, grad_b2 = fused_cpu().mlp_gelu_backward(grad.contiguous(), x, h, w1, b1,
                                                                                   w2, b2)
        return grad_x, grad_w1, None if b1 is None else grad_b1, grad_w2, None if b2 is None else grad_b2


def gelu_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None) -> torch.Tensor:
    """F.linear(gelu_tanh(F.linear(x, w1, b1)), w2, b2): x (..., D), w1 (H, D), b1 (H,), w2 (O, H),
    b2 (O,) (biases optional) -> (..., O).

    On the fused path (float32 CPU, the kernels built) each thread runs the whole MLP on a block of
    rows while its hidden activations are in cache, and only fc1's output is kept for the
    backward (`mlp_cpu.cpp`); elsewhere the two layers and the activation run one after another.
    """
    biases = [b for b in (b1, b2) if b is not None]
    # Under autocast the layers run in bf16 (F.linear's autocast rule), which the kernel does not.
    if (_fused(x, w1, w2, *biases) and not torch.is_autocast_enabled("cpu") and min(w1.shape + w2.shape) > 0
            and fused_cpu().blas_available()):
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        w1, w2 = w1.contiguous(), w2.contiguous()
        b1, b2 = (None if b is None else b.contiguous() for b in (b1, b2))
        if _needs_grad(flat, w1, w2, *biases):
            y = _GeluMLP.apply(flat, w1, b1, w2, b2)
        else:  # inference: fc1's output never leaves the cache
            y = fused_cpu().mlp_gelu_forward(flat, w1, b1, w2, b2, False)[0]
        return y.view(*x.shape[:-1], w2.shape[0])
    return F.linear(gelu_tanh(F.linear(x, w1, b1)), w2, b2)
