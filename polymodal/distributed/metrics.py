"""Throughput and memory figures of a distributed run: MFU, global tokens/s, peak memory per rank.

MFU (model FLOPs utilisation, PaLM appendix B) = model FLOPs per second / the hardware's peak.
The model FLOPs of a unit (a token, or a row for batches without tokens) are measured, not
estimated from a formula: the first micro-batch's forward runs under `FlopCounterMode` (every
matmul, attention and convolution counted), and a training step costs 3x its forward (the
backward computes gradients for activations and for weights, each as costly as the forward;
frozen towers make this an upper bound). Recomputation by activation checkpointing is not
counted, as MFU (unlike hardware FLOPs utilisation) asks.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from polymodal.distributed.env import World

# Peak dense bf16 tensor-core TFLOP/s from NVIDIA's data sheets (SXM parts; sparsity excluded).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
BACKWARD_FACTOR = 3.0


def peak_tflops(configured: float, device: torch.device) -> float | None:
    """The peak TFLOP/s MFU divides by: `configured` when > 0, else the CUDA device's entry in
    `PEAK_BF16_TFLOPS` (matched by name), else None (MFU is then not reported)."""
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for model, peak in PEAK_BF16_TFLOPS.items():
            if model in name:
                return peak
    return None


def forward_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run `fn()` under `FlopCounterMode`; return (its result, the FLOPs it performed)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        result = fn()
    return result, counter.get_total_flops()


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated CUDA memory of this process in GiB since start (None off CUDA)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2 ** 30


def memory_report(world: World) -> list[float] | None:
    """Every rank's peak allocated CUDA memory in GiB, gathered on all ranks (None off CUDA). Collective."""
    mine = peak_memory_gib(world.device)
    if mine is None:
        return None
    peaks = torch.zeros(world.size, device=world.device)
    peaks[world.rank] = mine
    dist.all_reduce(peaks)
    return peaks.tolist()


class ThroughputMeter:
    """Adds global tokens/s (or samples/s), MFU and CUDA peak memory to each step's `StepLog.stats`.

    As a `train` callback it runs after every step; `counting(objective)` wraps the objective so
    the first micro-batch measures the FLOPs per unit. world: the run's `World`; peak: configured
    peak TFLOP/s (0: look the device up); tokens_in_batch: the recipe's token counter (rows are
    counted without one).
    """

    def __init__(self, world: World, peak: float, tokens_in_batch: Callable[[Any], int] | None) -> None:
        self.world = world
        self.peak = peak_tflops(peak, world.device)
        self.tokens_in_batch = tokens_in_batch
        self.flops_per_unit: float | None = None

    def counting(self, objective: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        """The objective, measuring FLOPs per unit on its first call."""

        def measured(model, batch):
            if self.flops_per_unit is not None:
                return objective(model, batch)
            loss, flops = forward_flops(lambda: objective(model, batch))
            units = self.tokens_in_batch(batch) if self.tokens_in_batch is not None else _rows(batch)
            self.flops_per_unit = BACKWARD_FACTOR * flops / max(units, 1)
            return loss

        return measured

    def __call__(self, context) -> None:
        """Record the step's global throughput, MFU and peak memory (collective: one all-reduce)."""
        log = context.log
        memory = peak_memory_gib(self.world.device)
        figures = torch.tensor([log.throughput, memory or 0.0], dtype=torch.float64, device=self.world.device)
        summed = figures.clone()
        dist.all_reduce(summed[:1])
        dist.all_reduce(summed[1:], op=dist.ReduceOp.MAX)
        counted = log.unit != "steps/s"  # tokens/s or samples/s add up over ranks; steps/s is shared
        total = float(summed[0]) if counted else float(figures[0])
        log.stats[f"global_{log.unit.replace('/', '_per_')}"] = total
        if self.peak is not None and self.flops_per_unit is not None and counted:
            log.stats["mfu"] = total * self.flops_per_unit / (self.world.size * self.peak * 1e12)
        if memory is not None:
            log.stats["peak_memory_gib"] = float(summed[1])


def _rows(batch: Any) -> int:
    """Rows of a batch without a token counter (1 when it has no tensor)."""
    from polymodal.train.step import batch_size

    return batch_size(batch) or 1
