"""Image generation from a `diffusion` / `latent_diffusion` model: prompts -> PIL images.

The denoiser, process and condition come from the model; this module turns prompts into the
condition (class ids, or text token states), wraps the denoiser in classifier-free guidance, runs
a sampler of `polymodal.generators.diffusion` from seeded noise, and decodes to pixels. The same
seed gives the same images, whatever the batch size.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from polymodal.errors import UsageError
from polymodal.generators.diffusion import ClassifierFreeGuidance, gaussian_noise, sample

DEFAULT_BATCH = 16


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the text encoder's context and was cut."""


def prompt_tokens(tokenizer, prompts: Sequence[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask (N, length) of `prompts`, each ending with the end-of-text token (where
    the text encoder pools) and padded to exactly `length`: training and sampling always show the
    denoiser's cross-attention the same number of text states. Longer prompts are cut, with a
    `PromptTruncatedWarning` naming the longest."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = tokenizer.encode_batch(list(prompts))
    longest = max(range(len(rows)), key=lambda i: len(rows[i]), default=None)
    if longest is not None and len(rows[longest]) + 1 > length:
        warnings.warn(f"prompt {prompts[longest]!r} has {len(rows[longest]) + 1} tokens with end-of-text; the text "
                      f"encoder reads {length}: it was cut", PromptTruncatedWarning, stacklevel=2)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        row = row[:length - 1] + [eos]
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask


def class_ids(model, prompts: Sequence[str | int]) -> torch.Tensor:
    """(N,) class ids for prompts given as class names (the config's `class_names`) or ids."""
    names = model.config.class_names
    count = model.null_class
    ids = []
    for prompt in prompts:
        if isinstance(prompt, int) or (isinstance(prompt, str) and prompt.isdigit()):
            index = int(prompt)
        elif prompt in names:
            index = names.index(prompt)
        else:
            known = f"one of {names}" if names else f"a class id 0..{count - 1}"
            raise UsageError(f"prompt {prompt!r} is not a class of this class-conditional model: give {known}")
        if not 0 <= index < count:
            raise UsageError(f"prompt {prompt!r}: class ids run 0..{count - 1}")
        ids.append(index)
    return torch.tensor(ids, dtype=torch.long)


def conditions(model, prompts: Sequence[str | int], tokenizer=None) -> tuple[dict, dict]:
    """(condition {keyword: (N, ...)}, null condition {keyword: value}) for `prompts`."""
    kind = model.config.conditioning
    device = next(model.parameters()).device
    if kind == "class":
        return {"class_labels": class_ids(model, prompts).to(device)}, {"class_labels": model.null_class}
    if kind == "external":
        raise UsageError("this model reads encoder_hidden_states from an outside text encoder (an imported Stable "
                         "Diffusion U-Net): call it directly, model(latents, timesteps, encoder_hidden_states=...)")
    if kind == "text":
        if tokenizer is None:
            raise UsageError("a text-conditioned model needs its tokenizer (load the checkpoint with polymodal.load)")
        length = model.config.text.max_positions
        ids, mask = prompt_tokens(tokenizer, list(prompts), length)
        null_ids, null_mask = prompt_tokens(tokenizer, [""], length)
        with torch.no_grad():
            cond = model.encode_text(ids.to(device), mask.to(device))
            null = model.encode_text(null_ids.to(device), null_mask.to(device))
        return cond, {name: value[0] for name, value in null.items()}
    return {}, {}


def _check(steps: int, guidance: float, n: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(guidance, (int, float)) or not guidance >= 0 or guidance == float("inf"):
        raise UsageError(f"guidance must be a finite number >= 0, got {guidance!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"n must be an integer >= 1, got {n!r}")


@torch.no_grad()
def generate_tensors(model, prompts: Sequence[str | int], tokenizer=None, *, n: int = 1, seed: int = 0,
                     steps: int | None = None, sampler: str | None = None, guidance: float | None = None,
                     size: int | None = None, batch_size: int = DEFAULT_BATCH, progress: bool = False) -> torch.Tensor:
    """Pixels (N * n, 3, H, W) in [-1, 1]: n images per prompt, prompt-major order.

    steps / sampler / guidance default to the model config's; size: the side the denoiser
    samples at (default its training size). All initial noise is drawn from one generator seeded
    with `seed` before any batch runs, and each batch's sampler noise from its own generator
    seeded with (seed, batch index): same seed and batch_size, same images.
    """
    if hasattr(model, "generate_image_tensors"):  # a model that draws its own way (a unified token model)
        return model.generate_image_tensors(prompts, tokenizer, n=n, seed=seed, steps=steps, sampler=sampler,
                                            guidance=guidance, size=size, batch_size=batch_size, progress=progress)
    c = model.config
    steps = c.steps if steps is None else steps
    guidance = c.guidance if guidance is None else guidance
    _check(steps, guidance, n)
    side = size or c.sample_size
    expanded = [p for p in prompts for _ in range(n)]
    if not expanded:
        raise UsageError("give at least one prompt")
    device = next(model.parameters()).device
    noise = gaussian_noise((len(expanded), c.sample_channels, side, side), torch.Generator().manual_seed(seed))
    out = []
    for start in range(0, len(expanded), batch_size):
        chunk = expanded[start:start + batch_size]
        cond, null = conditions(model, chunk, tokenizer)
        denoiser = model.predict
        if null and guidance != 1.0:
            denoiser = ClassifierFreeGuidance(model.predict, guidance, null)
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + start)
        samples = sample(denoiser, model.process, noise[start:start + len(chunk)].to(device),
                         sampler=sampler or c.default_sampler, steps=steps, cond=cond, generator=generator,
                         progress=progress)
        out.append(model.to_pixels(samples).float().cpu())
    return torch.cat(out)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """Pixels (N, 3, H, W) in [-1, 1] -> N RGB images."""
    if pixels.shape[1] != 3:
        raise UsageError(f"the model samples {pixels.shape[1]}-channel tensors, not RGB pixels (a latent denoiser "
                         "without its VAE): use generate_tensors, and decode them with the matching autoencoder")
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


def generate_images(model, prompts: Sequence[str | int], tokenizer=None, **kwargs) -> list[Image.Image]:
    """n images per prompt (prompt-major) as PIL images; keywords as `generate_tensors`."""
    return to_pil(generate_tensors(model, prompts, tokenizer, **kwargs))
