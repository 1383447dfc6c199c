"""Feed-forward blocks: SwiGLU (Llama/Qwen2) and a two-layer GELU MLP (ViT/CLIP/SigLIP)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from polymodal.kernels import gelu_mlp, gelu_tanh
from polymodal.nn.linear import plain_linear


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x) (Radford et al., 2021)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": gelu_tanh,  # fused on CPU (polymodal.kernels)
    "quick_gelu": quick_gelu,
    "silu": F.silu,
}


def activation(name: str):
    """The activation function registered under `name` (gelu, gelu_tanh, quick_gelu, silu)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)). x (..., D) -> (..., D)."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """fc2(act(fc1(x))) with a GELU-family activation. x (..., D) -> (..., D_out or D).

    With tanh-GELU and plain, unhooked layers the whole MLP runs as `polymodal.kernels.gelu_mlp`
    (one fused pass per block of rows on CPU).
    """

    def __init__(self, dim: int, hidden: int, act: str = "gelu", bias: bool = True, out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, out_dim or dim, bias=bias)
        self.act_name = act
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is gelu_tanh and plain_linear(self.fc1, self.fc2):
            return gelu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)  # one fused pass on CPU
        return self.fc2(self.act(self.fc1(x)))
