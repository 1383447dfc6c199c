"""Step time of the tiny recipes on 1 process vs N processes (gloo on CPU, NCCL on CUDA).

Shows the scale-out wiring end to end, not speed: each recipe trains the same global batch for
the same steps, once as a plain single process and once under `polymodal train --nproc N` (DDP
by default, `--strategy fsdp` for FSDP2), and the median per-step wall time is read from each
run's metrics.jsonl (`elapsed` between consecutive steps, after `--warmup` steps). On a 2-core
CPU the N processes share the cores and pay gloo's collectives, so the ratio says how much the
wiring costs, not what a GPU cluster gains; the final losses are printed to show both runs
trained the same model.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine_info, save_json

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "lm": "configs/lm/tiny.yaml",
    "clip": "configs/clip/tiny.yaml",
    "mmllm": "configs/mmllm/tiny_align.yaml",
}


def run(config: str, out: Path, steps: int, nproc: int, strategy: str) -> list[dict]:
    """Train `config` for `steps` steps on `nproc` processes (1: plain); its metrics.jsonl records."""
    args = [config, f"train.steps={steps}", f"train.out_dir={out}", "train.log_every=1", "train.ckpt_every=0"]
    if nproc > 1:
        args = ["--nproc", str(nproc), *args, f"train.parallel.strategy={strategy}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "polymodal", "train", *args], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_seconds(lines: list[dict], warmup: int) -> float:
    """Median wall seconds per step after the first `warmup` steps."""
    elapsed = [line["elapsed"] for line in lines]
    return statistics.median(b - a for a, b in zip(elapsed[warmup:], elapsed[warmup + 1:]))


def main(argv: list[str] | None = None) -> dict:
    """Run every recipe at 1 and N processes, print a table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--nproc", type=int, default=2, help="processes of the parallel run")
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the median")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup + 1:
        raise SystemExit("--steps must exceed --warmup + 1")
    result = {"machine": machine_info("cpu"), "nproc": args.nproc, "strategy": args.strategy, "recipes": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.recipes:
            one = run(RECIPES[name], Path(scratch) / f"{name}-1", args.steps, 1, args.strategy)
            many = run(RECIPES[name], Path(scratch) / f"{name}-{args.nproc}", args.steps, args.nproc, args.strategy)
            t1, tn = step_seconds(one, args.warmup), step_seconds(many, args.warmup)
            result["recipes"][name] = {"step_s_1": t1, f"step_s_{args.nproc}": tn, "ratio": t1 / tn,
                                       "final_loss_1": one[-1]["loss"], f"final_loss_{args.nproc}": many[-1]["loss"]}
    result["machine"]["load_average_1m_end"] = os.getloadavg()[0]
    result["command"] = " ".join(["python"] + sys.argv)
    n = args.nproc
    print(f"step time, 1 vs {n} processes ({args.strategy}, same global batch, {args.steps} steps, "
          f"load {result['machine']['load_average_1m']:.1f})")
    print(f"{'recipe':8}{'1 proc (ms)':>13}{f'{n} procs (ms)':>15}{'ratio':>8}{'final loss 1 / N':>24}")
    for name, r in result["recipes"].items():
        print(f"{name:8}{r['step_s_1'] * 1e3:>13.1f}{r[f'step_s_{n}'] * 1e3:>15.1f}{r['ratio']:>8.2f}"
              f"{r['final_loss_1']:>13.5f} / {r[f'final_loss_{n}']:.5f}")
    save_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
