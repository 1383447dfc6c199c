"""The diffusion objective: the process's denoising loss on a batch of images (or cached latents)."""
from __future__ import annotations

import torch

from polymodal.generators.diffusion import diffusion_loss


def diffusion_objective(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean-squared denoising error of a `DiffusionModel` (scalar).

    batch: "pixels" (B, 3, H, W) in [-1, 1], or "latents" (B, C, h, w) already in the diffusion
    space (pre-computed through the frozen VAE); the condition as "class_labels" (B,) or
    "input_ids" / "attention_mask" (B, T). Classifier-free guidance training drops conditions in
    the data (null class, empty caption), so a batch is the whole story and resumes exactly.
    Timesteps and noise come from torch's global RNG, which the training loop checkpoints.
    """
    x0 = batch["latents"] if "latents" in batch else model.from_pixels(batch["pixels"])
    cond = {}
    if "class_labels" in batch:
        cond["class_labels"] = batch["class_labels"]
    if "input_ids" in batch:
        cond.update(model.encode_text(batch["input_ids"], batch.get("attention_mask")))
    return diffusion_loss(model.predict, x0, model.process, cond)
