"""Transformer blocks and stacks: causal decoder, bidirectional encoder, or encoder with
cross-attention — decided by the mask and by whether a block has a cross-attention sub-module.

Blocks receive their sub-modules (torchtune style); `build_block` wires the common recipes.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from polymodal.nn.attention import Attention
from polymodal.nn.kv_cache import KVCache
from polymodal.nn.mlp import GeluMLP, SwiGLU
from polymodal.nn.norms import build_norm


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)) [+ cross_attn(norm(x), context)] + mlp(norm(x)).

    x (B, T, D) -> (B, T, D).
    """

    def __init__(self, attn: Attention, mlp: nn.Module, attn_norm: nn.Module, mlp_norm: nn.Module,
                 cross_attn: Attention | None = None, cross_norm: nn.Module | None = None):
        super().__init__()
        self.attn_norm, self.attn = attn_norm, attn
        self.cross_norm, self.cross_attn = cross_norm, cross_attn
        self.mlp_norm, self.mlp = mlp_norm, mlp

    def forward(self, x: torch.Tensor, *, rope=None, mask=None, kv_cache: KVCache | None = None,
                layer_idx: int = 0, context: torch.Tensor | None = None, context_mask=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope=rope, mask=mask, kv_cache=kv_cache, layer_idx=layer_idx)
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this block has cross-attention: pass `context` (B, S, kv_dim)")
            x = x + self.cross_attn(self.cross_norm(x), context=context, mask=context_mask)
        return x + self.mlp(self.mlp_norm(x))


class TransformerStack(nn.Module):
    """A list of blocks applied in order; forwards the same mask/rope/cache/context to each.

    x (B, T, D) -> (B, T, D); with `return_all=True` also every layer's input and the final
    output (num_layers + 1 tensors), as HF's `output_hidden_states` returns.
    """

    def __init__(self, blocks: list[TransformerBlock]):
        super().__init__()
        self.layers = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, *, rope=None, mask=None, kv_cache: KVCache | None = None,
                context: torch.Tensor | None = None, context_mask=None, return_all: bool = False):
        states = [x]
        for i, block in enumerate(self.layers):
            x = block(x, rope=rope, mask=mask, kv_cache=kv_cache, layer_idx=i, context=context,
                      context_mask=context_mask)
            states.append(x)
        return (x, states) if return_all else x


def build_block(dim: int, num_heads: int, mlp_hidden: int, *, num_kv_heads: int | None = None,
                head_dim: int | None = None, norm: str = "rms", norm_eps: float = 1e-6, mlp: str = "swiglu",
                act: str = "gelu", qkv_bias: bool = False, out_bias: bool = False, mlp_bias: bool = False,
                cross_dim: int | None = None, qk_norm: str | None = None) -> TransformerBlock:
    """Wire one block. mlp: "swiglu" (Llama) or "gelu" (ViT, activation `act`); norm: "rms" | "layer";
    cross_dim: width of a cross-attention context (adds a cross-attention sub-layer);
    qk_norm: per-head query/key norm of the self-attention (see `Attention`), None for none."""
    attn = Attention(dim, num_heads, num_kv_heads, head_dim, qkv_bias=qkv_bias, out_bias=out_bias,
                     qk_norm=qk_norm)
    ffn = SwiGLU(dim, mlp_hidden, bias=mlp_bias) if mlp == "swiglu" else GeluMLP(dim, mlp_hidden, act, bias=mlp_bias)
    cross = cross_norm = None
    if cross_dim is not None:
        cross = Attention(dim, num_heads, num_kv_heads, head_dim, qkv_bias=qkv_bias, out_bias=out_bias, kv_dim=cross_dim)
        cross_norm = build_norm(norm, dim, norm_eps)
    return TransformerBlock(attn, ffn, build_norm(norm, dim, norm_eps), build_norm(norm, dim, norm_eps), cross, cross_norm)
