"""Family `vae`: the latent-diffusion KL autoencoder (`polymodal.generators.vae.AutoencoderKL`).

Trained alone (`configs/diffusion/world_vae.yaml`), then frozen inside a `latent_diffusion` model
as its `vae` part; diffusers `AutoencoderKL` folders (the Stable Diffusion VAE layout) load and
export through its converter.
"""
from __future__ import annotations

import torch

from polymodal.generators.vae import AutoencoderKL, VAEConfig, vae_tiny
from polymodal.models.registry import Family, Recipe, register


def _example_batch(model: AutoencoderKL) -> torch.Tensor:
    size = model.config.sample_size
    return torch.rand(2, model.config.in_channels, size, size) * 2 - 1


VAE = register(Family(
    "vae", VAEConfig, AutoencoderKL, vae_tiny, _example_batch,
    objective="polymodal.generators.vae_losses:vae_loss",
    recipes=(Recipe("vae", "polymodal.recipes.vae:VAERecipeConfig", "polymodal.recipes.vae:vae_job",
                    outputs=("eval.json", "reconstructions.png")),),
    evaluate="polymodal.eval.reconstruction:evaluate",
    converters=("polymodal.interop.diffusers_vae:VAE_CONVERTER",),
))
