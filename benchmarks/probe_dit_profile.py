"""Probe: where a DiT training step spends its time, polymodal beside diffusers, by kernel family.

The same pair `bench_dit.py` times (diffusers' `DiTTransformer2DModel` and ours loaded from its
folder, same weights and batch) runs a few training steps under `torch.profiler`; self CPU time
is summed per kernel family — matrix multiplies, fused attention, GELU (forward and backward),
our fused MLP (its matrix multiplies and GELU in one), and everything else (norms, modulation,
residuals, copies, the optimizer) — and printed per step.
The profiler distorts the ratio both ways: it adds a cost to every op, and diffusers runs more
ops per step; and it slows our fused kernels (their OpenMP loops) far more than PyTorch's ops,
so our step takes about 1.5 s under it against about 1.2 s without. Time with `bench_dit.py`;
read here where each side's time goes.

    python benchmarks/probe_dit_profile.py --threads 2 [--width 192 --depth 6 --batch 32] [--steps 3]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dit import build_pair, diffusers_kwargs, make_batch  # noqa: E402
from common import machine_info, save_json  # noqa: E402

FAMILIES = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::convolution", "aten::mkldnn_convolution"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
                  "_Attention", "_AttentionBackward"),  # SDPA / polymodal.kernels
    "gelu": ("aten::gelu", "aten::gelu_backward", "_GeluTanh", "_GeluTanhBackward"),  # plain / polymodal.kernels
    # polymodal.kernels' whole MLP (its GEMMs and GELU together; the matmul column then holds the rest)
    "fused_mlp": ("_GeluMLP", "_GeluMLPBackward"),
}


def family_of(op: str) -> str:
    """The kernel family of a profiler op name ("other" when none claims it)."""
    return next((name for name, ops in FAMILIES.items() if op in ops), "other")


def profile_steps(step, steps: int) -> dict[str, float]:
    """Self CPU milliseconds per training step, by family (plus "total"), over `steps` profiled steps."""
    with profile() as prof:
        for _ in range(steps):
            step()
    totals = {name: 0.0 for name in (*FAMILIES, "other")}
    for event in prof.key_averages():
        totals[family_of(event.key)] += event.self_cpu_time_total / 1000.0
    totals = {name: ms / steps for name, ms in totals.items()}
    totals["total"] = sum(totals.values())
    return totals


def main(argv: list[str] | None = None) -> dict:
    """Profile both models' training steps, print the table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=256, help="hidden size, a multiple of 64 (default 256)")
    parser.add_argument("--depth", type=int, default=8, help="transformer blocks (default 8)")
    parser.add_argument("--batch", type=int, default=16, help="images per step (default 16)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per side (default 3)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    ours, theirs = build_pair(diffusers_kwargs(args.quick, args.width, args.depth))
    data = make_batch(ours, 2 if args.quick else args.batch)
    inputs = (data["latents"], data["timesteps"], data["class_labels"])
    forwards = {"polymodal": lambda: ours(*inputs), "diffusers": lambda: theirs(*inputs).sample}
    result = {}
    for (name, forward), model in zip(forwards.items(), (ours, theirs)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as bench_dit.py
        model.train()

        def step(forward=forward, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            F.mse_loss(forward(), data["target"]).backward()
            optimizer.step()

        step()  # warm-up: allocator, kernel selection
        result[name] = profile_steps(step, 1 if args.quick else args.steps)
    print(f"DiT training step by kernel family, ms per step (self CPU time under the profiler), "
          f"{torch.get_num_threads()} threads")
    print(f"{'':10}" + "".join(f"{name:>12}" for name in (*FAMILIES, "other", "total")))
    for name in forwards:
        print(f"{name:10}" + "".join(f"{result[name][key]:>12.1f}" for key in (*FAMILIES, "other", "total")))
    result["ratio_profiled"] = result["diffusers"]["total"] / result["polymodal"]["total"]
    print(f"ratio under the profiler {result['ratio_profiled']:.2f}x (distorted: see the module docstring)")
    result["machine"] = machine_info("cpu")
    result["command"] = " ".join(["python"] + sys.argv)
    save_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
