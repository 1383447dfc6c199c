"""Scale out: one recipe on many processes, GPUs and nodes, on PyTorch's own distributed stack.

The model code stays single-device; everything here is applied from outside it:
    config.py        `ParallelConfig`, the `train.parallel` block of every recipe
    env.py           process-group start-up from torchrun's environment; `polymodal train --nproc N`
    parallelize.py   `parallelize(model, config, world)`: DDP / FSDP2, activation checkpointing, compile
    sharding.py      each rank's share of the global batch; the global-batch loss weighting
    checkpoint.py    sharded DCP checkpoints, resumable at any world size; conversion to final/
    metrics.py       MFU, global tokens/s, peak memory per rank
    features.py      frozen-encoder feature caching to WebDataset shards
    session.py       the wiring `polymodal.recipes.runner` uses
See docs/notes/scale_out.md for launching on several nodes and planning a run.
"""
from polymodal.distributed.config import ParallelConfig
from polymodal.distributed.env import World, current_world, init_process_group
from polymodal.distributed.parallelize import blocks_of, parallelize

__all__ = ["ParallelConfig", "World", "blocks_of", "current_world", "init_process_group", "parallelize"]
