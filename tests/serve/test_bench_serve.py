"""Smoke test of benchmarks/bench_serve.py: every contender runs on the quick model, answers every
request without errors, and the table prints."""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_serve  # noqa: E402


def test_quick_run_answers_every_request():
    results = bench_serve.run(quick=True, requests=6, clients=3, max_tokens=4, max_batch=4)
    for name in ("batching_on", "batching_off", "transformers"):
        r = results[name]
        assert r["answered"] == 6 and r["errors"] == 0 and r["rejected_429"] == 0, (name, r)
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 and r["p95_s"] >= r["p50_s"] > 0
    # Greedy, same weights, same stopping rule: the same amount of work for every contender.
    assert results["batching_on"]["completion_tokens"] == results["batching_off"]["completion_tokens"] \
        == results["transformers"]["completion_tokens"]
    assert "| batching on |" in bench_serve.format_table(results)
    assert bench_serve.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
