"""BLIP against the contrastive (`clip`) family on the same world data and the same wall time.

Trains configs/clip/world.yaml and configs/fusion/blip_world.yaml side by side (two processes,
one thread each, so they share the machine alike), each for the step count its measured speed
fits into --minutes, then evaluates both on the same --n test scenes with their detailed captions
(the `clip` family's retrieval set) and prints text->image R@1 for each, plus BLIP's ITM-reranked
R@1, ITM accuracy and captioning CIDEr, with the training wall times (compare them: equal time
is the premise). The step counts are arguments, so a run can be repeated exactly; choose them
from a short run of each (metrics.jsonl's "elapsed") on the machine at hand. The defaults fill
about 16 minutes each on a quiet 2-core EPYC.

Usage: python benchmarks/probe_blip_vs_clip.py --out runs/blip-vs-clip [--clip-steps 1750 --blip-steps 1400] [--n 1000]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"clip": "configs/clip/world.yaml", "blip": "configs/fusion/blip_world.yaml"}


def train_both(out: Path, steps: dict[str, int]) -> dict[str, float]:
    """Train both recipes concurrently (one thread each); {family: training seconds}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {}
    for family, config in CONFIGS.items():
        extra = ["eval_n=0"] if family == "clip" else []
        cmd = [sys.executable, "-m", "polymodal", "train", str(ROOT / config), f"train.out_dir={out / family}",
               f"train.steps={steps[family]}", "train.overwrite=true", *extra]
        procs[family] = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for family, proc in procs.items():
        if proc.wait():
            raise SystemExit(f"{family} training failed ({' '.join(proc.args)})")
    return {family: json.loads((out / family / "metrics.jsonl").read_text().splitlines()[-1])["elapsed"]
            for family in CONFIGS}


def evaluate_both(out: Path, n: int) -> dict[str, dict[str, float]]:
    """{family: metrics} of both final checkpoints on n test scenes."""
    from polymodal.api import load
    from polymodal.models.registry import family_of, resolve

    metrics = {}
    for family in CONFIGS:
        model, tokenizer = load(out / family / "final")
        metrics[family] = resolve(family_of(model).evaluate)(model, tokenizer, data="world", split="test", n=n,
                                                             progress=False)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--clip-steps", type=int, default=1750)
    parser.add_argument("--blip-steps", type=int, default=1400)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--eval-only", action="store_true", help="evaluate checkpoints already in --out")
    args = parser.parse_args()
    seconds = {} if args.eval_only else train_both(args.out, {"clip": args.clip_steps, "blip": args.blip_steps})
    metrics = evaluate_both(args.out, args.n)
    for family, m in metrics.items():
        spent = f", trained {seconds[family] / 60:.1f} min" if seconds else ""
        print(f"{family}: t2i_R@1 {100 * m['t2i_R@1']:.1f}% (ceiling {100 * m['t2i_R@1_ceiling']:.1f}%){spent}")
    b = metrics["blip"]
    print(f"blip: t2i_R@1_itm {100 * b['t2i_R@1_itm']:.1f}%, itm_acc {100 * b['itm_acc']:.1f}%, "
          f"itm_acc_hard {100 * b['itm_acc_hard']:.1f}%, CIDEr {b['cider']:.2f}, BLEU-4 {100 * b['bleu4']:.1f}")
    (args.out / "comparison.json").write_text(json.dumps({"seconds": seconds, "metrics": metrics}, indent=2) + "\n")


if __name__ == "__main__":
    main()
