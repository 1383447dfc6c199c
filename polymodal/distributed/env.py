"""Process-group start-up and the `torchrun` launcher behind `polymodal train --nproc N`.

torchrun (`python -m torch.distributed.run`) starts one process per device and tells each who it
is through environment variables: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT (see docs/notes/scale_out.md for multi-node rendezvous). `init_process_group` reads
them; a run that asks for ddp/fsdp without torchrun gets a one-process group on a free local
port, so a sharded checkpoint can be written or resumed at world size 1 with the same code.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from polymodal.errors import UsageError

LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
MAX_PROCESSES_PER_NODE = 1024


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank (0..size-1), local_rank (its device index on the
    node), size (processes in the job) and the device it computes on."""

    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes what the job writes once (metrics, plots, final checkpoint)."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether torchrun's environment variables are set for this process."""
    return all(name in os.environ for name in LAUNCH_VARIABLES)


def current_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost (for a one-node rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_process_group(backend: str = "auto", device: str = "auto") -> World:
    """Join (or, outside torchrun, create a one-process) default process group; return the `World`.

    backend "auto" picks nccl when the device is CUDA, gloo otherwise. On CUDA each process
    computes on `cuda:LOCAL_RANK`. An already initialised group is reused.
    """
    launched = launched_by_torchrun()
    local_rank = int(os.environ["LOCAL_RANK"]) if launched else 0
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device).type
    where = torch.device("cuda", local_rank) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(where)
    if backend == "auto":
        backend = "nccl" if kind == "cuda" else "gloo"
    if backend == "nccl" and kind != "cuda":
        raise UsageError("train.parallel.backend=nccl needs CUDA devices; use gloo on CPU")
    if not dist.is_initialized():
        # Outside torchrun: a one-process group on a free port, leaving the environment untouched
        # (torchrun's variables would make a later launch in this process look like a worker).
        rendezvous = {} if launched else {"init_method": f"tcp://127.0.0.1:{free_port()}", "rank": 0, "world_size": 1}
        dist.init_process_group(backend=backend, device_id=where if kind == "cuda" else None, **rendezvous)
    return World(dist.get_rank(), local_rank, dist.get_world_size(), where)


def close_process_group() -> None:
    """Leave the default process group, if one is initialised (no barrier: a rank that failed
    must not wait for the others)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_nproc(nproc: int) -> None:
    """Raise `UsageError` unless `--nproc` is a sensible number of processes for one node."""
    if not 1 <= nproc <= MAX_PROCESSES_PER_NODE:
        raise UsageError(f"--nproc must be in [1, {MAX_PROCESSES_PER_NODE}], got {nproc}")


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    """The command line that runs `polymodal <args>` on `nproc` local processes under torchrun.

    Single node, rendezvous on a free localhost port (`--standalone`); multi-node launches call
    torchrun themselves (docs/notes/scale_out.md).
    """
    check_nproc(nproc)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "polymodal", *args]


def run_torchrun(nproc: int, args: list[str]) -> int:
    """Run `polymodal <args>` on `nproc` local processes under torchrun; return torchrun's exit status.

    torchrun runs as a child that this process waits for. A Ctrl-C reaches torchrun and its
    workers too (one terminal process group), and the workers stop after saving their step, so
    this process keeps waiting for them rather than leaving them orphaned. Refused inside a
    torchrun worker (it would start processes per process)."""
    if launched_by_torchrun():
        raise UsageError("--nproc given inside a torchrun launch; drop it (torchrun already started the processes)")
    command = torchrun_command(nproc, args)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # torchrun's default, unwarned
    sys.stdout.flush()
    sys.stderr.flush()
    process = subprocess.Popen(command, env=env)
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:
            continue
