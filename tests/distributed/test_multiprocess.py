"""Multi-process training on CPU (gloo): DDP and FSDP2 follow the loss curve of one process on the
same global batch, sharded checkpoints resume at other world sizes, and `polymodal train --nproc`
launches through torchrun.

Processes are expensive on the 2-core CI machine, so a few launches serve many checks: one
torchrun launch (the CLI, world size 2, FSDP, checkpointed), one spawn of 2 processes (6 runs:
3 recipes x 2 strategies) and one spawn of 4 (the same 6 runs and a resume of the world-2 run).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import polymodal
from polymodal.config import load_config
from polymodal.distributed.checkpoint import consolidate, is_sharded_checkpoint
from polymodal.distributed.env import launched_by_torchrun
from polymodal.models.registry import get_recipe, resolve
from polymodal.recipes.runner import read_recipe_name, run_training

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
RECIPES = {
    "lm": ("configs/lm/tiny.yaml", ["data.num_documents=64"]),
    "clip": ("configs/clip/tiny.yaml", []),
    "mmllm": ("configs/mmllm/tiny_align.yaml", ["data.num_scenes=32"]),
}
CASES = {f"{name}-{strategy}": (name, strategy, []) for name in RECIPES for strategy in ("ddp", "fsdp")}
# A frozen vision tower, kept whole on every rank or sharded without gradients (world size 2 only).
FROZEN = ["trainable=[projector,lm]"]
FROZEN_CASES = {f"mmllm-frozen-{mode}": ("mmllm", "fsdp", [*FROZEN, f"train.parallel.frozen={mode}"])
                for mode in ("replicate", "shard")}
TOLERANCE = 1e-5


def run_case(name: str, strategy: str, extra: list[str]) -> list[float]:
    """Train recipe `name` for STEPS steps in this process (its rank of the current group, if any)."""
    path, overrides = RECIPES[name]
    _, recipe = get_recipe(read_recipe_name(ROOT / path))
    config = load_config(resolve(recipe.config), ROOT / path,
                         [f"train.steps={STEPS}", "train.out_dir=null", "train.log_every=1",
                          f"train.parallel.strategy={strategy}", *overrides, *extra])
    return run_training(config, recipe).result.losses


def _worker(rank: int, world: int, init_file: str, out: str, cases: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {key: run_case(*case) for key, case in cases.items()}
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def spawn(world: int, folder: Path, cases: dict) -> dict:
    """Run `cases` on `world` spawned gloo processes; rank 0's losses per case."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "losses.json"
    mp.spawn(_worker, args=(world, str(folder / "init"), str(out), cases), nprocs=world, join=True)
    return json.loads(out.read_text())


def _run_command(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "polymodal", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def reference() -> dict:
    """One process, no parallelism: the loss curves every multi-process run must follow."""
    curves = {name: run_case(name, "none", []) for name in RECIPES}
    curves["mmllm-frozen"] = run_case("mmllm", "none", FROZEN)
    return curves


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """`polymodal train --nproc 2` (torchrun) of the LM with FSDP, checkpointed every 2 steps."""
    out = tmp_path_factory.mktemp("launched") / "run"
    path, overrides = RECIPES["lm"]
    done = _run_command(["train", "--nproc", "2", path, f"train.steps={STEPS}", f"train.out_dir={out}",
                         "train.ckpt_every=2", "train.keep_checkpoints=0", "train.log_every=1",
                         "train.parallel.strategy=fsdp", "train.parallel.peak_tflops=1", *overrides])
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _resumable_copy(run: Path, dest: Path) -> Path:
    """A copy of `run` as if it had stopped after step 2 (its step-3 checkpoint gone)."""
    shutil.copytree(run, dest)
    shutil.rmtree(dest / "checkpoints" / "step-0000003")
    return dest


@pytest.fixture(scope="module")
def seen_runs(tmp_path_factory) -> dict:
    """Output folders of the MM-LLM stage run alone and on 2 processes (it records the ids it saw)."""
    return {"alone": tmp_path_factory.mktemp("seen") / "alone", "two": tmp_path_factory.mktemp("seen") / "two"}


@pytest.fixture(scope="module")
def world2(tmp_path_factory, seen_runs) -> dict:
    seen = {"mmllm-seen": ("mmllm", "ddp", [f"train.out_dir={seen_runs['two']}"])}
    return spawn(2, tmp_path_factory.mktemp("world2"), {**CASES, **FROZEN_CASES, **seen})


@pytest.fixture(scope="module")
def world4(tmp_path_factory, launched) -> dict:
    resume = _resumable_copy(launched, tmp_path_factory.mktemp("resume4") / "run")
    cases = {**CASES, "resume": ("lm", "fsdp", [f"train.out_dir={resume}", "train.resume=true",
                                                "train.ckpt_every=2", "train.keep_checkpoints=0"])}
    return spawn(4, tmp_path_factory.mktemp("world4"), cases)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_data_parallel_follows_one_process(case, world, reference, request):
    losses = request.getfixturevalue(f"world{world}")[case]
    want = reference[CASES[case][0]]
    assert len(losses) == STEPS
    assert max(abs(a - b) for a, b in zip(losses, want)) <= TOLERANCE, (losses, want)
    assert want[-1] < want[0]  # the curve moves: equal curves are not equal constants


@pytest.mark.parametrize("case", sorted(FROZEN_CASES))
def test_a_frozen_tower_replicated_or_sharded_trains_like_one_process(case, world2, reference):
    losses, want = world2[case], reference["mmllm-frozen"]
    assert max(abs(a - b) for a, b in zip(losses, want)) <= TOLERANCE, (losses, want)


def test_token_ids_seen_by_every_rank_reach_the_final_checkpoint(world2, seen_runs):
    run_case("mmllm", "none", [f"train.out_dir={seen_runs['alone']}"])
    ids = {name: json.loads((run / "final" / "seen_tokens.json").read_text())["ids"] for name, run in seen_runs.items()}
    assert ids["two"] == ids["alone"] and len(ids["alone"]) > 10


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_launch_with_nproc_trains_like_one_process_and_logs_throughput(launched, reference):
    lines = _metrics(launched)
    assert [line["step"] for line in lines] == [1, 2, 3]  # rank 0 alone writes metrics.jsonl
    assert max(abs(line["loss"] - want) for line, want in zip(lines, reference["lm"])) <= TOLERANCE
    for line in lines:
        assert line["stats"]["global_tokens_per_s"] > line["throughput"]  # two ranks' tokens
        assert 0 < line["stats"]["mfu"] < 1  # measured FLOPs over a 1 TFLOP/s peak
    assert [p.name for p in sorted((launched / "checkpoints").glob("step-*"))] == ["step-0000002", "step-0000003"]
    assert all(is_sharded_checkpoint(p) for p in (launched / "checkpoints").glob("step-*"))
    assert len(list((launched / "checkpoints" / "step-0000003" / "shards").glob("*.safetensors"))) == 2  # one per rank


def test_sharded_checkpoint_converts_to_the_final_folder(launched, tmp_path):
    final, _ = polymodal.load(launched / "final")
    converted, tokenizer = polymodal.load(consolidate(launched / "checkpoints" / "step-0000003", tmp_path / "final"))
    assert tokenizer is not None
    state = converted.state_dict()
    for key, value in final.state_dict().items():
        assert torch.equal(state[key], value), key


def test_sharded_checkpoint_resumes_at_one_and_four_processes(launched, world4, tmp_path):
    want = _metrics(launched)[-1]["loss"]
    assert abs(world4["resume"][-1] - want) <= TOLERANCE
    alone = _resumable_copy(launched, tmp_path / "run")
    # A plain single-process run (strategy auto) finds the sharded checkpoints and reads them on a
    # one-process group, which it closes again.
    run_case("lm", "auto", [f"train.out_dir={alone}", "train.resume=true", "train.ckpt_every=2",
                            "train.keep_checkpoints=0"])
    assert not dist.is_initialized() and not launched_by_torchrun()  # the process is left as it was
    resumed = _metrics(alone)
    assert [line["step"] for line in resumed] == [1, 2, 3]
    assert abs(resumed[-1]["loss"] - want) <= TOLERANCE
    assert is_sharded_checkpoint(alone / "checkpoints" / "step-0000003")  # saved sharded again, at world size 1
