"""`polymodal eval MODEL`: the evaluation suite of the model's family, printed as a table.

Each family module offers `evaluate_cli(model, tokenizer, data, split, n) -> dict[str, float]`;
this file only dispatches on the loaded model's `family`.
"""
from __future__ import annotations

import argparse
import importlib
import json

# family -> module holding its `evaluate_cli`
EVALUATORS = {
    "lm": "polymodal.recipes.lm",
    "clip": "polymodal.eval.contrastive",
    "mmllm": "polymodal.eval.mmllm",
}


def add_cli(subparsers) -> None:
    """Register `polymodal eval`."""
    p = subparsers.add_parser("eval", help="evaluate a checkpoint on the shapes world or a real dataset")
    p.add_argument("model", help="polymodal checkpoint, HF folder or .gguf file")
    p.add_argument("--data", default="world", help="world (default), fashion-mnist, or a dataset path the family reads")
    p.add_argument("--split", default="test", help="world split: val, test or compositional")
    p.add_argument("--n", type=int, default=500, help="number of evaluation samples")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> dict[str, float]:
    """Load the model, run its family's evaluation, print (and optionally save) the metrics."""
    from polymodal.api import load

    model, tokenizer = load(args.model)
    family = getattr(model, "family", None)
    if family not in EVALUATORS:
        raise ValueError(f"no evaluation suite for model family {family!r}; known: {sorted(EVALUATORS)}")
    evaluate = importlib.import_module(EVALUATORS[family]).evaluate_cli
    metrics = evaluate(model, tokenizer, data=args.data, split=args.split, n=args.n)
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        # Accuracies and recalls read best as percentages; CIDEr lives on a 0-10 scale.
        as_percent = 0.0 <= value <= 1.0 and not key.startswith("cider")
        print(f"  {key:<{width}}  {100 * value:6.2f}%" if as_percent else f"  {key:<{width}}  {value:.4f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
    return metrics
