"""Benchmark: polymodal's fused CPU attention against PyTorch's SDPA (its CPU flash kernel).

Unmasked self-attention at the shapes our models train and run: q, k, v are (B, H, T, D) views
of one fused (B, T, 3 * H * D) projection, as `Attention` passes them, and the output is read
back as (B, T, H * D). Training times the forward and backward; inference the forward under
no_grad. Outputs and gradients are checked to agree before timing. The shapes sweep the token
count across `polymodal.kernels.ops.MAX_ATTENTION_TOKENS`, the line past which `attend` leaves
calls to SDPA; the benchmark lifts that line so the kernel runs on both sides of it.

    python benchmarks/bench_attention.py --threads 2 [--iters 10] [--json out.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, save_json, time_interleaved  # noqa: E402

from polymodal.kernels import attention, fused_attention_applies, ops  # noqa: E402

# (batch, heads, tokens, head_dim): the DiT of bench_dit.py at 64 and 256 tokens, a ViT-B/32
# (50 tokens), a DiT at 256 tokens with 6 heads, then past the line.
SHAPES = [(32, 4, 64, 64), (32, 3, 256, 64), (64, 12, 50, 64), (8, 6, 256, 64), (8, 6, 512, 64), (4, 6, 1024, 64)]
QUICK_SHAPES = [(2, 2, 64, 8), (1, 4, 70, 16)]


def runner(fn, batch: int, heads: int, tokens: int, head_dim: int, train: bool):
    """A zero-argument callable doing one attention call (and its backward when `train`) through `fn`."""
    qkv = torch.randn(batch, tokens, 3 * heads * head_dim, requires_grad=train)

    def run():
        q, k, v = (part.view(batch, tokens, heads, head_dim).transpose(1, 2)
                   for part in qkv.split(heads * head_dim, dim=-1))
        out = fn(q, k, v).transpose(1, 2).reshape(batch, tokens, heads * head_dim)
        if train:
            out.backward(torch.ones_like(out))
        return out
    return qkv, run


def check_agreement(shape: tuple[int, int, int, int]) -> float:
    """Largest difference between SDPA's and the fused kernel's outputs and q/k/v gradients."""
    results = []
    for fn in (F.scaled_dot_product_attention, attention):
        torch.manual_seed(0)
        qkv, run = runner(fn, *shape, train=True)
        results.append((run().detach(), qkv.grad))
    return max((a - b).abs().max().item() for a, b in zip(*results))


def bench(shapes, warmup: int, iters: int) -> list[dict]:
    """Median milliseconds of SDPA and of the fused kernel per shape, training and inference."""
    line = ops.MAX_ATTENTION_TOKENS
    ops.MAX_ATTENTION_TOKENS = max(shape[2] for shape in shapes)  # time the kernel past the line too
    try:
        return [bench_shape(shape, warmup, iters) for shape in shapes]
    finally:
        ops.MAX_ATTENTION_TOKENS = line


def bench_shape(shape: tuple[int, int, int, int], warmup: int, iters: int) -> dict:
    """One shape's row: agreement, then SDPA and fused medians (ms) and their ratio, per section."""
    probe = torch.empty(shape)
    if not fused_attention_applies(probe, probe, probe):
        raise SystemExit("the fused kernels are not available here (POLYMODAL_FUSED_CPU=0, no AVX2 or no compiler)")
    diff = check_agreement(shape)
    if not diff < 1e-3:
        raise RuntimeError(f"fused attention and SDPA differ by {diff:.3g} at {shape}")
    row = {"shape": shape, "max_abs_diff": diff}
    for section, train in (("train", True), ("inference", False)):
        fns = {"sdpa": runner(F.scaled_dot_product_attention, *shape, train)[1],
               "fused": runner(attention, *shape, train)[1]}
        with torch.set_grad_enabled(train):
            times = time_interleaved(fns, warmup, iters)
        row[section] = {name: t.median * 1e3 for name, t in times.items()}
        row[section]["ratio"] = times["sdpa"].median / times["fused"].median
    return row


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, time every shape, print a table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few iterations (smoke run)")
    parser.add_argument("--iters", type=int, default=None, help="timed rounds (default 10; 2 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = bench(QUICK_SHAPES if args.quick else SHAPES, warmup=1 if args.quick else 2,
                 iters=args.iters or (2 if args.quick else 10))
    result = {"rows": rows, "machine": machine_info("cpu"), "command": " ".join(["python"] + sys.argv)}
    print(f"fused CPU attention vs SDPA, float32, {result['machine']['threads']} threads: median ms "
          "(training = forward + backward)")
    print(f"{'B, H, T, D':>18}{'train sdpa':>12}{'fused':>9}{'ratio':>7}{'infer sdpa':>12}{'fused':>9}{'ratio':>7}")
    for row in rows:
        train, infer = row["train"], row["inference"]
        print(f"{str(tuple(row['shape'])):>18}{train['sdpa']:>12.2f}{train['fused']:>9.2f}{train['ratio']:>7.2f}"
              f"{infer['sdpa']:>12.2f}{infer['fused']:>9.2f}{infer['ratio']:>7.2f}")
    save_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
