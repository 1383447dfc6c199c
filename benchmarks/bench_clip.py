"""Benchmark: polymodal ContrastiveModel vs transformers CLIPModel, same config, batch and weights.

Both models are built from one CLIP layout (ViT image tower, causal text tower pooled at eos,
bias-free projections, learnable temperature); transformers' model is built from ours by the
library's HF export (`polymodal.interop.hf_clip`: config dict + renamed weights) and the two
contrastive losses are checked to agree before timing. Training steps (forward, InfoNCE loss,
backward, AdamW) run interleaved and the median is reported as samples/s, with the
ratio polymodal / transformers. `--device cuda` trains under bf16 autocast and also reports
images/s and MFU (model FLOPs: 6 * matmul params * tokens + attention, see common.py).

    python benchmarks/bench_clip.py --threads 1 [--json out.json]
    python benchmarks/bench_clip.py --device cuda --batch 256
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, mfu, save_json, time_interleaved  # noqa: E402

from polymodal.encoders.text import TextEncoderConfig  # noqa: E402
from polymodal.encoders.vit import ViTConfig  # noqa: E402
from polymodal.interop.hf_clip import contrastive_layout, contrastive_state_to_hf, hf_config_from_contrastive  # noqa: E402
from polymodal.models.contrastive import ContrastiveConfig, ContrastiveModel  # noqa: E402
from polymodal.train.objectives import contrastive_loss  # noqa: E402


def bench_config(quick: bool = False) -> ContrastiveConfig:
    """A small CLIP (64 px ViT-S/8-like image tower, 4-layer text tower); tiny with `quick`."""
    if quick:
        return ContrastiveConfig(
            vision=ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
            text=TextEncoderConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                   max_positions=16, eos_token_id=255),
            embed_dim=64)
    return ContrastiveConfig(
        vision=ViTConfig(image_size=64, patch_size=8, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024),
        text=TextEncoderConfig(vocab_size=1024, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024,
                               max_positions=32, eos_token_id=1023),
        embed_dim=256)


def to_hf_clip(model: ContrastiveModel):
    """A transformers CLIPModel holding a copy of `model`'s weights (CLIP layout only).

    Built by the library's export path (`polymodal.interop.hf_clip`): the config.json dict of
    `hf_config_from_contrastive` and the state dict renamed by `contrastive_state_to_hf`.
    """
    import transformers

    hf_config = hf_config_from_contrastive(model.config, model.logit_scale.item())
    hf = transformers.CLIPModel(transformers.CLIPConfig.from_dict(hf_config))
    state = contrastive_state_to_hf(model.state_dict(), contrastive_layout(model.config))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"weight copy into CLIPModel: missing {missing}, unexpected {unexpected}")
    return hf


def make_batch(config: ContrastiveConfig, batch: int, seed: int = 0) -> dict:
    """Random pixels and eos-terminated texts of random lengths, right-padded (B, T) with a mask."""
    g = torch.Generator().manual_seed(seed)
    v, t = config.vision, config.text
    pixels = torch.randn(batch, v.num_channels, v.image_size, v.image_size, generator=g)
    ids = torch.randint(2, t.vocab_size - 1, (batch, t.max_positions), generator=g)
    lengths = torch.randint(t.max_positions // 2, t.max_positions + 1, (batch,), generator=g)
    mask = (torch.arange(t.max_positions)[None] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 1)
    ids[torch.arange(batch), lengths - 1] = t.eos_token_id
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}


def train_flops_per_sample(model: ContrastiveModel, text_tokens: float) -> float:
    """Model FLOPs of one training sample: 6 * params * tokens per tower plus attention (x3 for backward)."""
    c = model.config
    v, t = c.vision, c.text
    image_tokens = v.grid ** 2 + int(v.class_token)
    vision_params = sum(p.numel() for p in model.vision_model.parameters()) - model.vision_model.position_embedding.numel()
    text_params = sum(p.numel() for p in model.text_model.parameters()) - model.text_model.token_embedding.weight.numel()
    text_params -= model.text_model.position_embedding.numel()
    dense = 6.0 * (vision_params * image_tokens + text_params * text_tokens)
    attention = 12.0 * (v.hidden_size * v.num_layers * image_tokens ** 2 + t.hidden_size * t.num_layers * text_tokens ** 2 / 2)
    return dense + attention


def bench_train(config: ContrastiveConfig, batch: int, device: str, warmup: int, iters: int, seed: int = 0,
                peak_tflops: float | None = None) -> dict:
    """Training samples/s of both models on one batch; the losses are checked to agree first."""
    torch.manual_seed(seed)
    ours = ContrastiveModel(config).to(device)
    hf = to_hf_clip(ours).to(device)
    data = {k: v.to(device) for k, v in make_batch(config, batch, seed).items()}
    with torch.no_grad():
        diff = abs(contrastive_loss(ours, data).item() - hf(**data, return_loss=True).loss.item())
    if not diff < 1e-3:
        raise RuntimeError(f"polymodal and transformers CLIP losses differ by {diff:.3g}: the weight copy is wrong")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda"
                else contextlib.nullcontext())

    def stepper(model, loss_fn):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = loss_fn()
            loss.backward()
            optimizer.step()
        return step

    ours.train(), hf.train()
    steps = {"polymodal": stepper(ours, lambda: contrastive_loss(ours, data)),
             "transformers": stepper(hf, lambda: hf(**data, return_loss=True).loss)}
    times = time_interleaved(steps, warmup, iters, device)
    flops = train_flops_per_sample(ours, data["attention_mask"].sum(1).float().mean().item())
    result = {"batch": batch, "loss_abs_diff": diff, "params": sum(p.numel() for p in ours.parameters())}
    for name, timing in times.items():
        result[name] = {"step_s": timing.median, "step_s_best": timing.best, "cpu_s": timing.cpu_median,
                        "samples_per_s": batch / timing.median, "samples_per_s_best": batch / timing.best,
                        "tflops": flops * batch / timing.median / 1e12}
        if peak_tflops:
            result[name]["images_per_s"] = batch / timing.median
            result[name]["mfu"] = mfu(flops * batch / timing.median, peak_tflops)
    result["ratio"] = {"median": result["polymodal"]["samples_per_s"] / result["transformers"]["samples_per_s"],
                       "best": result["polymodal"]["samples_per_s_best"] / result["transformers"]["samples_per_s_best"]}
    return result


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, run the training comparison, print a table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few iterations (smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: bf16 autocast, images/s, MFU)")
    parser.add_argument("--batch", type=int, default=None, help="pairs per step (default 64; 8 with --quick)")
    parser.add_argument("--iters", type=int, default=None, help="timed rounds (default 12; 2 with --quick)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="accelerator peak TFLOP/s for MFU (default: H100 bf16 dense)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; 1 is steadier on a busy host")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    batch = args.batch or (8 if args.quick else 64)
    iters = args.iters or (2 if args.quick else 12)
    peak = args.peak_tflops if torch.device(args.device).type == "cuda" else None
    config = bench_config(args.quick)
    result = bench_train(config, batch, args.device, warmup=1 if args.quick else 3, iters=iters, peak_tflops=peak)
    result["machine"] = machine_info(args.device)
    result["machine"]["load_average_1m_end"] = os.getloadavg()[0]
    result["command"] = " ".join(["python"] + sys.argv)
    print(f"polymodal ContrastiveModel vs transformers CLIPModel ({result['params'] / 1e6:.2f}M params, batch {batch}, "
          f"{args.device}, {result['machine']['threads']} threads, load {result['machine']['load_average_1m']:.1f})")
    print(f"{'':14}{'samples/s (median)':>20}{'samples/s (best)':>18}{'TFLOP/s':>10}")
    for name in ("polymodal", "transformers"):
        r = result[name]
        extra = f"  MFU {r['mfu']:.1%}" if "mfu" in r else ""
        print(f"{name:14}{r['samples_per_s']:>20.1f}{r['samples_per_s_best']:>18.1f}{r['tflops']:>10.3f}{extra}")
    print(f"{'ratio':14}{result['ratio']['median']:>20.2f}{result['ratio']['best']:>18.2f}")
    save_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
