"""Benchmark: polymodal DiT vs diffusers DiTTransformer2DModel, same config, weights and batch.

diffusers' model is built first (random weights, zero-initialised layers included, with one
timestep/class embedder copied into every block as DiT checkpoints hold it), saved as a diffusers
folder, and ours is loaded from that folder with `polymodal.load`; the two outputs are checked to
agree before timing. Training steps (forward, MSE loss against a fixed target, backward, one
fused AdamW step, the optimizer `polymodal train` builds, on both sides) and inference forwards
run interleaved; the medians are reported as images/s with the ratio polymodal / diffusers.
float32 on CPU. Our DiT runs its norms, modulation, gated residuals, tanh-GELU (with fc1's bias)
and attention through `polymodal.kernels` (fused C++ on CPU); a copy of it also runs in plain
PyTorch (`plain_pytorch()`), so the table shows what the kernels add. `--compile` compiles every
block of both models (`torch.compile`, inductor) first, and drops the plain copy.

The training section also times the step's floor: the same matrix products (every linear layer
at the shapes the forward gives it, forward and backward) and the same attention calls through
SDPA (forward and backward) with nothing else. diffusers' step time over the floor is what any
implementation using PyTorch's matmul and SDPA could gain over diffusers here; our attention
kernel runs below SDPA, so our step can come in under it.

Sampling (`--sampling`): class-conditional images from the same DiT and a small KL autoencoder,
DDIM with classifier-free guidance for `--steps` steps, then decoding: diffusers' `DiTPipeline`
against `polymodal.infer.images.generate_tensors` on a `latent_diffusion` model holding the same
two networks (loaded from the same folders), images/s and the ratio.

    python benchmarks/bench_dit.py --threads 2 [--iters 6] [--compile] [--json out.json]
    python benchmarks/bench_dit.py --threads 2 --recipe configs/diffusion/world_class.yaml --batch 32
    python benchmarks/bench_dit.py --sampling --threads 2 [--steps 50] [--batch 8]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, save_json, time_interleaved  # noqa: E402

from polymodal.api import load  # noqa: E402
from polymodal.generators.dit import DiT  # noqa: E402
from polymodal.kernels.loader import plain_pytorch  # noqa: E402


def diffusers_kwargs(quick: bool = False, width: int = 256, depth: int = 8) -> dict:
    """A DiT/2 with learned sigma on 32x32x4 latents, 64-wide heads, 1000 classes (DiTPipeline assumes
    the ImageNet label count: its null class is 1000); tiny with `quick`."""
    if quick:
        return dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
                    patch_size=2, num_embeds_ada_norm=1000)
    return dict(num_attention_heads=width // 64, attention_head_dim=64, in_channels=4, out_channels=8,
                num_layers=depth, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)


def recipe_kwargs(path: str) -> dict:
    """diffusers DiT arguments for the class-conditional DiT of a diffusion recipe (model.dit in its YAML).

    diffusers' DiT conditions on class labels only and fixes the MLP at 4x the width, so the
    recipe must be class-conditional with intermediate_size = 4 * hidden_size.
    """
    import yaml

    from polymodal.generators.dit import DiTConfig

    config = DiTConfig(**yaml.safe_load(Path(path).read_text())["model"]["dit"])
    if not config.num_classes or config.pooled_dim or config.cross_attention_dim:
        raise SystemExit(f"{path}: diffusers' DiT is class-conditional only; pick a class-conditional recipe")
    if config.intermediate_size != 4 * config.hidden_size:
        raise SystemExit(f"{path}: diffusers' DiT has intermediate_size = 4 * hidden_size")
    return dict(num_attention_heads=config.num_heads, attention_head_dim=config.hidden_size // config.num_heads,
                in_channels=config.in_channels, out_channels=config.out_channels, num_layers=config.num_layers,
                sample_size=config.sample_size, patch_size=config.patch_size, num_embeds_ada_norm=config.num_classes)


def build_pair(kwargs: dict, seed: int = 0) -> tuple[DiT, torch.nn.Module]:
    """(our DiT, diffusers DiTTransformer2DModel) holding the same random weights.

    Every parameter is randomised (the zero-initialised modulation and output layers too, so the
    comparison exercises them) and block 0's embedder is copied into the others.
    """
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    theirs = DiTTransformer2DModel(**kwargs)
    with torch.no_grad():
        for param in theirs.parameters():
            param.normal_(0.0, 0.02)
        first = theirs.transformer_blocks[0].norm1.emb.state_dict()
        for block in theirs.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first)
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        ours = load(folder).model.denoiser
    return ours, theirs


def bench_sampling(kwargs: dict, batch: int, steps: int, guidance: float, warmup: int, iters: int) -> dict:
    """Images/s of diffusers' DiTPipeline and of polymodal's generation on the same DiT + VAE."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    from polymodal.models.diffusion import LatentDiffusionConfig, LatentDiffusionModel

    _, dit = build_pair(kwargs)
    torch.manual_seed(1)
    vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=kwargs["in_channels"],
                        norm_num_groups=16, sample_size=kwargs["sample_size"] * 2,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    with tempfile.TemporaryDirectory() as folder:
        dit.save_pretrained(Path(folder) / "dit")
        vae.save_pretrained(Path(folder) / "vae")
        denoiser, autoencoder = load(Path(folder) / "dit").model, load(Path(folder) / "vae").model
    ours = LatentDiffusionModel(LatentDiffusionConfig(**{**vars(denoiser.config), "vae": autoencoder.config,
                                                         "sampler": "ddim"}))
    ours.denoiser.load_state_dict(denoiser.denoiser.state_dict())
    ours.vae.load_state_dict(autoencoder.state_dict())
    ours.eval()
    # The same process on both sides: DiT's linear betas, trailing timesteps, DDIM with eta 0.
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, timestep_spacing="trailing")
    pipe = DiTPipeline(transformer=dit.eval(), vae=vae.eval(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    labels = [i % kwargs["num_embeds_ada_norm"] for i in range(batch)]

    def run_theirs():
        return pipe(class_labels=labels, guidance_scale=guidance, num_inference_steps=steps, output_type="np").images

    def run_ours():
        from polymodal.infer.images import generate_tensors

        return generate_tensors(ours, labels, steps=steps, guidance=guidance, batch_size=batch)

    with torch.no_grad():
        times = time_interleaved({"polymodal": run_ours, "diffusers": run_theirs}, warmup, iters)
    result = {"batch": batch, "steps": steps, "guidance": guidance, "config": kwargs}
    for name, t in times.items():
        result[name] = {"images_per_s": batch / t.median, "images_per_s_best": batch / t.best,
                        "images_per_cpu_s": batch / t.cpu_median}
    result["ratio"] = {"median": times["diffusers"].median / times["polymodal"].median,
                       "best": times["diffusers"].best / times["polymodal"].best,
                       "cpu": times["diffusers"].cpu_median / times["polymodal"].cpu_median}
    return result


def make_batch(model: DiT, batch: int, seed: int = 0) -> dict:
    """Random latents, timesteps in [0, 1000), class labels and a regression target."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g),
            "timesteps": torch.randint(0, 1000, (batch,), generator=g),
            "class_labels": torch.randint(0, c.num_classes, (batch,), generator=g),
            "target": torch.randn(batch, c.out_channels, c.sample_size, c.sample_size, generator=g)}


def linear_calls(model: DiT, inputs: tuple) -> list[tuple[torch.nn.Linear, torch.Size]]:
    """(layer, input shape) of every nn.Linear call one forward of `model(*inputs)` makes.

    The recording hooks make every layer run its own forward: the fused paths (one q/k/v matmul,
    fc1's bias inside the GELU) step aside for hooked layers, so none is missed.
    """
    calls: list[tuple[torch.nn.Linear, torch.Size]] = []
    hooks = [m.register_forward_hook(lambda mod, args, out: calls.append((mod, args[0].shape)))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def floor_step(model: DiT, inputs: tuple) -> Callable[[], None]:
    """A step of only `model`'s matrix products and attention: every nn.Linear's forward at the
    input shape one forward of `model(*inputs)` gives it (`linear_calls`), each block's
    self-attention through SDPA at (B, heads, N, head_dim), then one backward through all of them
    (input and weight gradients, as training needs)."""
    shapes = linear_calls(model, inputs)
    c, batch = model.config, inputs[0].shape[0]
    tokens = (c.sample_size // c.patch_size) ** 2
    head_dim = c.hidden_size // c.num_heads
    xs = [torch.randn(shape, requires_grad=True) for _, shape in shapes]
    qkvs = [[torch.randn(batch, c.num_heads, tokens, head_dim, requires_grad=True) for _ in range(3)]
            for _ in model.blocks]

    def step():
        outs = [F.linear(x, mod.weight, mod.bias) for (mod, _), x in zip(shapes, xs)]
        outs += [F.scaled_dot_product_attention(q, k, v) for q, k, v in qkvs]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return step


def bench(kwargs: dict, batch: int, warmup: int, iters: int, compile_blocks: bool = False) -> dict:
    """Training and inference images/s of both models and of our plain-PyTorch copy (or, with
    `compile_blocks`, of both models with every block compiled), and the training step's matmul +
    attention floor; outputs are checked to agree first."""
    ours, theirs = build_pair(kwargs)
    plain = None if compile_blocks else copy.deepcopy(ours)
    data = make_batch(ours, batch)
    inputs = (data["latents"], data["timesteps"], data["class_labels"])
    floor = floor_step(ours, inputs)  # before compiling: a compiled block hides its layers from hooks
    if compile_blocks:
        for block in [*ours.blocks, *theirs.transformer_blocks]:
            block.compile()

    def run_ours():
        return ours(*inputs)

    def run_plain():
        with plain_pytorch():
            return plain(*inputs)

    def run_theirs():
        return theirs(*inputs).sample

    forwards = {"polymodal": run_ours, "diffusers": run_theirs}
    models = {"polymodal": ours, "diffusers": theirs}
    if plain is not None:
        forwards["polymodal_plain"], models["polymodal_plain"] = run_plain, plain

    def set_mode(train: bool) -> None:
        for model in models.values():
            model.train(train)

    set_mode(False)
    with torch.no_grad():
        diff = max((forward() - run_theirs()).abs().max().item() for forward in forwards.values())
    if not diff < 1e-3:
        raise RuntimeError(f"polymodal and diffusers DiT outputs differ by {diff:.3g}: the weight copy is wrong")

    def stepper(model, forward):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step():
            optimizer.zero_grad(set_to_none=True)
            F.mse_loss(forward(), data["target"]).backward()
            optimizer.step()
        return step

    # Train mode throughout the timed steps; diffusers' label embedder then drops 10% of the labels
    # (its built-in classifier-free-guidance dropout), which changes no amount of work.
    set_mode(True)
    train = time_interleaved({**{name: stepper(models[name], forward) for name, forward in forwards.items()},
                              "floor": floor}, warmup, iters)
    set_mode(False)
    with torch.no_grad():
        infer = time_interleaved(forwards, warmup, iters)
    result = {"batch": batch, "max_abs_diff": diff, "params": sum(p.numel() for p in ours.parameters()),
              "config": kwargs, "compile": compile_blocks,
              "floor": {"step_s": train["floor"].median,
                        "diffusers_over_floor": train["diffusers"].median / train["floor"].median}}
    for section, times in (("train", train), ("inference", infer)):
        result[section] = {name: {"step_s": t.median, "step_s_best": t.best, "cpu_s": t.cpu_median,
                                  "images_per_s": batch / t.median, "images_per_s_best": batch / t.best,
                                  "images_per_cpu_s": batch / t.cpu_median}
                           for name, t in times.items() if name != "floor"}
        for name in forwards:
            if name != "diffusers":
                key = "ratio" if name == "polymodal" else "ratio_plain"
                result[section][key] = {"median": times["diffusers"].median / times[name].median,
                                        "best": times["diffusers"].best / times[name].best,
                                        "cpu": times["diffusers"].cpu_median / times[name].cpu_median}
    return result


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, run both comparisons, print a table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few iterations (smoke run)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 16; 4 with --quick)")
    parser.add_argument("--width", type=int, default=256, help="hidden size, a multiple of 64 (default 256)")
    parser.add_argument("--depth", type=int, default=8, help="transformer blocks (default 8)")
    parser.add_argument("--recipe", default=None,
                        help="take the DiT of this class-conditional recipe (e.g. configs/diffusion/world_class.yaml) "
                             "instead of --width/--depth")
    parser.add_argument("--iters", type=int, default=None, help="timed rounds (default 8; 2 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; 1 is steadier on a busy host")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--sampling", action="store_true", help="compare sampling with diffusers' DiTPipeline")
    parser.add_argument("--compile", action="store_true", help="torch.compile every block of both models first")
    parser.add_argument("--steps", type=int, default=50, help="--sampling: DDIM steps (default 50)")
    parser.add_argument("--guidance", type=float, default=4.0, help="--sampling: guidance scale (default 4)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    batch = args.batch or (4 if args.quick else 16)
    kwargs = recipe_kwargs(args.recipe) if args.recipe else diffusers_kwargs(args.quick, args.width, args.depth)
    iters = args.iters or (2 if args.quick else 8)
    if args.sampling:
        steps = 2 if args.quick else args.steps
        result = bench_sampling(kwargs, args.batch or (2 if args.quick else 8),
                                steps, args.guidance, warmup=1, iters=iters)
        result["machine"] = machine_info("cpu")
        result["command"] = " ".join(["python"] + sys.argv)
        print(f"sampling {result['batch']} images, {steps} DDIM steps, guidance {args.guidance}: images/s (median, "
              f"best, per CPU-s)")
        for name in ("polymodal", "diffusers"):
            r = result[name]
            print(f"  {name:10} {r['images_per_s']:8.3f} {r['images_per_s_best']:8.3f} {r['images_per_cpu_s']:8.3f}")
        ratio = result["ratio"]
        print(f"  ratio      {ratio['median']:8.2f} {ratio['best']:8.2f} {ratio['cpu']:8.2f}")
        save_json(result, args.json)
        return result
    result = bench(kwargs, batch, warmup=1 if args.quick else 2, iters=iters,
                   compile_blocks=args.compile)
    result["machine"] = machine_info("cpu")
    result["machine"]["load_average_1m_end"] = os.getloadavg()[0]
    result["command"] = " ".join(["python"] + sys.argv)
    print(f"polymodal DiT vs diffusers DiTTransformer2DModel ({result['params'] / 1e6:.2f}M params, batch {batch}, "
          f"cpu float32, {result['machine']['threads']} threads, load {result['machine']['load_average_1m']:.1f}, "
          f"max |diff| {result['max_abs_diff']:.2g})")
    # CPU seconds of this process are the steadier measure on a shared host (others' load adds wall time).
    print(f"{'':26}{'images/s (median)':>16}{'images/s (best)':>18}{'images/CPU-s':>15}")
    for section in ("train", "inference"):
        for name in ("polymodal", "polymodal_plain", "diffusers"):
            if name in result[section]:
                r = result[section][name]
                print(f"{section + ' ' + name:26}{r['images_per_s']:>16.2f}{r['images_per_s_best']:>18.2f}"
                      f"{r['images_per_cpu_s']:>15.2f}")
        for key in ("ratio", "ratio_plain"):
            if key in result[section]:
                ratio = result[section][key]
                print(f"{section + ' ' + key:26}{ratio['median']:>16.2f}{ratio['best']:>18.2f}{ratio['cpu']:>15.2f}")
    floor = result["floor"]
    print(f"train floor (the same matmuls + SDPA attention alone): {floor['step_s']:.3f} s/step, "
          f"{batch / floor['step_s']:.2f} images/s; diffusers / floor {floor['diffusers_over_floor']:.2f} "
          "(what PyTorch's matmul + SDPA leave to gain)")
    save_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
