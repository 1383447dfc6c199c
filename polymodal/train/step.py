"""One optimizer step of `train`: micro-batches, backward per optimizer, the non-finite guard.

An objective returns a scalar loss, which every optimizer steps on, or a dict {optimizer name:
loss} when several optimizers each minimise their own loss (a VAE and its discriminator): each
loss then back-propagates into its own optimizer's parameters only (`backward(inputs=...)`), so
the generator's adversarial term never moves the discriminator. Nothing is updated when any loss
or gradient norm is NaN/inf. On several processes only the last micro-batch's backward reduces
gradients over the ranks (the earlier ones accumulate locally: `set_gradient_sync`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from polymodal.distributed.parallelize import set_gradient_sync
from polymodal.errors import TrainingStopped
from polymodal.train.optim import Optimization


@dataclass
class StepLog:
    """One step's record, given to callbacks and (every `log_every` steps) written to metrics.jsonl.

    loss: the step's loss (the sum of `parts` when the objective returns several); parts: each
    optimizer's loss when there are several; throughput in `unit` ("tokens/s", "samples/s" or
    "steps/s"); elapsed: seconds since the `train` call started; stats: figures callbacks add
    (a distributed run's MFU, global tokens/s, peak memory), written to metrics.jsonl when present.
    """

    step: int
    loss: float
    lr: float
    grad_norm: float
    throughput: float
    unit: str
    elapsed: float
    parts: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)


class NonFiniteLossError(TrainingStopped, FloatingPointError):
    """A NaN/inf loss or gradient norm at `step` (micro-batch `micro_batch`, None for a gradient
    norm); the run stopped before updating or saving anything."""

    def __init__(self, message: str, step: int, micro_batch: int | None) -> None:
        super().__init__(message, step=step)
        self.micro_batch = micro_batch


def run_step(model, batches: Iterator, objective: Callable, optimizations: dict[str, Optimization], *,
             step: int, grad_accum: int, max_grad_norm: float | None, autocast, move: Callable[[Any], Any],
             tokens_in_batch: Callable[[Any], int] | None, started: float) -> StepLog:
    """One optimizer step of every optimization over `grad_accum` micro-batches; returns its log."""
    tick = time.perf_counter()
    names = list(optimizations)
    params = {name: [p for g in opt.optimizer.param_groups for p in g["params"]] for name, opt in optimizations.items()}
    lr = optimizations[names[0]].optimizer.param_groups[0]["lr"]
    micro_losses: list[torch.Tensor] = []  # (len(names),) per micro-batch
    amount, unit = 0, "steps/s"
    try:
        for micro in range(grad_accum):
            try:
                batch = next(batches)
            except StopIteration:
                raise RuntimeError(f"data ran out at step {step}, micro-batch {micro}; pass an endless stream "
                                   "(IndexedBatches, ShuffledBatches) or fewer steps") from None
            if tokens_in_batch is not None:
                amount, unit = amount + int(tokens_in_batch(batch)), "tokens/s"
            elif (samples := batch_size(batch)) is not None:
                amount, unit = amount + samples, "samples/s"
            # Reducing the gradient sum once, after the last micro-batch, gives the same mean as
            # reducing each micro-batch's, for 1/grad_accum of the communication.
            set_gradient_sync(model, micro == grad_accum - 1)
            with autocast:
                losses = _as_loss_dict(objective(model, move(batch)), names, step)
            # Scaling each micro-batch by 1/grad_accum makes the summed gradient that of the mean loss.
            if "" in losses:
                (losses[""] / grad_accum).backward()
            else:
                for i, name in enumerate(names):
                    (losses[name] / grad_accum).backward(inputs=params[name], retain_graph=i < len(names) - 1)
            micro_losses.append(torch.stack([value.detach().float() for value in losses.values()]))
            parts = list(losses)
    finally:
        set_gradient_sync(model, True)  # a step cut short must not leave later backwards unreduced
    stacked = torch.stack(micro_losses)  # (grad_accum, losses)
    norms = torch.stack([_grad_norm(params[name], max_grad_norm) for name in names])  # (optimizers,)
    # One host sync per step checks every loss and gradient norm.
    if not bool(torch.isfinite(stacked).all() & torch.isfinite(norms).all()):
        for opt in optimizations.values():
            opt.optimizer.zero_grad(set_to_none=True)
        raise _non_finite(stacked, norms, parts, names, step)
    for opt in optimizations.values():
        opt.optimizer.step()
        opt.optimizer.zero_grad(set_to_none=True)
        if opt.scheduler is not None:
            opt.scheduler.step()
    means = stacked.mean(0).tolist()
    seconds = max(time.perf_counter() - tick, 1e-9)
    return StepLog(step=step, loss=float(sum(means)), lr=lr, grad_norm=float(norms.norm()),
                   throughput=(amount if unit != "steps/s" else 1) / seconds, unit=unit,
                   elapsed=time.perf_counter() - started,
                   parts=dict(zip(parts, means)) if "" not in parts else {})


def _as_loss_dict(loss: Any, names: list[str], step: int) -> dict[str, torch.Tensor]:
    """The objective's result as {optimizer name: scalar loss}, or {"": loss} for one loss that
    every optimizer steps on; checked."""
    if not isinstance(loss, dict):
        return {"": _checked(loss, step)}
    if set(loss) != set(names):
        raise TypeError(f"the objective returned losses for {sorted(loss)} but the optimizers are {sorted(names)} "
                        f"(step {step}); return one loss, or one per optimizer")
    return {name: _checked(loss[name], step) for name in names}


def _checked(loss: Any, step: int) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise TypeError(f"the objective must return a scalar tensor, got {type(loss).__name__} "
                        f"{tuple(getattr(loss, 'shape', ()))} at step {step}")
    return loss


def _grad_norm(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """The total gradient norm of `params`, clipped to `max_norm` when given (the norm before clipping)."""
    if max_norm is not None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def _non_finite(stacked: torch.Tensor, norms: torch.Tensor, parts: list[str], names: list[str],
                step: int) -> NonFiniteLossError:
    """The error naming the first non-finite loss (micro-batch, optimizer) or gradient norm.

    stacked (grad_accum, len(parts)) losses; norms (len(names),) gradient norms per optimizer."""
    bad = (~torch.isfinite(stacked)).nonzero().tolist()
    if bad:
        micro, i = bad[0]
        which = f" of optimizer {parts[i]!r}" if parts[i] else ""
        return NonFiniteLossError(f"non-finite loss {stacked[micro, i].item()}{which} at step {step}, micro-batch "
                                  f"{micro}; the model was not updated and no checkpoint was written", step, micro)
    i = int((~torch.isfinite(norms)).nonzero()[0])
    which = f" of optimizer {names[i]!r}" if len(names) > 1 else ""
    return NonFiniteLossError(f"non-finite gradient norm {norms[i].item()}{which} at step {step}; the model was "
                              "not updated and no checkpoint was written", step, None)


def batch_size(batch: Any) -> int | None:
    """Leading dimension of the first tensor in a batch, or None when there is none."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.ndim else None
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        if (size := batch_size(value)) is not None:
            return size
    return None
