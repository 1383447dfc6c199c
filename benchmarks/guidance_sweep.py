"""Guidance scale vs exact-scorer accuracy of a trained image generator.

Evaluates CHECKPOINT with `polymodal.eval.generation.evaluate_generation` at each guidance scale
(the same prompts and seeds every time) and prints one row per scale: single-object
color + shape + position and all-correct, two-object all-correct, compositional all-correct.

    python benchmarks/guidance_sweep.py runs/diffusion-world-t2i/final --scales 1 2 3 5 --n 100 [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from polymodal.api import load
from polymodal.eval.generation import evaluate_generation

COLUMNS = ("single/color_shape_position", "single/all_correct", "two/color_shape_position", "two/all_correct",
           "compositional/color_shape_position")


def main(argv: list[str] | None = None) -> dict:
    """Run the sweep; returns {scale: metrics}."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0])
    parser.add_argument("--n", type=int, default=100, help="prompts per column")
    parser.add_argument("--split", default="val")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    loaded = load(args.checkpoint)
    results = {}
    print(f"{'guidance':>8}  " + "  ".join(f"{c:>34}" for c in COLUMNS) + "  seconds")
    for scale in args.scales:
        start = time.perf_counter()
        metrics = evaluate_generation(loaded.model, loaded.tokenizer, split=args.split, n=args.n, guidance=scale,
                                      progress=False)
        results[scale] = metrics
        print(f"{scale:>8g}  " + "  ".join(f"{metrics.get(c, float('nan')):>34.1%}" for c in COLUMNS)
              + f"  {time.perf_counter() - start:7.0f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(["python"] + sys.argv), "results": results},
                                              indent=2))
    return results


if __name__ == "__main__":
    main()
