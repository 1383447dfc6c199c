"""The training loop: one function, `train`, for every model family and objective.

`train(model, data, loss_fn, config)` runs AdamW with a warm-up + decay schedule, gradient
accumulation, gradient clipping and bf16 autocast on CUDA, guards against non-finite losses and
gradients, writes periodic atomic checkpoints (model + full training state), `metrics.jsonl` and
`loss.png` under `config.out_dir`, and resumes exactly: a run restarted from its step-k
checkpoint reproduces, bit for bit on CPU, the losses and weights of a run that never stopped,
provided `data` is a resumable stream (see `polymodal.train.data`).

Steps are counted from 1: "step k" is the k-th optimizer update, and checkpoint `step-000000k`
holds the state after it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from polymodal.atomic import write_text_atomic
from polymodal.checkpoint import load_state_dict_checked, read_weights
from polymodal.models.registry import config_to_dict
from polymodal.plots import save_loss_plot
from polymodal.train.data import is_resumable
from polymodal.train.optim import build_optimizer, build_scheduler
from polymodal.train.state import (
    TrainingState,
    capture_rng,
    find_latest_checkpoint,
    load_training_state,
    restore_rng,
    save_training_checkpoint,
)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


@dataclass
class TrainConfig:
    """Hyper-parameters and bookkeeping of one training run (load it with `polymodal.config`).

    ckpt_every: save every N steps (0: only the final checkpoint). keep_checkpoints: how many
    step folders to keep (0: all). out_dir: where checkpoints/metrics/plot go (None: nowhere).
    max_grad_norm: clip threshold (None: no clipping; the norm is still checked for NaN/inf).
    precision: "auto" = bf16 autocast on CUDA, fp32 elsewhere. resume: continue from the latest
    checkpoint in out_dir when there is one.
    """

    steps: int = 1000
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 0
    keep_checkpoints: int = 2
    out_dir: str | None = None
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: str = "auto"
    resume: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "ckpt_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"TrainConfig.schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"TrainConfig.precision must be auto, fp32 or bf16, got {self.precision!r}")

    def checkpoints_at(self, step: int) -> bool:
        """Whether the loop writes a training checkpoint (with an `out_dir`) after `step`."""
        return bool(self.ckpt_every and step % self.ckpt_every == 0) or step == self.steps


@dataclass
class TrainResult:
    """What a run produced: the loss of every step (resumed steps included), the final step,
    the final checkpoint folder (None without out_dir) and the wall time of this call in seconds."""

    losses: list[float]
    step: int
    checkpoint: Path | None
    wall_time: float


@dataclass
class StepLog:
    """One step's record, given to `on_step` and (every `log_every` steps) to metrics.jsonl.

    throughput is in `unit` ("tokens/s", "samples/s" or "steps/s").
    """

    step: int
    loss: float
    lr: float
    grad_norm: float
    throughput: float
    unit: str
    elapsed: float


class NonFiniteLossError(FloatingPointError):
    """A NaN/inf loss or gradient norm; the run stopped before updating or saving anything."""

    def __init__(self, message: str, step: int, micro_batch: int | None) -> None:
        super().__init__(message)
        self.step = step
        self.micro_batch = micro_batch


def train(
    model: nn.Module,
    data: Any,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    config: TrainConfig,
    *,
    tokens_in_batch: Callable[[Any], int] | None = None,
    on_step: Callable[[StepLog], None] | None = None,
    tokenizer: Any = None,
) -> TrainResult:
    """Train `model` for `config.steps` optimizer steps on batches drawn from `data`.

    data: a resumable stream (`IndexedBatches`, `ShuffledBatches`, or anything with
        `state_dict`/`load_state_dict`, see `polymodal.train.data`) or any iterable of batches;
        a plain iterable is fast-forwarded on resume by re-drawing the batches already consumed,
        which is exact only if it yields the same batches every time.
    loss_fn(model, batch) -> scalar loss; each step averages it over `grad_accum` batches.
    tokens_in_batch(batch) -> int: makes the progress bar and metrics report tokens/s.
    on_step(StepLog): called after every step (after that step's checkpoint is written).
    tokenizer: saved into every checkpoint so the folders load with `load_checkpoint`.
    A fresh run seeds the python, numpy and torch RNGs with `config.seed`; a resumed run restores
    them, with the weights, optimizer, scheduler, data position and loss history, from the latest
    checkpoint in `config.out_dir`.
    Raises `NonFiniteLossError` on a NaN/inf loss or gradient norm, keeping the last checkpoint.
    """
    started = time.perf_counter()
    device = _resolve_device(config.device)
    autocast = _autocast(config.precision, device)
    model.to(device)
    optimizer = build_optimizer(model, lr=config.lr, weight_decay=config.weight_decay,
                                betas=config.betas, eps=config.eps)
    scheduler = build_scheduler(optimizer, total_steps=config.steps, warmup_steps=config.warmup_steps,
                                schedule=config.schedule, min_lr_ratio=config.min_lr_ratio)
    out_dir = Path(config.out_dir) if config.out_dir is not None else None
    ckpt_root = out_dir / "checkpoints" if out_dir is not None else None
    resumable = is_resumable(data)
    batches: Iterator = data if resumable else iter(data)
    losses: list[float] = []
    step = 0
    checkpoint = find_latest_checkpoint(ckpt_root) if ckpt_root is not None else None
    if checkpoint is not None and not config.resume:
        raise FileExistsError(
            f"out_dir {out_dir} already holds checkpoints (latest: {checkpoint.name}); set resume=true "
            "to continue that run or choose another out_dir"
        )
    if checkpoint is not None:
        state = load_training_state(checkpoint)
        load_state_dict_checked(model, read_weights(checkpoint), source=str(checkpoint))
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        restore_rng(state.rng)
        if resumable:
            data.load_state_dict(state.data)
        else:
            _skip(batches, state.step * config.grad_accum)
        step, losses = state.step, list(state.losses)
    else:
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
    metrics = _open_metrics(out_dir, step) if out_dir is not None else None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    model.train()
    bar = tqdm(total=config.steps, initial=step, desc="train", dynamic_ncols=True)
    try:
        while step < config.steps:
            log = _train_step(model, batches, loss_fn, optimizer, params, config, step + 1,
                              autocast, device, tokens_in_batch, started)
            scheduler.step()
            step += 1
            losses.append(log.loss)
            bar.set_postfix(loss=f"{log.loss:.4f}", lr=f"{log.lr:.2e}",
                            speed=f"{log.throughput:.1f} {log.unit}", refresh=False)
            bar.update(1)
            if metrics is not None and (step % config.log_every == 0 or step == config.steps):
                metrics.write(json.dumps(dataclasses.asdict(log)) + "\n")
                metrics.flush()
            if ckpt_root is not None and config.checkpoints_at(step):
                state = TrainingState(
                    step=step, losses=list(losses), optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(), rng=capture_rng(),
                    data=data.state_dict() if resumable else None, config=config_to_dict(config),
                )
                checkpoint = save_training_checkpoint(ckpt_root, model, state, tokenizer=tokenizer,
                                                      keep=config.keep_checkpoints)
                save_loss_plot(list(range(1, step + 1)), losses, out_dir / PLOT_FILE)
            if on_step is not None:
                on_step(log)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    return TrainResult(losses=losses, step=step, checkpoint=checkpoint, wall_time=time.perf_counter() - started)


def _train_step(model, batches, loss_fn, optimizer, params, config, step, autocast, device,
                tokens_in_batch, started) -> StepLog:
    """One optimizer step over `grad_accum` micro-batches; raises before updating on NaN/inf."""
    tick = time.perf_counter()
    lr = optimizer.param_groups[0]["lr"]
    micro_losses = []
    amount, unit = 0, "steps/s"
    for micro in range(config.grad_accum):
        try:
            batch = next(batches)
        except StopIteration:
            raise RuntimeError(
                f"data ran out at step {step}, micro-batch {micro}; pass an endless stream "
                "(IndexedBatches, ShuffledBatches) or fewer steps"
            ) from None
        if tokens_in_batch is not None:
            amount, unit = amount + int(tokens_in_batch(batch)), "tokens/s"
        elif (samples := _batch_size(batch)) is not None:
            amount, unit = amount + samples, "samples/s"
        with autocast:
            loss = loss_fn(model, _to_device(batch, device))
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                            f"{tuple(getattr(loss, 'shape', ()))} at step {step}")
        # Scaling each micro-batch by 1/grad_accum makes the summed gradient that of the mean loss.
        (loss / config.grad_accum).backward()
        micro_losses.append(loss.detach().float())
    stacked = torch.stack(micro_losses)  # (grad_accum,)
    if config.max_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    # One host sync per step checks both the losses and the gradient norm.
    if not bool(torch.isfinite(stacked).all() & torch.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        bad = (~torch.isfinite(stacked)).nonzero().flatten().tolist()
        if bad:
            raise NonFiniteLossError(
                f"non-finite loss {stacked[bad[0]].item()} at step {step}, micro-batch {bad[0]}; "
                "the model was not updated and no checkpoint was written", step, bad[0])
        raise NonFiniteLossError(
            f"non-finite gradient norm {grad_norm.item()} at step {step}; the model was not updated "
            "and no checkpoint was written", step, None)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss_value = stacked.mean().item()
    seconds = max(time.perf_counter() - tick, 1e-9)
    if unit == "steps/s":
        amount = 1
    return StepLog(step=step, loss=loss_value, lr=lr, grad_norm=grad_norm.item(),
                   throughput=amount / seconds, unit=unit, elapsed=time.perf_counter() - started)


def _skip(batches: Iterator, count: int) -> None:
    """Fast-forward a plain iterable past the `count` batches a resumed run already consumed."""
    for drawn in range(count):
        try:
            next(batches)
        except StopIteration:
            raise RuntimeError(
                f"cannot resume: data ran out after {drawn} of the {count} batches already consumed"
            ) from None


def _resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for "bf16" (or "auto" on CUDA); a no-op context for fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested dict/list/tuple) batch to `device`; an object with its own
    `.to(device)` (a `PackedBatch`) moves itself."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if callable(getattr(batch, "to", None)):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple takes positional fields
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _batch_size(batch: Any) -> int | None:
    """Leading dimension of the first tensor in a batch, or None when there is none."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.ndim else None
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        if (size := _batch_size(value)) is not None:
            return size
    return None


def _open_metrics(out_dir: Path, step: int):
    """Open `metrics.jsonl` for appending, first dropping lines past `step` (from a crashed run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / METRICS_FILE
    kept = []
    if step > 0 and path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip() and json.loads(line)["step"] <= step:
                kept.append(line + "\n")
    write_text_atomic(path, "".join(kept))
    return open(path, "a", encoding="utf-8")
