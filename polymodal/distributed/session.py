"""How `polymodal train` runs one recipe on N processes: the wiring between the recipe runner and
the pieces of this package.

`start_session(train_config)` decides whether the run is distributed (launched by torchrun, asks
for ddp/fsdp, or continues a run whose checkpoints are sharded) and, if so, joins the process
group. `session.prepare(job)` then changes only what data parallelism needs:
- the data stream yields this rank's share of each global batch (`sharding.shard_stream`);
- the objective is weighted so gradients and the logged loss are the global batch's
  (`sharding.GlobalBatchObjective`);
- `parallelize` (DDP/FSDP2, activation checkpointing, compile) runs inside `train()` after the
  model is on its device, composed with any parallelize hook the recipe had;
- checkpoints are sharded (`checkpoint.DistributedCheckpointer`);
- a throughput meter adds MFU / global tokens/s / CUDA peak memory to metrics.jsonl.
Rank 0 alone writes the run's single files (metrics, plot, final/, recipe.yaml); `final_model`
gathers FSDP shards into a plain model on rank 0 for that. A plain single-process run gets a
session that changes nothing, so it behaves exactly as before.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
import torch.nn as nn

from polymodal.distributed.config import ParallelConfig
from polymodal.distributed.env import World, close_process_group, init_process_group, launched_by_torchrun
from polymodal.train.ema import EMA


@dataclass
class Session:
    """A run's place in the job. world: None for a plain single process (nothing changes);
    owns_group: this session started the process group (and so ends it), rather than a caller
    that runs several trainings in one group."""

    config: ParallelConfig
    world: World | None
    seed: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's single files (always true without a process group)."""
        return self.world is None or self.world.is_main

    @property
    def strategy(self) -> str:
        """"none", "ddp" or "fsdp" for this run's world size."""
        return self.config.resolved_strategy(self.world.size if self.world is not None else 1)

    def barrier(self) -> None:
        """Wait for every rank (no-op without a process group)."""
        if self.world is not None:
            dist.barrier()

    def prepare(self, job):
        """The recipe's `TrainingJob` changed for this session (see the module docstring)."""
        if self.world is None:
            if not self.config.wraps_blocks:
                return job
            return dataclasses.replace(job, parallelize=self._parallelize_fn(job))
        from polymodal.distributed.metrics import ThroughputMeter
        from polymodal.distributed.sharding import GlobalBatchObjective, shard_stream

        data = shard_stream(job.data, self.world.rank, self.world.size)
        meter = ThroughputMeter(self.world, self.config.peak_tflops, job.tokens_in_batch)
        objective = meter.counting(GlobalBatchObjective(job.objective))
        # Extra state that accumulates what each rank's batches hold (the ids an MM-LLM stage saw)
        # declares `sync_across_ranks()`; it runs after every step, before any checkpoint is written.
        syncing = [value for value in job.state.values() if callable(getattr(value, "sync_across_ranks", None))]
        synced = [lambda context, value=value: value.sync_across_ranks() for value in syncing]
        return dataclasses.replace(job, data=data, objective=objective, parallelize=self._parallelize_fn(job),
                                   callbacks=[*synced, *job.callbacks, meter])

    def checkpointer(self):
        """The loop's checkpoint seam: sharded DCP checkpoints with a process group, else None (the
        single-process format)."""
        if self.world is None:
            return None
        from polymodal.distributed.checkpoint import DistributedCheckpointer

        return DistributedCheckpointer(self.seed)

    def final_model(self, job) -> nn.Module | None:
        """The model to save as final/ and evaluate: the recipe's final model (LoRA merged, the EMA
        weights copied in), gathered into a plain module on rank 0 when FSDP2 manages it; None on
        the other ranks. Collective.

        The recipe's `final_model` runs on every rank, after every FSDP2 unit has gathered its
        whole weights and kept them: merging LoRA then folds whole tensors and replaces modules
        as on one device, and an EMA gathers its averages into a plain copy."""
        if self.world is None:
            return job.final_model() if job.final_model is not None else job.model
        from polymodal.distributed.parallelize import gather_in_place, is_sharded, plain_copy

        if job.final_model is not None and is_sharded(job.model):
            gather_in_place(job.model)
        model = job.final_model() if job.final_model is not None else job.model
        if not is_sharded(model):
            return model if self.is_main else None
        return plain_copy(model, main_only=True)

    def report(self) -> None:
        """After training: rank 0 prints every rank's peak CUDA memory; then every rank waits for
        rank 0's writing (final/) to finish. Collective; nothing to do without a process group."""
        if self.world is None:
            return
        from polymodal.distributed.metrics import memory_report

        peaks = memory_report(self.world)
        if peaks is not None and self.is_main:
            print("peak allocated CUDA memory per rank (GiB): " + ", ".join(f"{p:.2f}" for p in peaks))
        self.barrier()

    def close(self) -> None:
        """Leave the process group this session started."""
        if self.owns_group:
            close_process_group()

    def _parallelize_fn(self, job):
        """parallelize(model) for `train`: the recipe's own hook first, then this session's; trainable
        modules in the job's extra state (a VAE's discriminator) get their gradients averaged, and
        an EMA of the weights follows their layout."""
        from polymodal.distributed.parallelize import average_gradients, parallelize

        def apply(model: nn.Module) -> nn.Module:
            if job.parallelize is not None:
                model = job.parallelize(model)
            if self.world is not None:
                for module in _trainable_state_modules(job):
                    average_gradients(module)
            model = parallelize(model, self.config, self.world)
            # An EMA of the weights takes their new (DTensor) layout before a checkpoint is
            # restored into it, so it resumes, updates and saves shard by shard.
            for value in job.state.values():
                if isinstance(value, EMA):
                    value.match_layout()
            return model

        return apply


def _trainable_state_modules(job) -> list[nn.Module]:
    """Modules among the job's extra state with parameters that train."""
    return [value for value in job.state.values()
            if isinstance(value, nn.Module) and any(p.requires_grad for p in value.parameters())]


def start_session(train_config) -> Session:
    """Join the process group when the run is distributed (see the module docstring), else a plain
    session. A caller's already initialised group is used as it is (and left open)."""
    config: ParallelConfig = train_config.parallel
    out = Path(train_config.out_dir) if train_config.out_dir else None
    sharded = False
    if out is not None and (out / "checkpoints").is_dir():
        from polymodal.distributed.checkpoint import holds_sharded_checkpoints

        sharded = holds_sharded_checkpoints(out / "checkpoints")
    existing = dist.is_initialized()
    if not (launched_by_torchrun() or existing or config.strategy in ("ddp", "fsdp") or sharded):
        return Session(config, None, train_config.seed)
    # strategy=none on several processes is refused before any process group starts.
    config.resolved_strategy(dist.get_world_size() if existing else int(os.environ.get("WORLD_SIZE", "1")))
    return Session(config, init_process_group(config.backend, train_config.device), train_config.seed,
                   owns_group=not existing)
