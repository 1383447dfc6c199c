"""Smoke test of benchmarks/bench_world.py on tiny workloads."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))

import bench_world


def test_bench_world_quick_run(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_world, "QUICK", bench_world.BenchSizes(generate=5, score=6, degrade=4))
    out = tmp_path / "world.json"
    results = bench_world.main(["--quick", "--json", str(out)])
    for size in bench_world.IMAGE_SIZES:
        assert results["generate"][size]["render_text_per_s"] > 0
    assert results["score"]["overall"] == {"all_correct": 1.0, "scenes": 6 * len(bench_world.SCORE_SIZES)}
    assert results["degrade"]["noise_std"][0] == 1.0 and results["degrade"]["blur_radius"][0.0] == 1.0
    assert "render+text" in bench_world.format_report(results)
    assert json.loads(out.read_text())["score"]["64"]["all_correct"] == 1.0
