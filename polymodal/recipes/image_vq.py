"""Recipe `image_vq`: train the image tokenizer on shapes-world images (`configs/image_vq/world.yaml`).

The data are the KL autoencoder recipe's (`polymodal.recipes.vae`: batch i = scenes
[i*B, (i+1)*B) of the train split at `data.image_size`). The objective is
`polymodal.tokenizers.image_vq_losses.ImageVQObjective` (L2 + the quantizer loss, and with
`loss.disc_start` set, a patch discriminator with its own Adam optimizer). With `usage_every`,
the share of the codebook that training used in the last `usage_every` steps is printed. After
training: DIR/reconstructions.png, and with eval_n > 0, PSNR / SSIM / codebook usage on val
scenes in DIR/eval.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


from polymodal.atomic import write_text_atomic
from polymodal.bounds import MAX_STEPS, check_int
from polymodal.errors import ConfigError
from polymodal.recipes.runner import TrainingJob
from polymodal.recipes.vae import VAEDataConfig, WorldScenes, autoencoder_optimizers
from polymodal.tokenizers.image_vq import ImageVQ, ImageVQConfig
from polymodal.tokenizers.image_vq_losses import ImageVQLossConfig, ImageVQObjective
from polymodal.train.data import IndexedBatches
from polymodal.train.loop import StepContext, TrainConfig


@dataclass
class ImageVQRecipeConfig:
    """An `image_vq` recipe: model, data (world scenes, as the `vae` recipe reads them), loss
    weights, training; eval_n > 0 evaluates after training; usage_every > 0 prints the codebook
    usage of training every that many steps."""

    recipe: str = "image_vq"
    model: ImageVQConfig = field(default_factory=ImageVQConfig)
    data: VAEDataConfig = field(default_factory=VAEDataConfig)
    loss: ImageVQLossConfig = field(default_factory=ImageVQLossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_n: int = 0
    usage_every: int = 0

    def __post_init__(self) -> None:
        owner = "ImageVQRecipeConfig"
        check_int(owner, "eval_n", self.eval_n, 0, 100000)
        check_int(owner, "usage_every", self.usage_every, 0, MAX_STEPS)
        if not self.model.has_decoder:
            raise ConfigError("model.has_decoder must be true: the recipe trains by reconstructing images")
        size = self.data.image_size or self.model.image_size
        factor = self.model.downsample_factor
        if size % factor:
            raise ConfigError(f"data.image_size {size} is not a multiple of the tokenizer's factor {factor}")


def image_vq_job(config: ImageVQRecipeConfig) -> TrainingJob:
    """The `image_vq` recipe's training job (see the module docstring)."""
    model = ImageVQ(config.model)
    size = config.data.image_size or config.model.image_size
    h, w = model.grid(size)
    objective = ImageVQObjective(config.loss, in_channels=config.model.in_channels)
    print(f"training a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter image tokenizer "
          f"({config.model.quantizer}, {model.codebook_size} codes, {h}x{w} per image) on {size} px world scenes, "
          f"batch {config.data.batch_size}")
    optimizers = autoencoder_optimizers(objective)

    def report_usage(context: StepContext) -> None:
        if config.usage_every and context.step % config.usage_every == 0:
            print(f"\nstep {context.step}: {model.usage():.1%} of the codebook used in the last "
                  f"{config.usage_every} steps")
            model.reset_usage()

    def after(final: ImageVQ, out: Path | None) -> None:
        from polymodal.eval.image_tokenizer import evaluate_tokenizer
        from polymodal.eval.reconstruction import save_reconstruction_grid

        if out is None:
            return
        save_reconstruction_grid(final, out / "reconstructions.png", size=size)
        if config.eval_n:
            metrics = evaluate_tokenizer(final, n=config.eval_n, size=size,
                                         num_objects=tuple(config.data.num_objects),
                                         background=config.data.background)
            print(json.dumps(metrics, indent=2))
            write_text_atomic(out / "eval.json", json.dumps(metrics, indent=2))

    # eval mode from here on: a VQ codebook must not move while the final model is saved and scored.
    return TrainingJob(model, IndexedBatches(WorldScenes(config.data, size, config.train.seed)), objective,
                       optimizers=optimizers, state={"image_vq_objective": objective},
                       callbacks=[objective.on_step, report_usage], final_model=model.eval, after=after)
