"""The torchrun launcher behind `polymodal train --nproc`, and the throughput / memory figures."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from polymodal.cli import main
from polymodal.distributed.env import World, run_torchrun, torchrun_command
from polymodal.distributed.metrics import ThroughputMeter, forward_flops, memory_report, peak_tflops
from polymodal.errors import UsageError

CPU = torch.device("cpu")


def test_torchrun_command_runs_the_polymodal_module_per_process():
    command = torchrun_command(4, ["train", "configs/lm/tiny.yaml", "train.steps=5"])
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=4" in command and "--standalone" in command
    assert command[-5:] == ["-m", "polymodal", "train", "configs/lm/tiny.yaml", "train.steps=5"]


def test_nproc_is_checked_and_refused_inside_torchrun(monkeypatch, capsys):
    assert main(["train", "--nproc", "0", "configs/lm/tiny.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "polymodal train: error: --nproc must be in [1, 1024], got 0"
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "x"),
                        ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match="inside a torchrun launch"):
        run_torchrun(2, ["train", "x.yaml"])


def test_forward_flops_counts_matmuls():
    layer = torch.nn.Linear(8, 4, bias=False)
    out, flops = forward_flops(lambda: layer(torch.zeros(5, 8)))
    assert out.shape == (5, 4) and flops == 2 * 5 * 8 * 4


def test_peak_tflops_is_configured_or_looked_up():
    assert peak_tflops(123.0, CPU) == 123.0
    assert peak_tflops(0.0, CPU) is None  # no MFU for a CPU


def test_meter_measures_flops_per_token_on_the_first_batch():
    meter = ThroughputMeter(World(0, 0, 1, CPU), 1.0, tokens_in_batch=lambda batch: batch.shape[0])
    layer = torch.nn.Linear(8, 4, bias=False)
    objective = meter.counting(lambda model, batch: model(batch).sum())
    objective(layer, torch.zeros(5, 8))
    assert meter.flops_per_unit == 3 * 2 * 8 * 4  # forward + backward (2x) per row
    objective(layer, torch.zeros(7, 8))
    assert meter.flops_per_unit == 3 * 2 * 8 * 4  # measured once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak CUDA memory needs a CUDA device (CI has none)")
def test_memory_report_gives_each_ranks_peak_on_cuda(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        device = torch.device("cuda", 0)
        torch.cuda.reset_peak_memory_stats(device)
        block = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=device)  # 256 MiB
        peaks = memory_report(World(0, 0, 1, device))
        assert len(peaks) == 1 and peaks[0] >= 0.25
        del block
    finally:
        dist.destroy_process_group()


def test_a_bad_config_fails_once_before_any_process_starts(capsys):
    assert main(["train", "--nproc", "2", "configs/lm/tiny.yaml", "train.parallel.strategy=zero"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("polymodal train: error: ") and "train.parallel.strategy" in err and "\n" not in err


def test_bench_distributed_takes_the_median_step_after_warmup():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_distributed

    lines = [{"elapsed": t} for t in (5.0, 5.5, 5.6, 5.8, 5.9, 6.3)]  # steps of 0.1, 0.2, 0.1, 0.4 after warm-up
    assert bench_distributed.step_seconds(lines, warmup=1) == pytest.approx(0.15)
