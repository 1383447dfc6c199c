"""Shared helpers for the benchmark scripts: fair timing, device sync, FLOP counts and MFU.

Timing runs competing implementations *interleaved* (A, B, A, B, ...) rather than one after the
other, so that slow drifts of a shared machine (thermal limits, other tenants, frequency
scaling) hit every contender equally; the median of the timed rounds is reported.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def synchronize(device: str) -> None:
    """Wait for queued GPU work so wall-clock timings cover it (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    """Wall seconds per call of one contender (median, best, every sample) and the median CPU
    seconds of this process per call (less sensitive to other tenants than wall time)."""

    median: float
    best: float
    samples: list[float]
    cpu_median: float


def time_interleaved(fns: dict[str, Callable[[], object]], warmup: int, iters: int,
                     device: str = "cpu") -> dict[str, Timing]:
    """Time each function in interleaved rounds; name -> Timing.

    fns: name -> zero-argument callable doing one unit of work (a training step, a generation).
    warmup: untimed rounds first (allocator, kernel selection, lazy init); iters: timed rounds.
    The call order alternates between rounds so no contender always runs right after another.
    The best time is reported beside the median because on a shared machine other processes
    only ever add time: the best round is the closest to the uncontended cost.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for round_idx in range(iters):
        for name in (names if round_idx % 2 == 0 else names[::-1]):
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            fns[name]()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
    return {name: Timing(statistics.median(s), min(s), s, statistics.median(cpu[name])) for name, s in samples.items()}


def matmul_params(model: torch.nn.Module, embedding: torch.nn.Module | None = None) -> int:
    """Parameters that take part in matrix multiplies: all of them minus an untied input embedding.

    An embedding lookup is a gather, not a matmul, so it adds no FLOPs; when the embedding is tied
    to the LM head the shared matrix is counted once (it is the head's matmul).
    """
    total = sum(p.numel() for p in model.parameters())  # parameters() deduplicates tied weights
    if embedding is None:
        return total
    head = getattr(model, "lm_head", None)
    tied = head is not None and head.weight is embedding.weight
    return total if tied else total - embedding.weight.numel()


def causal_pairs(lengths: list[int]) -> int:
    """Number of (query, key) pairs a causal attention over documents of these lengths computes."""
    return sum(n * (n + 1) // 2 for n in lengths)


def train_flops(n_matmul_params: int, tokens: int, attn_pairs: int, num_layers: int, attn_width: int) -> float:
    """Model FLOPs of one forward+backward pass (backward = 2x forward).

    Dense part: 6 * params * tokens (Kaplan et al. 2020). Attention part: per layer, each attended
    (query, key) pair costs 2 * width FLOPs for q.k and 2 * width for p.v in the forward pass
    (width = num_heads * head_dim), tripled for forward+backward. Only useful pairs are counted:
    padding and cross-document pairs are waste, not model FLOPs.
    """
    return 6.0 * n_matmul_params * tokens + 3.0 * 4.0 * attn_width * num_layers * attn_pairs


def mfu(flops_per_second: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved / peak, as a fraction (peak given in TFLOP/s)."""
    return flops_per_second / (peak_tflops * 1e12)


def machine_info(device: str) -> dict:
    """A small description of where the numbers were taken (for the JSON record)."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": device,
        "load_average_1m": os.getloadavg()[0],  # other tenants' load: timings are contended above ~0.5/core
    }
    if os.path.exists("/proc/cpuinfo"):  # Linux: the CPU model name; platform.processor() is often empty
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu"], info["cpu_count"] = names[0], len(names)
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def save_json(result: dict, path: str | None) -> None:
    """Write a benchmark's result dict to `path` (nothing when path is None)."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
