"""`polymodal eval MODEL`: the evaluation suite the model's family declares, printed as a table.

The suite is `Family.evaluate` of the loaded model's family (`polymodal.models.registry`): a
function (model, tokenizer, data, split, n, progress) -> {metric: value}. This file knows no
family by name.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from polymodal.errors import UnsupportedTaskError, UsageError

SPLITS = ("train", "val", "test", "compositional")


def add_cli(subparsers) -> None:
    """Register `polymodal eval`."""
    p = subparsers.add_parser("eval", help="evaluate a checkpoint on the shapes world or a real dataset",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="polymodal checkpoint, HF folder or .gguf file")
    p.add_argument("--data", default="world", help="world, fashion-mnist (contrastive models), or what the family reads")
    p.add_argument("--split", default="test", choices=SPLITS, help="world split")
    p.add_argument("--n", type=int, default=500, help="number of evaluation samples (scenes, images)")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> dict[str, float]:
    """Load the model, run its family's evaluation, print (and optionally save) the metrics."""
    from polymodal.api import load_verbose
    from polymodal.models.registry import family_of, resolve

    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    model, tokenizer = load_verbose(args.model)
    family = family_of(model)
    if family.evaluate is None:
        raise UnsupportedTaskError(f"{args.model} holds a {family.name!r} model, whose family has no evaluation suite")
    print(f"evaluating {args.model} ({family.name}) on {args.data}, split {args.split}, n={args.n}", file=sys.stderr)
    started = time.perf_counter()
    metrics = resolve(family.evaluate)(model, tokenizer, data=args.data, split=args.split, n=args.n, progress=True)
    print(f"done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    print(format_metrics(metrics))
    if args.json:
        from polymodal.atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps(metrics, indent=2) + "\n")
    return metrics


def format_metrics(metrics: dict[str, float]) -> str:
    """The metrics as an aligned table: accuracies and recalls as percentages with one decimal
    (as the quickstart prints them), BLEU-4 on 0-100, CIDEr on its own 0-10 scale."""
    width = max(len(k) for k in metrics)
    lines = [f"  {'metric':<{width}}  value"]
    for key, value in metrics.items():
        if key.startswith("cider"):
            text = f"{value:.2f}"
        elif key.startswith("bleu"):
            text = f"{100 * value:.2f}"
        elif 0.0 <= value <= 1.0:
            text = f"{100 * value:.1f}%"
        else:
            text = f"{value:.4f}"
        lines.append(f"  {key:<{width}}  {text}")
    return "\n".join(lines)
