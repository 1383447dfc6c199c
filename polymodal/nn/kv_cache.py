"""A preallocated key/value cache for autoregressive decoding.

All rows of a batch share one write offset: prompts of different lengths are left-padded and
the padding is excluded by the key-validity mask (see `polymodal.infer.generate`), so the cache
itself stays a plain dense tensor per layer and every decode step is one slice assignment.
"""
from __future__ import annotations

import torch


class KVCache:
    """Keys/values for `num_layers` layers, shape (B, H_kv, max_len, D) each.

    Usage per forward pass: every layer calls `update(layer, k, v)` with its new (B, H_kv, T, D)
    keys/values and attends over the returned prefix; the model then calls `advance(T)`.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (B, H_kv, T, D) after the cached prefix; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Move the write offset past the tokens every layer has just stored."""
        self.length += num_tokens
