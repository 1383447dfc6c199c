"""Grouped-query attention (self and cross) over SDPA or FlexAttention.

A mask reaching `attend` is one of: None (every query sees every key), the string "causal",
a boolean tensor broadcastable to (B, H, T_q, T_k) with True = may attend (CPU path, dense), a
`polymodal.sequence.DocumentSpans` (CPU path for causal packed rows: one causal call per
document), or a FlexAttention `BlockMask` built by `polymodal.sequence` (CUDA path, sparse
blocks skipped). Unmasked, non-GQA float32 CPU calls that `fused_attention_applies` accepts (at
most 256 tokens; between 16K scores and, in training, 32M) run the fused kernel of
`polymodal.kernels.attention` instead of the SDPA flash kernel. Unmasked CPU training calls it
declines, or all of them without the kernels, over at most 128 tokens run `short_attention`; both
keep the probabilities for the backward.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from polymodal.kernels.ops import fused_attention, fused_attention_applies
from polymodal.nn.kv_cache import KVCache
from polymodal.nn.linear import plain_linear
from polymodal.nn.norms import HeadLayerNorm
from polymodal.nn.rope import apply_rotary
from polymodal.nn.short_attention import short_attention, use_short_attention
from polymodal.sequence import DocumentSpans

# Kinds of per-head query/key normalisation `Attention` can apply (None: none).
QK_NORMS = ("head_layernorm",)


def _is_block_mask(mask) -> bool:
    return type(mask).__name__ == "BlockMask"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention with GQA broadcasting.

    q (B, H, T, D); k, v (B, H_kv, S, D) with H a multiple of H_kv -> (B, H, T, D).
    """
    if _is_block_mask(mask):
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    gqa = k.shape[1] != q.shape[1]
    if isinstance(mask, DocumentSpans):
        return _attend_spans(q, k, v, mask, scale, gqa)
    if gqa and isinstance(mask, torch.Tensor) and q.is_cuda:
        # On CUDA a masked GQA call falls back to the slow math kernel; copying K/V to every
        # query head keeps the fused kernels. On CPU SDPA broadcasts the groups itself.
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        gqa = False
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"mask string must be 'causal', got {mask!r}")
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if mask is None and not gqa:
        if fused_attention_applies(q, k, v):
            return fused_attention(q, k, v, scale)
        if use_short_attention(q, k, v):
            return short_attention(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _attend_spans(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: DocumentSpans, scale: float | None,
                  gqa: bool) -> torch.Tensor:
    """Causal attention inside each (row, start, end) span; q (R, H, L, D) -> (R, H, L, D), zeros off-span."""
    if q.shape[2] != spans.length or k.shape[2] != spans.length:
        raise ValueError(f"DocumentSpans cover rows of {spans.length} positions; got queries of {q.shape[2]} and "
                         f"keys of {k.shape[2]} (spans serve packed self-attention without a KV cache)")
    rows, heads, length, head_dim = q.shape
    if spans.rows != rows:
        raise ValueError(f"DocumentSpans cover {spans.rows} rows; got queries of {rows} rows")
    # The rows laid end to end, cut into documents and the padding between them. One `split` makes
    # the pieces and one `cat` joins the outputs: their backward passes are one cat and one split.
    # Indexing each span instead would write every span's gradient into a zero tensor of the full
    # (R, H, L, D) size, which made the backward quadratic in the documents per batch.
    pieces: list[tuple[int, bool]] = []  # (size, is a document)
    cursor = 0
    for row, start, end in spans.spans:
        begin = row * length + start
        if begin < cursor:
            raise ValueError(f"DocumentSpans must be in row-major order without overlaps; span {(row, start, end)} "
                             "starts before the previous one ends")
        if begin > cursor:
            pieces.append((begin - cursor, False))
        pieces.append((end - start, True))
        cursor = row * length + end
    if cursor < rows * length:
        pieces.append((rows * length - cursor, False))
    sizes = [size for size, _ in pieces]

    def flat(t: torch.Tensor) -> tuple[torch.Tensor, ...]:  # (R, H, L, D) -> pieces of (1, H, n, D)
        return t.transpose(0, 1).reshape(1, t.shape[1], rows * length, head_dim).split(sizes, dim=2)

    outs = [F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=gqa) if real
            else qi.new_zeros(qi.shape)
            for (_, real), qi, ki, vi in zip(pieces, flat(q), flat(k), flat(v))]
    return torch.cat(outs, dim=2).view(heads, rows, length, head_dim).transpose(0, 1)  # (R, H, L, D)


FUSED_QKV_MIN_TOKENS = 64  # below this many tokens q/k/v keep three separate projections


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads; self-attention or cross-attention.

    dim: model width; num_heads query heads and num_kv_heads key/value heads of head_dim each;
    kv_dim: width of the cross-attention context (None = self-attention on x);
    qk_norm: None, or "head_layernorm" to normalise each query and key head after the
    projection and before RoPE (`HeadLayerNorm`, Chameleon's QK-norm; modules `q_norm`, `k_norm`).
    forward(x (B, T, dim), context (B, S, kv_dim) | None, rope (cos, sin) | None, mask, kv_cache,
    layer_idx) -> (B, T, dim).
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None,
                 qkv_bias: bool = False, out_bias: bool = False, kv_dim: int | None = None,
                 qk_norm: str | None = None):
        super().__init__()
        if qk_norm is not None and qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be None or one of {list(QK_NORMS)}, got {qk_norm!r}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        self.head_dim = head_dim or dim // num_heads
        kv_in = kv_dim or dim
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(kv_in, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(kv_in, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=out_bias)
        # None registers nothing, so models without QK-norm keep their parameters and state dict.
        self.q_norm = HeadLayerNorm(num_heads, self.head_dim) if qk_norm else None
        self.k_norm = HeadLayerNorm(self.num_kv_heads, self.head_dim) if qk_norm else None

    def _plain_projections(self) -> bool:
        """True when q/k/v are plain `nn.Linear` layers without hooks (nothing to honour in a fused matmul)."""
        return plain_linear(self.q_proj, self.k_proj, self.v_proj)

    def _fused_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, T, heads * head_dim each) of self-attention from one matmul.

        One GEMM against the stacked weights runs faster than three thin ones on CPU (about 5%
        of a DiT training step); the weights stay three layers, so checkpoints and LoRA see the
        usual q_proj / k_proj / v_proj.
        """
        layers = (self.q_proj, self.k_proj, self.v_proj)
        weight = torch.cat([layer.weight for layer in layers])
        bias = None if self.q_proj.bias is None else torch.cat([layer.bias for layer in layers])
        sizes = [layer.out_features for layer in layers]
        return F.linear(x, weight, bias).split(sizes, dim=-1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, rope=None, mask=None,
                kv_cache: KVCache | None = None, layer_idx: int = 0) -> torch.Tensor:
        b, t, _ = x.shape
        source = x if context is None else context
        # Fused only over many tokens: stacking the weights copies them, which costs more than
        # it saves when a decoding step projects one token per row.
        if context is None and b * t >= FUSED_QKV_MIN_TOKENS and self._plain_projections():
            q, k, v = self._fused_qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(source), self.v_proj(source)
        q = q.view(b, t, self.num_heads, self.head_dim)  # (B, T, H, D)
        k = k.view(b, source.shape[1], self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # before RoPE and the cache: cached keys are stored normalised
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D)
        v = v.view(b, source.shape[1], self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)  # (B, H_kv, S_cached + T, D)
        out = attend(q, k, v, mask)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
