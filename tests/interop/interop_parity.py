"""Helpers shared by the interop parity tests (imported by them; not a test module)."""
from __future__ import annotations

import torch


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> torch.nn.Module:
    """Give every parameter visible random values and put the model in eval mode.

    HF's 0.02 init makes outputs nearly constant, which could let a wrong weight mapping pass a
    tolerance check; norm scales are drawn around 1 so the activations keep a sane size.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            is_norm_scale = p.dim() == 1 and "norm" in name and name.endswith("weight")
            p.copy_(1 + noise if is_norm_scale else noise)
    return model.eval()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| as a float, after checking the shapes agree."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()
