"""`ParallelConfig`: how a run is spread over processes (the `train.parallel` block of a recipe).

Kept free of torch.distributed imports so that loading a config stays cheap. Every field is
checked when the config is built, before any process group or model exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from polymodal.bounds import check_float, check_int
from polymodal.errors import ConfigError

STRATEGIES = ("auto", "none", "ddp", "fsdp")
PRECISIONS = ("auto", "fp32", "bf16")
CHECKPOINTING = ("none", "full", "selective")
FROZEN = ("replicate", "shard")
BACKENDS = ("auto", "gloo", "nccl")


@dataclass
class ParallelConfig:
    """Data parallelism, activation checkpointing and compilation, applied from outside the model.

    strategy: "auto" (ddp when launched on several processes, else none), "none", "ddp"
        (replicated weights, all-reduced gradients) or "fsdp" (FSDP2 `fully_shard`: weights,
        gradients and optimizer state sharded per block). "ddp"/"fsdp" in a single process run
        on a one-process group, so their checkpoints (sharded, `torch.distributed.checkpoint`)
        resume at any world size.
    mixed_precision: FSDP2 parameter/reduce dtypes. "bf16": bf16 parameters in compute, fp32
        gradient reduction and fp32 master weights; "fp32": none; "auto": bf16 on CUDA, fp32 on CPU.
    activation_checkpointing: "none", "full" (every block recomputes its activations in
        backward) or "selective" (every `checkpoint_every`-th block).
    compile: `torch.compile` each block (the repeated units: one compiled graph serves them all).
    frozen: blocks whose parameters are all frozen (a frozen vision tower, VAE): "replicate"
        keeps them whole on every rank, outside FSDP; "shard" shards them like the rest (memory
        saved, an all-gather per forward), in both cases without gradients.
    backend: "auto" = nccl on CUDA, gloo on CPU.
    peak_tflops: the accelerator's peak dense TFLOP/s for MFU in metrics.jsonl; 0 looks a CUDA
        device up by name (H100, H200, A100), and leaves MFU out where it is unknown (CPUs).
    """

    strategy: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    mixed_precision: Literal["auto", "fp32", "bf16"] = "auto"
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    checkpoint_every: int = 2
    compile: bool = False
    frozen: Literal["replicate", "shard"] = "replicate"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    peak_tflops: float = 0.0

    def __post_init__(self) -> None:
        """Check every field (a typo in a choice is named with the allowed values)."""
        for name, allowed in (("strategy", STRATEGIES), ("mixed_precision", PRECISIONS),
                              ("activation_checkpointing", CHECKPOINTING), ("frozen", FROZEN),
                              ("backend", BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"train.parallel.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        check_int("train.parallel", "checkpoint_every", self.checkpoint_every, 1, 10_000)
        check_float("train.parallel", "peak_tflops", self.peak_tflops, 0)

    def resolved_strategy(self, world_size: int) -> str:
        """The strategy a run of `world_size` processes uses ("auto" decided)."""
        if self.strategy == "auto":
            return "ddp" if world_size > 1 else "none"
        if self.strategy == "none" and world_size > 1:
            raise ConfigError(f"train.parallel.strategy=none cannot run on {world_size} processes; "
                              "use ddp or fsdp (or auto)")
        return self.strategy

    @property
    def wraps_blocks(self) -> bool:
        """Whether checkpointing or compilation changes the blocks (even in a plain single process)."""
        return self.activation_checkpointing != "none" or self.compile
