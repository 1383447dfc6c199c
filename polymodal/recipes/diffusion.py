"""Recipes `diffusion` and `latent_diffusion`: train an image generator on the shapes world.

Data (`data`): world scenes rendered at the denoiser's resolution (pixel space) or at the VAE's
(latent space), `num_objects` per scene. The condition follows `model.conditioning`:
- "class": one label per (color, shape) pair, named "red circle", ... (`WORLD_CLASS_NAMES`), so
  single-object scenes are required;
- "text": one caption of the scene in one of `caption_styles` (default "located": size, color,
  shape and grid position of every object, everything the exact scorer checks);
- "none": no condition.
`condition_dropout` of the examples get the null condition (the empty caption, or the null
class), decided per batch index, so a resumed run sees the same batches.

The latent recipe reads a trained KL autoencoder (`vae_from`, a `vae` checkpoint folder, kept
frozen) and, with `cache_batches` > 0, encodes that many batches once and cycles over the cached
latents (latent pre-computation) instead of encoding every batch.

The denoiser is trained with an EMA of its weights (`ema_decay`; 0 turns it off): the EMA is
saved with every checkpoint and becomes the final weights, which sampling uses. Every
`sample_every` steps a grid of samples goes to DIR/samples/step-N.png; after training,
DIR/samples.png, and with `eval_n` > 0, the exact-scorer evaluation in DIR/eval.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from polymodal.atomic import write_text_atomic
from polymodal.data.dual_encoder import scene_pixels
from polymodal.data.world.objects import COLORS, SHAPES
from polymodal.data.world.text import captions_of, check_caption_styles
from polymodal.distributed.env import current_world
from polymodal.distributed.parallelize import is_sharded, plain_copy
from polymodal.errors import ConfigError
from polymodal.models.diffusion import DiffusionConfig, DiffusionModel, LatentDiffusionConfig, LatentDiffusionModel
from polymodal.recipes.runner import TrainingJob
from polymodal.train.data import IndexedBatches
from polymodal.train.ema import EMA
from polymodal.train.loop import StepContext, TrainConfig, every
from polymodal.train.objectives import diffusion_objective

WORLD_CLASS_NAMES = [f"{color} {shape}" for color in COLORS for shape in SHAPES]
GRID_PROMPTS = 8  # prompts in a periodic sample grid (val scenes), one image each


@dataclass
class DiffusionDataConfig:
    """World scenes for a generator. image_size: render size (pixel space: the denoiser's
    sample_size, filled in when 0); num_objects: (min, max) per scene; caption_styles (text
    conditioning); background: "plain" | "noise" | "texture" | "mixed"; condition_dropout: the
    fraction of examples trained with the null condition (classifier-free guidance needs > 0)."""

    source: str = "world"
    image_size: int = 0
    num_objects: tuple[int, int] = (1, 1)
    caption_styles: list[str] = field(default_factory=lambda: ["located"])
    background: str = "plain"
    condition_dropout: float = 0.1
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.source != "world":
            raise ConfigError(f"data.source: the diffusion recipes train on the shapes world, got {self.source!r}")
        check_caption_styles(self.caption_styles, "data.caption_styles")
        if not 0.0 <= self.condition_dropout <= 1.0:
            raise ConfigError(f"data.condition_dropout must be in [0, 1], got {self.condition_dropout}")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class DiffusionRecipeConfig:
    """A `diffusion` recipe: model, data, training; ema_decay (0: no EMA); sample_every: steps
    between sample grids (0: only at the end); eval_n > 0: scenes per evaluation column after
    training (DIR/eval.json); eval_guidance: the guidance scale of that evaluation (default: the
    model config's)."""

    recipe: str = "diffusion"
    model: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DiffusionDataConfig = field(default_factory=DiffusionDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema_decay: float = 0.999
    sample_every: int = 0
    eval_n: int = 0
    eval_guidance: float | None = None

    def __post_init__(self) -> None:
        if not (self.ema_decay == 0 or 0 < self.ema_decay < 1):
            raise ConfigError(f"ema_decay must be 0 (off) or in (0, 1), got {self.ema_decay}")
        for name in ("sample_every", "eval_n"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.model.conditioning == "class":
            if tuple(self.data.num_objects) != (1, 1):
                raise ConfigError("data.num_objects must be [1, 1] for conditioning 'class' (one label per image)")
            if self.model.class_names and self.model.class_names != WORLD_CLASS_NAMES:
                raise ConfigError("model.class_names: the world recipe names its classes itself; leave it empty")


@dataclass
class LatentDiffusionRecipeConfig(DiffusionRecipeConfig):
    """A `latent_diffusion` recipe: `vae_from` is a trained `vae` checkpoint folder (frozen);
    cache_batches > 0 encodes that many batches once and trains on the cached latents."""

    recipe: str = "latent_diffusion"
    model: LatentDiffusionConfig = field(default_factory=LatentDiffusionConfig)
    vae_from: str = ""
    cache_batches: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.vae_from:
            raise ConfigError("vae_from: name the trained VAE checkpoint folder (polymodal train configs/diffusion/"
                              "world_vae.yaml)")
        if self.cache_batches < 0:
            raise ConfigError(f"cache_batches must be >= 0, got {self.cache_batches}")


class WorldImages:
    """batch_fn: batch i = scenes [i*B, (i+1)*B) of the train split as {"pixels" (B, 3, S, S) in
    [-1, 1], and the condition: "class_labels" (B,) or "input_ids"/"attention_mask" (B, T)}."""

    def __init__(self, data: DiffusionDataConfig, model: DiffusionConfig, tokenizer, image_size: int, seed: int):
        from polymodal.data.world import World

        self.world = World("train", image_size=image_size, num_objects=tuple(data.num_objects),
                           background=data.background, seed=seed)
        self.data, self.model, self.tokenizer = data, model, tokenizer

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        from polymodal.infer.images import prompt_tokens

        d = self.data
        rng = np.random.default_rng([index, 11])  # captions and dropped conditions: a function of the index
        scenes = list(self.world.scenes(d.batch_size, start=index * d.batch_size))
        batch = {"pixels": scene_pixels(scenes)}
        dropped = rng.random(len(scenes)) < d.condition_dropout
        if self.model.conditioning == "class":
            labels = [WORLD_CLASS_NAMES.index(f"{s.objects[0].color} {s.objects[0].shape}") for s in scenes]
            null = self.model.num_classes  # the null class id
            batch["class_labels"] = torch.tensor([null if drop else label for label, drop in zip(labels, dropped)])
        elif self.model.conditioning == "text":
            texts = []
            for scene, drop in zip(scenes, dropped):
                options = captions_of(scene, [d.caption_styles[int(rng.integers(len(d.caption_styles)))]])
                texts.append("" if drop else options[int(rng.integers(len(options)))])
            batch["input_ids"], batch["attention_mask"] = prompt_tokens(self.tokenizer, texts,
                                                                         self.model.text.max_positions)
        return batch


class CachedLatents:
    """batch_fn over latents computed once: the first `count` batches of `images` encoded by
    `encode` (pixels -> latents in the diffusion space), then batch i = cached batch i mod count."""

    def __init__(self, images: WorldImages, encode, count: int):
        self.batches = []
        for i in range(count):
            batch = dict(images(i))
            batch["latents"] = encode(batch.pop("pixels"))
            self.batches.append(batch)

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        return self.batches[index % len(self.batches)]


def _prepare(config: DiffusionRecipeConfig):
    """(model config, tokenizer): the class names / text vocabulary of the world filled in."""
    model_config = config.model
    tokenizer = None
    if model_config.conditioning == "class":
        if model_config.num_classes != len(WORLD_CLASS_NAMES):
            raise ConfigError(f"model: the world has {len(WORLD_CLASS_NAMES)} (color, shape) classes; set "
                              f"{model_config.class_field} to {len(WORLD_CLASS_NAMES)}")
        model_config.class_names = list(WORLD_CLASS_NAMES)
    elif model_config.conditioning == "text":
        from polymodal.data.world import world_tokenizer

        tokenizer = world_tokenizer()
        model_config.text.vocab_size = tokenizer.vocab_size
        model_config.text.eos_token_id = tokenizer.eos_token_id
        model_config.text.legacy_eos_argmax = False  # the world tokenizer's eos id is 2
    return model_config, tokenizer


def _job(config: DiffusionRecipeConfig, model: DiffusionModel, tokenizer, batches) -> TrainingJob:
    """The training job shared by both recipes: EMA, sample grids, evaluation."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"training {sum(p.numel() for p in trainable) / 1e6:.2f}M parameters ({model.config.denoiser}, "
          f"{model.config.process.kind}, conditioning {model.config.conditioning}), batch {config.data.batch_size}")
    ema = EMA(model, config.ema_decay) if config.ema_decay else None
    state = {"ema": ema} if ema is not None else {}

    def averaged() -> DiffusionModel:
        # plain_copy: a model FSDP2 shards is rebuilt whole (collective), a plain one deep-copied.
        return ema.copy_to(plain_copy(model)) if ema is not None else model

    def grid(context: StepContext) -> None:
        if context.out_dir is None:
            return
        # Every rank takes part: gathering FSDP2-managed weights is collective.
        if ema is not None:
            sampler = averaged()
        elif is_sharded(model):
            sampler = plain_copy(model, main_only=True)  # rank 0 alone holds the whole weights (CPU)
        else:
            sampler = model
        if current_world()[0] == 0:
            save_sample_grid(sampler.to(next(model.parameters()).device), tokenizer,
                             context.out_dir / "samples" / f"step-{context.step:07d}.png", config)

    callbacks = [ema] if ema is not None else []
    if config.sample_every:
        callbacks.append(every(config.sample_every, grid, at_end=False))

    def after(final: DiffusionModel, out: Path | None) -> None:
        if out is not None:
            from polymodal.eval.generation import evaluate_generation

            report_generation(final, tokenizer, out, config, evaluate_generation)

    return TrainingJob(model, batches, diffusion_objective, tokenizer=tokenizer, state=state, callbacks=callbacks,
                       final_model=averaged if ema is not None else None, after=after)


def report_generation(model, tokenizer, out: Path, config, evaluate) -> None:
    """After training an image generator: DIR/samples.png and, with `config.eval_n`, the metrics of
    `evaluate(model, tokenizer, n=, guidance=)` printed and written to DIR/eval.json."""
    save_sample_grid(model, tokenizer, out / "samples.png", config)
    if config.eval_n:
        metrics = evaluate(model, tokenizer, n=config.eval_n, guidance=config.eval_guidance)
        print(json.dumps(metrics, indent=2))
        write_text_atomic(out / "eval.json", json.dumps(metrics, indent=2))


def save_sample_grid(model: DiffusionModel, tokenizer, path: Path, config: DiffusionRecipeConfig) -> Path:
    """One image for each of GRID_PROMPTS val-scene prompts, labelled with the prompt, at `path`."""
    from polymodal.eval.generation import world_prompts
    from polymodal.eval.grids import labelled_grid
    from polymodal.infer.images import generate_images

    prompts = [prompt for prompt, _ in world_prompts(model.config, "val", config.data.num_objects, GRID_PROMPTS,
                                                     config.data.caption_styles[0])]
    images = generate_images(model, prompts, tokenizer, guidance=config.eval_guidance)
    return labelled_grid(images, [[p] for p in prompts], path, tile=96)


def diffusion_job(config: DiffusionRecipeConfig) -> TrainingJob:
    """The `diffusion` recipe's training job (pixel space)."""
    model_config, tokenizer = _prepare(config)
    size = config.data.image_size or model_config.sample_size
    if size != model_config.sample_size:
        raise ConfigError(f"data.image_size {size} differs from the denoiser's sample_size {model_config.sample_size}"
                          " (pixel space: the denoiser sees the images themselves)")
    model = DiffusionModel(model_config)
    batches = IndexedBatches(WorldImages(config.data, model_config, tokenizer, size, config.train.seed))
    return _job(config, model, tokenizer, batches)


def latent_diffusion_job(config: LatentDiffusionRecipeConfig) -> TrainingJob:
    """The `latent_diffusion` recipe's training job: the frozen VAE of `vae_from`, latents cached
    when `cache_batches` > 0."""
    from polymodal.api import load

    loaded = load(config.vae_from)
    if getattr(loaded.model, "family", None) != "vae":
        raise ConfigError(f"vae_from: {config.vae_from} holds a {getattr(loaded.model, 'family', '?')!r} model, "
                          "not a 'vae'")
    config.model.vae = loaded.model.config
    model_config, tokenizer = _prepare(config)
    LatentDiffusionConfig.__post_init__(model_config)  # the VAE changed: check the latent channels again
    factor = loaded.model.downsample_factor
    size = config.data.image_size or model_config.sample_size * factor
    if size != model_config.sample_size * factor:
        raise ConfigError(f"data.image_size {size}: the VAE (factor {factor}) must give the denoiser's sample_size "
                          f"{model_config.sample_size}; use {model_config.sample_size * factor}")
    model = LatentDiffusionModel(model_config)
    model.vae.load_state_dict(loaded.model.state_dict())
    images = WorldImages(config.data, model_config, tokenizer, size, config.train.seed)
    if config.cache_batches:
        print(f"encoding {config.cache_batches} batches through the frozen VAE once ...")
        batches = IndexedBatches(CachedLatents(images, model.from_pixels, config.cache_batches))
    else:
        batches = IndexedBatches(images)
    return _job(config, model, tokenizer, batches)
