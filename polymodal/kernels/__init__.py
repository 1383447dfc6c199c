"""Fused CPU kernels: hand-written C++ for the element-wise work of adaLN transformer blocks, the
tanh-GELU MLP and short attention.

    loader.py          `fused_cpu()`: builds the C++ files into one module on first use
                       (torch.utils.cpp_extension, AVX2, OpenMP; cached under torch's extensions
                       folder), or None where it cannot
    fused_cpu.cpp      tanh-GELU, LayerNorm + adaLN modulation and the gated residual, forward and
                       backward, each one pass over memory; the module's bindings
    mlp_cpu.cpp        fc2(gelu_tanh(fc1(x))) on one block of rows at a time, its hidden
                       activations in cache; only fc1's output kept for the backward
    attention_cpu.cpp  unmasked attention over at most a few hundred tokens, one head's score
                       tile at a time, probabilities kept for the backward
    cpu_blas.h, vec_math.h  the row-major sgemm wrapper; the lane sum, row chunks and GELU maths
    ops.py             `gelu_tanh`, `gelu_mlp`, `adaln_modulate`, `gated_residual`, `attention`:
                       autograd functions over the kernels for float32 CPU tensors, the same maths
                       in plain PyTorch elsewhere (CUDA, other dtypes, under torch.compile, or
                       without a compiler)

Set POLYMODAL_FUSED_CPU=0 to use plain PyTorch everywhere.
"""
from polymodal.kernels.ops import (adaln_modulate, attention, fused_attention_applies, gated_residual, gelu_mlp,
                                   gelu_tanh)

__all__ = ["adaln_modulate", "attention", "fused_attention_applies", "gated_residual", "gelu_mlp", "gelu_tanh"]
