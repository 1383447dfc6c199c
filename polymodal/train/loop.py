"""The training loop: one function, `train`, for every model family and objective.

`train(model, data, objective, config)` runs the optimizers (default: AdamW with a warm-up +
decay schedule) over batches from `data`, with gradient accumulation, clipping and bf16 autocast
on CUDA, guards against non-finite losses and gradients, writes periodic atomic checkpoints
(model + full training state), `metrics.jsonl` and `loss.png` under `config.out_dir`, and
resumes exactly: a run restarted from its step-k checkpoint reproduces, bit for bit on CPU, the
losses and weights of a run that never stopped, provided `data` is a resumable stream (see
`polymodal.train.data`).

It is open at every seam a recipe needs (torchtitan applies parallelism from outside a
single-device model; torchtune passes built parts in):
- `optimizers`: any number of named optimizers with schedulers (or a function building them);
  an objective returning {name: loss} steps each on its own loss (`polymodal.train.step`);
- `state`: named extra objects with `state_dict`/`load_state_dict` (an `EMA`, a discriminator
  module, a counter) saved in every checkpoint and restored exactly on resume;
- `parallelize`: a function applied to the model after it moves to its device and before the
  optimizers are built (DDP/FSDP/compile; identity by default; `polymodal.distributed`);
- `checkpointer`: how checkpoints are written and read back (default: this module's
  single-process folders; a multi-process run passes `polymodal.distributed`'s sharded one).
  In a multi-process run rank 0 alone writes metrics.jsonl, the plot and the progress bar, and
  a fresh run seeds each rank with `seed + rank` (ranks draw different noise, rank 0 as alone);
- `callbacks`: functions of a `StepContext` called after every optimizer step, before that
  step's checkpoint is written (so what they change is saved with it): EMA updates, periodic
  evaluation and sample grids (`every`).
Ctrl-C or SIGTERM ends the current step, saves a checkpoint of it and raises `TrainingStopped`;
a run resumed from it continues exactly. A corrupt or truncated latest checkpoint is reported by
name and the run resumes from the newest intact one.

Steps are counted from 1: "step k" is the k-th optimizer update, and checkpoint `step-000000k`
holds the state after it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from polymodal.atomic import write_text_atomic
from polymodal.bounds import MAX_STEPS, check_float, check_int, check_length
from polymodal.checkpoint import load_state_dict_checked, read_weights
from polymodal.distributed.config import ParallelConfig
from polymodal.distributed.env import current_world
from polymodal.errors import CheckpointError, ConfigError, DestinationExistsError, TrainingStopped
from polymodal.models.registry import config_to_dict
from polymodal.plots import save_loss_plot
from polymodal.train.data import is_resumable
from polymodal.train.interrupt import stop_requests
from polymodal.train.optim import Optimization, default_optimization, keep_implementation
from polymodal.train.state import (
    TrainingState,
    capture_rng,
    load_training_state,
    restore_rng,
    resume_candidates,
    save_training_checkpoint,
)
from polymodal.train.step import NonFiniteLossError, StepLog, run_step

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
Optimizers = Mapping[str, Optimization] | Callable[[nn.Module, Any], Mapping[str, Optimization]]
__all__ = ["NonFiniteLossError", "StepContext", "StepLog", "TrainConfig", "TrainResult", "every", "train"]


@dataclass
class TrainConfig:
    """Hyper-parameters and bookkeeping of one training run (load it with `polymodal.config`).

    ckpt_every: save every N steps (0: only the final checkpoint). keep_checkpoints: how many
    step folders to keep (0: all). out_dir: where checkpoints/metrics/plot go (None: nowhere).
    max_grad_norm: clip threshold (None: no clipping; the norm is still checked for NaN/inf).
    precision: "auto" = bf16 autocast on CUDA, fp32 elsewhere. resume: continue from the latest
    checkpoint in out_dir when there is one. overwrite (recipes): start over in an out_dir that
    holds an earlier run, removing only what that run wrote. parallel: data parallelism,
    activation checkpointing and compilation (`polymodal.distributed.ParallelConfig`).
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
    overwrite: bool = False
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        """Check every field before a run starts (counts against `polymodal.bounds.MAX_STEPS`)."""
        owner = "TrainConfig"
        for name in ("steps", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
            check_int(owner, name, getattr(self, name), 1, MAX_STEPS)
        for name in ("warmup_steps", "ckpt_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
            check_int(owner, name, getattr(self, name), 0, MAX_STEPS)
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"TrainConfig.schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"TrainConfig.precision must be auto, fp32 or bf16, got {self.precision!r}")
        check_float(owner, "lr", self.lr, 0)
        check_float(owner, "weight_decay", self.weight_decay, 0)
        check_length(owner, "betas", self.betas, 2, 2)
        for i, beta in enumerate(self.betas):
            check_float(owner, f"betas[{i}]", beta, 0, 1, high_open=True)
        check_float(owner, "eps", self.eps, 0, low_open=True)
        if self.max_grad_norm is not None:
            check_float(owner, "max_grad_norm", self.max_grad_norm, 0, low_open=True)
        check_float(owner, "min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_int(owner, "seed", self.seed, 0, 2 ** 32 - 1)  # numpy's seed range

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
class StepContext:
    """What a callback sees after an optimizer step: the step's log, the model (as given to
    `train`, not a parallel wrapper), the run's output folder (None without one) and its length."""

    log: StepLog
    model: nn.Module
    out_dir: Path | None
    total_steps: int

    @property
    def step(self) -> int:
        """The step just completed (1-based)."""
        return self.log.step


def every(steps: int, callback: Callable[[StepContext], None], at_end: bool = True) -> Callable[[StepContext], None]:
    """A callback that runs `callback` every `steps` steps (and after the last one, with `at_end`):
    periodic evaluation or sample grids. The model is in eval mode and gradients are off during it."""
    if steps < 1:
        raise ValueError(f"every: steps must be >= 1, got {steps}")

    def periodic(context: StepContext) -> None:
        if context.step % steps == 0 or (at_end and context.step == context.total_steps):
            context.model.eval()
            try:
                with torch.no_grad():
                    callback(context)
            finally:
                context.model.train()

    return periodic


def train(
    model: nn.Module,
    data: Any,
    objective: Callable[[nn.Module, Any], Any],
    config: TrainConfig,
    *,
    optimizers: Optimizers | None = None,
    state: Mapping[str, Any] | None = None,
    parallelize: Callable[[nn.Module], nn.Module] | None = None,
    callbacks: Sequence[Callable[[StepContext], None]] = (),
    tokens_in_batch: Callable[[Any], int] | None = None,
    tokenizer: Any = None,
    checkpointer: Any = None,
) -> TrainResult:
    """Train `model` for `config.steps` optimizer steps on batches drawn from `data`.

    data: a resumable stream (`IndexedBatches`, `ShuffledBatches`, or anything with
        `state_dict`/`load_state_dict`, see `polymodal.train.data`) or any iterable of batches;
        a plain iterable is fast-forwarded on resume by re-drawing the batches already consumed,
        which is exact only if it yields the same batches every time.
    objective(model, batch) -> a scalar loss, or {optimizer name: loss}; each step averages it
        over `grad_accum` batches (`polymodal.train.objectives` holds the library's objectives).
    optimizers: {name: Optimization(optimizer, scheduler)} or a function (model, config) -> that;
        default: `default_optimization` (AdamW + the config's schedule, named "model").
    state: {name: object with state_dict/load_state_dict}; nn.Modules among them move to the
        training device with the model. All of it is checkpointed and restored on resume.
    parallelize(model) -> the module to run the objective on (default: the model itself).
    callbacks: called with a `StepContext` after every step (see the module docstring).
    tokens_in_batch(batch) -> int: makes the progress bar and metrics report tokens/s.
    tokenizer: saved into every checkpoint so the folders load with `polymodal.load`.
    checkpointer: an object with `candidates(root)`, `save(root, model, optimizations, snapshot,
        tokenizer=, keep=)` and `restore(candidates, model, optimizations, extra)` replacing the
        single-process checkpoint format (`polymodal.distributed.checkpoint.DistributedCheckpointer`).
    A fresh run seeds the python, numpy and torch RNGs with `config.seed`; a resumed run restores
    them, with everything above, from the newest intact checkpoint in `config.out_dir`.
    Raises `NonFiniteLossError` on a NaN/inf loss or gradient norm, keeping the last checkpoint,
    and `TrainingStopped` when interrupted (after saving the current step).
    """
    started = time.perf_counter()
    device = _resolve_device(config.device)
    autocast = _autocast(config.precision, device)
    model.to(device)
    extra = dict(state or {})
    for value in extra.values():
        if isinstance(value, nn.Module):
            value.to(device)
    run_model = parallelize(model) if parallelize is not None else model
    built = optimizers(model, config) if callable(optimizers) else optimizers or default_optimization(model, config)
    optimizations = dict(built)
    if not optimizations:
        raise ValueError("train: `optimizers` holds no optimizer")
    out_dir = Path(config.out_dir) if config.out_dir is not None else None
    ckpt_root = out_dir / "checkpoints" if out_dir is not None else None
    resumable = is_resumable(data)
    batches: Iterator = data if resumable else iter(data)
    step, losses, checkpoint = 0, [], None
    rank, _ = current_world()
    candidates = []
    if ckpt_root is not None:
        candidates = checkpointer.candidates(ckpt_root) if checkpointer is not None else resume_candidates(ckpt_root)
    if candidates and not config.resume:
        raise DestinationExistsError(
            f"out_dir {out_dir} already holds checkpoints (latest: {candidates[0].name}); set train.resume=true "
            "to continue that run or choose another out_dir")
    if candidates:
        if checkpointer is not None:
            checkpoint, saved = checkpointer.restore(candidates, model, optimizations, extra)
        else:
            checkpoint, saved = _restore_newest_intact(candidates, model, optimizations, extra)
        if resumable:
            data.load_state_dict(saved.data)
        else:
            _skip(batches, saved.step * config.grad_accum)
        step, losses = saved.step, list(saved.losses)
    else:
        seed_everything((config.seed + rank) % 2 ** 32)

    def save(at_step: int) -> Path:
        snapshot = TrainingState(
            step=at_step, losses=list(losses),
            optimizers={name: o.optimizer.state_dict() for name, o in optimizations.items()},
            schedulers={name: o.scheduler.state_dict() for name, o in optimizations.items() if o.scheduler},
            rng=capture_rng(), data=data.state_dict() if resumable else None,
            extra={name: value.state_dict() for name, value in extra.items()}, config=config_to_dict(config))
        if checkpointer is not None:
            folder = checkpointer.save(ckpt_root, model, optimizations, snapshot, tokenizer=tokenizer,
                                       keep=config.keep_checkpoints)
        else:
            folder = save_training_checkpoint(ckpt_root, model, snapshot, tokenizer=tokenizer,
                                              keep=config.keep_checkpoints)
        if rank == 0:
            save_loss_plot(list(range(1, at_step + 1)), losses, out_dir / PLOT_FILE)
        return folder

    metrics = _open_metrics(out_dir, step) if out_dir is not None and rank == 0 else None
    model.train()
    bar = tqdm(total=config.steps, initial=step, desc="train", dynamic_ncols=True, disable=rank != 0)
    with stop_requests() as stop:
        try:
            while step < config.steps:
                log = run_step(run_model, batches, objective, optimizations, step=step + 1,
                               grad_accum=config.grad_accum, max_grad_norm=config.max_grad_norm, autocast=autocast,
                               move=lambda batch: _to_device(batch, device), tokens_in_batch=tokens_in_batch,
                               started=started)
                step += 1
                losses.append(log.loss)
                bar.set_postfix(loss=f"{log.loss:.4f}", lr=f"{log.lr:.2e}",
                                speed=f"{log.throughput:.1f} {log.unit}", refresh=False)
                bar.update(1)
                context = StepContext(log, model, out_dir, config.steps)
                for callback in callbacks:
                    callback(context)
                if metrics is not None and (step % config.log_every == 0 or step == config.steps):
                    metrics.write(json.dumps(_metrics_line(log)) + "\n")
                    metrics.flush()
                if ckpt_root is not None and (config.checkpoints_at(step) or stop.requested):
                    checkpoint = save(step)
                if stop.requested:
                    where = f"; saved {checkpoint}, continue with train.resume=true" if ckpt_root is not None else ""
                    raise TrainingStopped(f"interrupted ({stop.requested}) after step {step} of {config.steps}{where}",
                                          step=step, checkpoint=checkpoint if ckpt_root is not None else None)
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
    return TrainResult(losses=losses, step=step, checkpoint=checkpoint, wall_time=time.perf_counter() - started)


def seed_everything(seed: int) -> None:
    """Seed the python, numpy and torch (CPU and CUDA) RNGs: recipes call it before building a
    model, so two runs of one config start from the same weights."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _restore_newest_intact(candidates: list[Path], model: nn.Module, optimizations: dict[str, Optimization],
                           extra: dict[str, Any]) -> tuple[Path, TrainingState]:
    """Load the first candidate checkpoint that reads whole into the model, optimizers and extra
    state; report each corrupt one on stderr. Raises `CheckpointError` when none is intact."""
    problems = []
    for folder in candidates:
        try:
            saved = load_training_state(folder)
            weights = read_weights(folder)
            _check_fits(saved, optimizations, extra, folder)
        except CheckpointError as err:
            problems.append(f"{folder.name}: {err}")
            print(f"polymodal train: checkpoint {folder} is unreadable ({err}); trying the previous one",
                  file=sys.stderr)
            continue
        load_state_dict_checked(model, weights, source=str(folder))
        for name, o in optimizations.items():
            o.optimizer.load_state_dict(saved.optimizers[name])
            keep_implementation(o.optimizer)
            if o.scheduler is not None:
                o.scheduler.load_state_dict(saved.schedulers[name])
        for name, value in extra.items():
            value.load_state_dict(saved.extra[name])
        restore_rng(saved.rng)
        return folder, saved
    raise CheckpointError("no intact checkpoint to resume from: " + "; ".join(problems))


def _check_fits(saved: TrainingState, optimizations: dict[str, Optimization], extra: dict[str, Any],
                folder: Path) -> None:
    """A checkpoint whose optimizers / schedulers / extra state names differ from this run's
    cannot be resumed exactly: name the difference."""
    for what, have, want in (("optimizers", saved.optimizers, optimizations),
                             ("schedulers", saved.schedulers, {n: o for n, o in optimizations.items() if o.scheduler}),
                             ("extra state", saved.extra, extra)):
        if set(have) != set(want):
            raise CheckpointError(f"{folder} holds {what} {sorted(have)}, this run has {sorted(want)}")


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


def _metrics_line(log: StepLog) -> dict:
    """A step's metrics.jsonl record: the log's fields, `stats` only when a callback added some."""
    line = dataclasses.asdict(log)
    if not line["stats"]:
        del line["stats"]
    return line


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
