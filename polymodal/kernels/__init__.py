"""Fused CPU kernels: hand-written C++ for the element-wise work of adaLN transformer blocks.

    loader.py       `fused_cpu()`: builds `fused_cpu.cpp` on first use (torch.utils.cpp_extension,
                    AVX2; cached under torch's extensions folder), or None where it cannot
    fused_cpu.cpp   tanh-GELU, LayerNorm + adaLN modulation and the gated residual, forward and
                    backward, each one pass over memory
    ops.py          `gelu_tanh`, `adaln_modulate`, `gated_residual`: autograd functions over the
                    kernels for float32 CPU tensors, and the same maths in plain PyTorch elsewhere
                    (CUDA, other dtypes, under torch.compile, or without a compiler)

Set POLYMODAL_FUSED_CPU=0 to use plain PyTorch everywhere.
"""
from polymodal.kernels.ops import adaln_modulate, gated_residual, gelu_tanh

__all__ = ["adaln_modulate", "gated_residual", "gelu_tanh"]
