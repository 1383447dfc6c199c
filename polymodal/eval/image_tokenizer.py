"""How well an image tokenizer (`ImageVQ`) keeps shapes-world images: PSNR and SSIM of
decode(encode(x)), the fraction of the codebook the images use, and the codes per image.

The pixels and the metrics are the KL autoencoder's (`polymodal.eval.reconstruction`,
`polymodal.generators.vae_losses`); usage is counted on the codes of the evaluated images
themselves, not on the quantizer's training counters.
"""
from __future__ import annotations

import torch

from polymodal.errors import UsageError
from polymodal.eval.reconstruction import BATCH, world_pixels

# The scenes the world tokenizer recipe trains on (configs/image_vq/world.yaml).
NUM_OBJECTS = (1, 2)


@torch.no_grad()
def tokenize_and_rebuild(model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """codes (N, h, w) of pixels (N, C, H, W), and decode(codes) clamped to [-1, 1] (None for a
    tokenizer without a decoder), in batches on the model's device."""
    device = next(model.parameters()).device
    codes, rebuilt = [], []
    for i in range(0, len(pixels), BATCH):
        batch_codes = model.encode(pixels[i:i + BATCH].to(device))  # (b, h, w)
        codes.append(batch_codes.cpu())
        if model.decoder is not None:
            rebuilt.append(model.decode(batch_codes).clamp(-1, 1).float().cpu())
    return torch.cat(codes), (torch.cat(rebuilt) if rebuilt else None)


def evaluate_tokenizer(model, split: str = "val", n: int = 100, size: int | None = None,
                       num_objects: tuple[int, int] = NUM_OBJECTS, background: str = "plain") -> dict[str, float]:
    """{"psnr" (mean dB), "ssim" (mean), "codebook_usage" (distinct codes / codebook size),
    "codes_per_image"} on the first n scenes of a world split at `size` (default: the tokenizer's
    image_size). A tokenizer without a decoder gets the last two only."""
    from polymodal.generators.vae_losses import psnr, ssim

    if n < 1:
        raise UsageError(f"n must be >= 1, got {n}")
    was_training = model.training
    model.eval()
    try:
        pixels = world_pixels(split, n, size or model.config.image_size, num_objects, background)
        codes, rebuilt = tokenize_and_rebuild(model, pixels)
    finally:
        model.train(was_training)
    metrics = {"codebook_usage": codes.unique().numel() / model.codebook_size,
               "codes_per_image": int(codes[0].numel())}
    if rebuilt is not None:
        metrics = {"psnr": float(psnr(rebuilt, pixels).mean()), "ssim": float(ssim(rebuilt, pixels).mean()),
                   **metrics}
    return metrics


def evaluate(model, tokenizer, data: str = "world", split: str = "val", n: int = 100,
             progress: bool = True) -> dict[str, float]:
    """The `image_vq` family's `polymodal eval` suite: `evaluate_tokenizer` on world scenes of
    1-2 objects on a plain background, at the tokenizer's image_size."""
    if data != "world":
        raise UsageError(f"--data: the image_vq family is evaluated on 'world' only, got {data!r}")
    return evaluate_tokenizer(model, split=split, n=n)


__all__ = ["NUM_OBJECTS", "evaluate", "evaluate_tokenizer", "tokenize_and_rebuild"]
