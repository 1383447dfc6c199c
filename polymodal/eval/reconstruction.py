"""Reconstruction quality of an autoencoder on the shapes world: PSNR and SSIM, and a grid of
originals above their reconstructions."""
from __future__ import annotations

from pathlib import Path

import torch

from polymodal.errors import UsageError

BATCH = 16


def world_pixels(split: str, n: int, size: int, num_objects: tuple[int, int] = (1, 3),
                 background: str = "plain") -> torch.Tensor:
    """The first n scenes of a world split as pixels (n, 3, size, size) in [-1, 1]."""
    from polymodal.data.dual_encoder import scene_pixels
    from polymodal.data.world import World

    world = World(split, image_size=size, num_objects=num_objects, background=background)
    return scene_pixels(world.scenes(n))


@torch.no_grad()
def reconstruct(model, pixels: torch.Tensor) -> torch.Tensor:
    """decode(encode(pixels)) with the posterior mean, in batches; (N, 3, H, W) in [-1, 1]."""
    device = next(model.parameters()).device
    out = [model.decode(model.encode(pixels[i:i + BATCH].to(device))).clamp(-1, 1).float().cpu()
           for i in range(0, len(pixels), BATCH)]
    return torch.cat(out)


def evaluate_reconstruction(model, split: str = "val", n: int = 100, size: int | None = None,
                            num_objects: tuple[int, int] = (1, 3), background: str = "plain") -> dict[str, float]:
    """{"psnr": mean dB, "ssim": mean} of n world scenes of `split` rendered at `size` (default:
    the autoencoder's sample_size) against their reconstructions."""
    from polymodal.generators.vae_losses import psnr, ssim

    pixels = world_pixels(split, n, size or model.config.sample_size, num_objects, background)
    rebuilt = reconstruct(model, pixels)
    return {"psnr": float(psnr(rebuilt, pixels).mean()), "ssim": float(ssim(rebuilt, pixels).mean())}


def save_reconstruction_grid(model, path: str | Path, split: str = "val", n: int = 8, size: int | None = None) -> Path:
    """n originals (top row) above their reconstructions (bottom row), one PNG at `path`."""
    from polymodal.eval.grids import labelled_grid
    from polymodal.infer.images import to_pil

    pixels = world_pixels(split, n, size or model.config.sample_size)
    images = to_pil(torch.cat([pixels, reconstruct(model, pixels)]))
    labels = [["original"]] * n + [["reconstruction"]] * n
    return labelled_grid(images, labels, path, columns=n, tile=96)


def evaluate(model, tokenizer, data: str = "world", split: str = "val", n: int = 100,
             progress: bool = True) -> dict[str, float]:
    """The `vae` family's `polymodal eval` suite: reconstruction PSNR / SSIM on world scenes."""
    if data != "world":
        raise UsageError(f"--data: the vae family is evaluated on 'world' only, got {data!r}")
    return evaluate_reconstruction(model, split=split, n=n)
