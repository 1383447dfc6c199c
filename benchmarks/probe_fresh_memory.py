"""Probe: the fused tanh-GELU kernel against PyTorch's, and what fresh memory costs it.

On a (32, 256, 768) float32 tensor (the MLP activation of `bench_dit.py`'s main config):
1. forward + backward, polymodal's fused kernel (`polymodal.kernels.gelu_tanh`) against
   F.gelu(approximate="tanh") in plain PyTorch, on reused memory;
2. the fused forward two ways: with its output freed after each call, so malloc hands the same
   pages back, and with every output kept, so each call writes pages the process has never
   touched. The difference is the page-fault cost a training step pays for each fresh
   activation; the minor faults per call are counted.

    python benchmarks/probe_fresh_memory.py --threads 2 [--calls 20]
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, save_json  # noqa: E402

from polymodal.kernels import gelu_tanh  # noqa: E402
from polymodal.kernels.loader import plain_pytorch  # noqa: E402


def minor_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed_calls(fn, calls: int, keep: bool) -> tuple[float, float]:
    """(median ms per call, minor faults per call); `keep` holds every output alive."""
    kept, times = [], []
    faults = minor_faults()
    for _ in range(calls):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
        if keep:
            kept.append(out)
        del out
    return statistics.median(times) * 1e3, (minor_faults() - faults) / calls


def forward_backward(x: torch.Tensor, grad: torch.Tensor, plain: bool):
    """One tanh-GELU forward + backward on a leaf copy of x, fused or in plain PyTorch."""
    def run():
        leaf = x.detach().requires_grad_()
        if plain:
            F.gelu(leaf, approximate="tanh").backward(grad)
        else:
            gelu_tanh(leaf).backward(grad)
        return leaf.grad
    return run


def main(argv: list[str] | None = None) -> dict:
    """Time the kernel on reused and on fresh memory, print both, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per way (default 20)")
    parser.add_argument("--shape", type=int, nargs="+", default=[32, 256, 768], help="tensor shape")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    x, grad = torch.randn(args.shape), torch.randn(args.shape)
    gelu_tanh(x)  # build or load the kernels first
    with plain_pytorch():
        plain = timed_calls(forward_backward(x, grad, plain=True), args.calls, keep=False)
    fused_both = timed_calls(forward_backward(x, grad, plain=False), args.calls, keep=False)
    with torch.no_grad():
        reused = timed_calls(lambda: gelu_tanh(x), args.calls, keep=False)
        fresh = timed_calls(lambda: gelu_tanh(x), args.calls, keep=True)
    megabytes = x.numel() * 4 / 2**20
    result = {"shape": args.shape, "megabytes": megabytes,
              "forward_backward_plain_ms": plain[0], "forward_backward_fused_ms": fused_both[0],
              "gelu_reused_ms": reused[0], "gelu_fresh_ms": fresh[0], "fresh_faults_per_call": fresh[1],
              "us_per_fault": (fresh[0] - reused[0]) * 1e3 / max(fresh[1], 1),
              "machine": machine_info("cpu"), "command": " ".join(["python"] + sys.argv)}
    print(f"tanh-GELU on {tuple(args.shape)} ({megabytes:.0f} MB), {torch.get_num_threads()} threads:")
    print(f"  forward + backward, PyTorch {plain[0]:7.2f} ms, fused {fused_both[0]:7.2f} ms "
          f"({plain[0] / fused_both[0]:.1f}x)")
    print("fused forward:")
    print(f"  output memory reused     {reused[0]:7.2f} ms/call")
    print(f"  output memory fresh      {fresh[0]:7.2f} ms/call, {fresh[1]:.0f} page faults/call "
          f"(about {result['us_per_fault']:.1f} us each)")
    save_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
