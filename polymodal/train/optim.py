"""AdamW with the usual weight-decay split, and warm-up + cosine/linear/constant LR schedules.

Weight decay applies only to parameters with ndim >= 2 (matrices, conv kernels, embedding
tables); biases, norm gains and other 1-D parameters are not decayed, since shrinking them
toward zero only fights the normalisation they implement.

The schedule, for optimizer step s = 0, 1, ..., total_steps - 1:
    warm-up   s < warmup_steps:  lr * (s + 1) / warmup_steps
    then      p = (s - warmup_steps) / max(1, total_steps - warmup_steps) in [0, 1)
              cosine:   min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * p))
              linear:   min_lr + (lr - min_lr) * (1 - p)
              constant: lr
with min_lr = lr * min_lr_ratio.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("cosine", "linear", "constant")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into a decayed group (ndim >= 2) and a non-decayed group.

    Parameters with `requires_grad=False` (frozen encoders, ...) are left out entirely; a
    parameter shared under two names (tied weights) appears once.
    """
    decay, no_decay = [], []
    for param in model.parameters():  # parameters() already skips duplicates of tied weights
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `model`, decaying only ndim >= 2 parameters.

    The fused kernel (one pass per parameter, much faster than the default loop on CPU)
    serves plain parameters; sharded DTensor parameters (FSDP2) keep the default implementation.
    """
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError(f"build_optimizer: {type(model).__name__} has no parameter with requires_grad=True")
    params = [p for group in groups for p in group["params"]]
    fused = all(type(p) is nn.Parameter and p.is_floating_point() for p in params) and \
        len({p.device for p in params}) == 1
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


# Param-group settings that choose the kernel, not the maths.
IMPLEMENTATION_FLAGS = ("fused", "foreach")


def keep_implementation(optimizer: torch.optim.Optimizer) -> None:
    """Put back the kernel choice (fused / foreach) `optimizer` was built with, after loading a state.

    `load_state_dict` copies every param-group setting from the checkpoint, these included, so a
    checkpoint written before the fused AdamW (or by a sharded run) would switch the kernel.
    """
    for group in optimizer.param_groups:
        for flag in IMPLEMENTATION_FLAGS:
            if flag in optimizer.defaults:
                group[flag] = optimizer.defaults[flag]


def lr_at(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.0,
) -> float:
    """The learning rate for 0-based optimizer step `step` (see the module docstring)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown LR schedule {schedule!r}; expected one of {SCHEDULES}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    min_lr = base_lr * min_lr_ratio
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr + (base_lr - min_lr) * (1.0 - progress)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """A `LambdaLR` following `lr_at`: call `.step()` after every optimizer step.

    The multiplier is `lr_at(step, base_lr=1)`, so each param group keeps its own base lr.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown LR schedule {schedule!r}; expected one of {SCHEDULES}")

    def multiplier(step: int) -> float:
        return lr_at(step, base_lr=1.0, total_steps=total_steps, warmup_steps=warmup_steps,
                     schedule=schedule, min_lr_ratio=min_lr_ratio)

    return LambdaLR(optimizer, multiplier)


@dataclass
class Optimization:
    """One optimizer and its (optional) learning-rate scheduler, stepped together by `train`."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None


def default_optimization(model: nn.Module, config) -> dict[str, Optimization]:
    """{"model": AdamW over the model's trainable parameters + the warm-up/decay schedule}, with the
    hyper-parameters of a `TrainConfig`. The default of `train(optimizers=...)`."""
    optimizer = build_optimizer(model, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas,
                                eps=config.eps)
    scheduler = build_scheduler(optimizer, total_steps=config.steps, warmup_steps=config.warmup_steps,
                                schedule=config.schedule, min_lr_ratio=config.min_lr_ratio)
    return {"model": Optimization(optimizer, scheduler)}
