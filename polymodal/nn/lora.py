"""LoRA: low-rank adapters on chosen `nn.Linear` layers (Hu et al. 2021).

    y = W x + b + (alpha / rank) * B(A(dropout(x)))      A: (rank, in), B: (out, rank), B = 0 at start

`apply_lora` swaps each targeted `nn.Linear` for a `LoRALinear` in place, freezes every
parameter of the wrapped module except the adapters, and returns the replaced names.
`merge_lora` folds W += (alpha / rank) * B @ A back into plain `nn.Linear` layers.
`token_gated_lora(model, gate)` limits the update to the positions where `gate` (B, T) is true
for the forwards run inside it; the rest get exactly the base layer's output. MM-LLMs use it to
adapt only the image positions (InternLM-XComposer2's Partial LoRA, arXiv:2401.16420), so text
keeps the base LM's weights; such adapters cannot be merged and stay in the checkpoint.

How checkpoints stay loadable: `LoRALinear` keeps the base layer's `weight`/`bias` under their
original names and adds `lora_A`/`lora_B`. Training checkpoints written while adapters are on
therefore hold the adapters too (exact resume); the recipes merge before writing the final
model checkpoint, whose names are then exactly those of the plain model, so it loads with
`polymodal.load` and exports like any other. The family config records nothing about LoRA.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from polymodal.bounds import MAX_WIDTH, check_float, check_int

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class LoRAConfig:
    """rank: adapter rank (0 = LoRA off); alpha: scale numerator (scale = alpha / rank);
    dropout: on the adapter's input; targets: names (last path component) of the Linear layers
    to adapt, e.g. q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    image_tokens_only (MM-LLMs): the adapters act on image positions only (Partial LoRA); text
    positions, and so text-only chats, keep the base LM's outputs exactly."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    image_tokens_only: bool = False

    def __post_init__(self) -> None:
        """Check the sizes against `polymodal.bounds` before any adapter is built."""
        check_int("LoRAConfig", "rank", self.rank, 0, MAX_WIDTH)
        check_float("LoRAConfig", "alpha", self.alpha, 0)
        check_float("LoRAConfig", "dropout", self.dropout, 0, 1, high_open=True)


class LoRALinear(nn.Linear):
    """An `nn.Linear` plus a trainable low-rank update. x (..., in) -> (..., out).

    The base `weight`/`bias` keep their names (and are frozen); `lora_A` (rank, in) starts
    Kaiming-uniform and `lora_B` (out, rank) at zero, so the layer starts equal to the base.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.token_gate: torch.Tensor | None = None  # set by `token_gated_lora`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        if self.token_gate is not None:
            if self.token_gate.shape != x.shape[:-1]:
                raise ValueError(f"LoRA token gate of shape {tuple(self.token_gate.shape)} does not match the "
                                 f"input's positions {tuple(x.shape[:-1])}")
            update = update * self.token_gate.unsqueeze(-1).to(update.dtype)
        return F.linear(x, self.weight, self.bias) + update

    def merged(self) -> nn.Linear:
        """A plain `nn.Linear` with the update folded in: W + scale * B @ A."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight + self.scale * (self.lora_B @ self.lora_A))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        out.weight.requires_grad_(self.weight.requires_grad)
        if out.bias is not None:
            out.bias.requires_grad_(self.bias.requires_grad)
        return out


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_lora(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS, rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, freeze_base: bool = True) -> list[str]:
    """Wrap every `nn.Linear` of `model` whose attribute name is in `targets` with `LoRALinear`.

    freeze_base: set requires_grad=False on every parameter of `model` except the adapters.
    Returns the dotted names of the adapted layers; raises if no layer matched `targets`.
    Tied weights stay tied: the wrapper reuses the base layer's parameter objects.
    """
    if isinstance(targets, str):
        raise TypeError("apply_lora: targets must be a sequence of layer names, not one string")
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and n.rpartition(".")[2] in set(targets)]
    if not names:
        raise ValueError(f"apply_lora: no nn.Linear named one of {list(targets)} in {type(model).__name__}")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    return names


def merge_lora(model: nn.Module) -> int:
    """Fold every `LoRALinear` in `model` back into a plain `nn.Linear`; returns how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        _replace(model, name, model.get_submodule(name).merged())
    return len(names)


@contextmanager
def token_gated_lora(model: nn.Module, gate: torch.Tensor) -> Iterator[None]:
    """Within the block, every `LoRALinear` of `model` applies its update only where `gate`
    (bool, the positions of the inputs, e.g. (B, T)) is true."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.token_gate = gate
    try:
        yield
    finally:
        for layer in layers:
            layer.token_gate = None


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (lora_A, lora_B) of every `LoRALinear` in `model`."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]
