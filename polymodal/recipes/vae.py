"""Recipe `vae`: train the KL autoencoder on shapes-world images (`configs/diffusion/world_vae.yaml`).

Batch i = scenes [i*B, (i+1)*B) of the train split at `data.image_size`, 1..3 objects by default.
The objective is `polymodal.generators.vae_losses.VAEObjective` (L1 or L2 + KL, and with
`loss.disc_start` set, a patch discriminator with its own Adam optimizer). After training:
DIR/reconstructions.png, and with eval_n > 0, PSNR / SSIM on val scenes in DIR/eval.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from polymodal.atomic import write_text_atomic
from polymodal.data.dual_encoder import scene_pixels
from polymodal.errors import ConfigError
from polymodal.generators.vae import AutoencoderKL, VAEConfig
from polymodal.generators.vae_losses import VAELossConfig, VAEObjective
from polymodal.recipes.runner import TrainingJob
from polymodal.train.data import IndexedBatches
from polymodal.train.loop import TrainConfig
from polymodal.train.optim import Optimization, default_optimization


@dataclass
class VAEDataConfig:
    """World scenes for the autoencoder: image_size (0: the model's sample_size), num_objects
    (min, max), background "plain" | "noise" | "texture" | "mixed", batch_size."""

    source: str = "world"
    image_size: int = 0
    num_objects: tuple[int, int] = (1, 3)
    background: str = "plain"
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.source != "world":
            raise ConfigError(f"data.source: the autoencoder recipes (vae, image_vq) train on the shapes world, got {self.source!r}")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class VAERecipeConfig:
    """A `vae` recipe: model, data, loss weights, training; eval_n > 0 evaluates after training.
    measure_scaling_factor: set the final model's `scaling_factor` to 1 / the standard deviation of
    its latents over 8 training batches (Rombach et al. 2022 did this for SD's 0.18215), so the
    latent diffusion model trains on unit-variance latents."""

    recipe: str = "vae"
    model: VAEConfig = field(default_factory=VAEConfig)
    data: VAEDataConfig = field(default_factory=VAEDataConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_n: int = 0
    measure_scaling_factor: bool = True

    def __post_init__(self) -> None:
        if self.eval_n < 0:
            raise ConfigError(f"eval_n must be >= 0, got {self.eval_n}")
        size = self.data.image_size or self.model.sample_size
        factor = self.model.downsample_factor
        if size % factor:
            raise ConfigError(f"data.image_size {size} is not a multiple of the autoencoder's factor {factor}")


class WorldScenes:
    """batch_fn: batch i = scenes [i*B, (i+1)*B) of the train split as pixels (B, 3, S, S) in [-1, 1]."""

    def __init__(self, data: VAEDataConfig, size: int, seed: int):
        from polymodal.data.world import World

        self.world = World("train", image_size=size, num_objects=tuple(data.num_objects),
                           background=data.background, seed=seed)
        self.batch_size = data.batch_size

    def __call__(self, index: int) -> torch.Tensor:
        scenes = self.world.scenes(self.batch_size, start=index * self.batch_size)
        return scene_pixels(scenes)


def autoencoder_optimizers(objective: VAEObjective):
    """`train`'s optimizers for an autoencoder objective: None (the default AdamW) without a
    discriminator; with one, the model's AdamW under `generator_optimizer` and an Adam for the
    discriminator (betas 0.5, 0.9, as VQGAN) under `discriminator_optimizer`."""
    if objective.discriminator is None:
        return None
    loss = objective.config

    def optimizers(model, train_config):
        found = default_optimization(model, train_config)
        disc = torch.optim.Adam(objective.discriminator.parameters(), lr=train_config.lr, betas=(0.5, 0.9))
        return {loss.generator_optimizer: found["model"], loss.discriminator_optimizer: Optimization(disc)}

    return optimizers


def vae_job(config: VAERecipeConfig) -> TrainingJob:
    """The `vae` recipe's training job (see the module docstring)."""
    model = AutoencoderKL(config.model)
    size = config.data.image_size or config.model.sample_size
    objective = VAEObjective(config.loss, in_channels=config.model.in_channels)
    print(f"training a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter autoencoder "
          f"(factor {model.downsample_factor}) on {size} px world scenes, batch {config.data.batch_size}")
    optimizers = autoencoder_optimizers(objective)

    def final_model() -> AutoencoderKL:
        if config.measure_scaling_factor:
            scenes = WorldScenes(config.data, size, config.train.seed + 1)
            with torch.no_grad():
                latents = torch.cat([model.encode(scenes(i).to(model.last_layer.device)) for i in range(8)])
            model.config.scaling_factor = float(1.0 / latents.float().std())
            print(f"latent standard deviation {latents.float().std():.4f}: scaling_factor "
                  f"{model.config.scaling_factor:.5f}")
        return model

    def after(final: AutoencoderKL, out: Path | None) -> None:
        from polymodal.eval.reconstruction import evaluate_reconstruction, save_reconstruction_grid

        if out is None:
            return
        save_reconstruction_grid(final, out / "reconstructions.png", size=size)
        if config.eval_n:
            metrics = evaluate_reconstruction(final, n=config.eval_n, size=size)
            print(json.dumps(metrics, indent=2))
            write_text_atomic(out / "eval.json", json.dumps(metrics, indent=2))

    return TrainingJob(model, IndexedBatches(WorldScenes(config.data, size, config.train.seed)), objective,
                       optimizers=optimizers, state={"vae_objective": objective}, callbacks=[objective.on_step],
                       final_model=final_model, after=after)
