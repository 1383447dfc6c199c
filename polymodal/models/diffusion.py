"""Families `diffusion` and `latent_diffusion`: image generators composed of a denoiser (DiT or
U-Net), a noising process (DDPM or flow matching, `polymodal.generators.diffusion`) and a
condition: class labels, or text read by a small text transformer trained jointly with the
denoiser. `latent_diffusion` adds a frozen KL autoencoder (family `vae`) stored as a checkpoint
part: the denoiser works on its latents and images are decoded at the end.

The model object is the denoiser as diffusers calls it: `model(latents, timesteps,
class_labels=None, encoder_hidden_states=None, pooled=None)` returns what diffusers' `.sample`
holds, so imported diffusers DiT / U-Net folders load as `diffusion` models. Everything around it
(text encoding, guidance, the sampler, decoding to PIL) is `polymodal.infer.images`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from polymodal.bounds import check_float, check_int
from polymodal.encoders.text import TextEncoderConfig, TextTransformer
from polymodal.errors import ConfigError
from polymodal.generators.diffusion import DiffusionSchedule, FlowMatchingSchedule
from polymodal.generators.diffusion.samplers import DEFAULT_SAMPLER, SAMPLERS
from polymodal.generators.dit import DiT, DiTConfig, dit_tiny
from polymodal.generators.unet import UNet, UNetConfig
from polymodal.generators.vae import AutoencoderKL, VAEConfig, vae_tiny
from polymodal.models.registry import Family, Recipe, register

DENOISERS = ("dit", "unet")
CONDITIONINGS = ("class", "text", "external", "none")
PROCESSES = ("ddpm", "flow")


@dataclass
class ProcessConfig:
    """The noising process. kind "ddpm": a `schedule` of betas over num_train_timesteps steps and a
    `prediction` type (epsilon, sample, v_prediction); kind "flow": rectified flow predicting the
    velocity, training times drawn "uniform" or "logit_normal"."""

    kind: str = "ddpm"
    schedule: str = "cosine"
    prediction: str = "epsilon"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    time_sampling: str = "uniform"

    def __post_init__(self) -> None:
        if self.kind not in PROCESSES:
            raise ConfigError(f"ProcessConfig.kind must be one of {PROCESSES}, got {self.kind!r}")
        self.build()  # every other field is checked by the process itself, naming it

    def build(self) -> DiffusionSchedule | FlowMatchingSchedule:
        """The process object the loss and the samplers take."""
        if self.kind == "flow":
            return FlowMatchingSchedule(time_sampling=self.time_sampling,
                                        num_train_timesteps=self.num_train_timesteps)
        return DiffusionSchedule(schedule=self.schedule, num_train_timesteps=self.num_train_timesteps,
                                 beta_start=self.beta_start, beta_end=self.beta_end,
                                 prediction_type=self.prediction)


@dataclass
class DiffusionConfig:
    """An image generator. denoiser: "dit" (-> `dit`) or "unet" (-> `unet`). conditioning:
    "class" (the denoiser's class-label table; `class_names` name the labels for prompts),
    "text" (a `text` transformer whose token states feed cross-attention and whose pooled output
    feeds the DiT's conditioning vector), "external" (encoder_hidden_states from an outside text
    encoder: an imported Stable Diffusion U-Net, called directly), or "none". Guidance needs a model trained with the
    condition dropped for some examples (the recipes' `data.condition_dropout`). sampler / steps /
    guidance: what `generate_images` uses unless told otherwise.
    """

    denoiser: str = "dit"
    dit: DiTConfig = field(default_factory=DiTConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    conditioning: str = "class"
    class_names: list[str] = field(default_factory=list)
    text: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(
        hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256, max_positions=32, act="gelu"))
    process: ProcessConfig = field(default_factory=ProcessConfig)
    sampler: str | None = None
    steps: int = 50
    guidance: float = 1.0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.denoiser not in DENOISERS:
            raise ConfigError(f"{owner}.denoiser must be one of {DENOISERS}, got {self.denoiser!r}")
        if self.conditioning not in CONDITIONINGS:
            raise ConfigError(f"{owner}.conditioning must be one of {CONDITIONINGS}, got {self.conditioning!r}")
        check_int(owner, "steps", self.steps, 1, 10_000)
        check_float(owner, "guidance", self.guidance, 0.0, 1e4)
        if self.sampler is not None and SAMPLERS.get(self.sampler) != self.process.kind:
            fitting = [name for name, kind in SAMPLERS.items() if kind == self.process.kind]
            raise ConfigError(f"{owner}.sampler {self.sampler!r} does not fit process.kind "
                              f"{self.process.kind!r}; use one of {fitting}")
        self._check_conditioning(owner)

    def _check_conditioning(self, owner: str) -> None:
        if self.conditioning == "class":
            classes = self.num_classes
            if classes < 1:
                raise ConfigError(f"{owner}: conditioning 'class' needs class labels in the denoiser "
                                  f"({self.class_field} >= 1)")
            if self.class_names and len(self.class_names) != classes:
                raise ConfigError(f"{owner}.class_names has {len(self.class_names)} names for {classes} classes")
        if self.conditioning == "text":
            width = self.text.hidden_size
            if self.denoiser == "dit" and width not in (self.dit.cross_attention_dim, self.dit.pooled_dim):
                raise ConfigError(f"{owner}: conditioning 'text' needs dit.cross_attention_dim or dit.pooled_dim "
                                  f"equal to text.hidden_size ({width})")
            if self.denoiser == "unet" and self.unet.cross_attention_dim != width:
                raise ConfigError(f"{owner}: unet.cross_attention_dim ({self.unet.cross_attention_dim}) must equal "
                                  f"text.hidden_size ({width})")

    @property
    def num_classes(self) -> int:
        """Class labels the denoiser takes (0: none); id `num_classes` is the null class."""
        return self.dit.num_classes if self.denoiser == "dit" else int(self.unet.num_class_embeds or 0)

    @property
    def class_field(self) -> str:
        """The config key that sets `num_classes`, for messages."""
        return "dit.num_classes" if self.denoiser == "dit" else "unet.num_class_embeds"

    @property
    def denoiser_config(self) -> DiTConfig | UNetConfig:
        """The config of the chosen denoiser."""
        return self.dit if self.denoiser == "dit" else self.unet

    @property
    def sample_channels(self) -> int:
        """Channels of what the denoiser sees (pixels or latents)."""
        return self.denoiser_config.in_channels

    @property
    def sample_size(self) -> int:
        """Side of what the denoiser sees at its native resolution."""
        size = self.denoiser_config.sample_size
        if size is None:
            raise ConfigError("the denoiser config has no sample_size: pass the size to generate at")
        return size

    @property
    def default_sampler(self) -> str:
        """`sampler`, or the process's default (ddim for DDPM, euler for flow)."""
        return self.sampler or DEFAULT_SAMPLER[self.process.kind]


class DiffusionModel(nn.Module):
    """A denoiser with its process and condition (see the module docstring).

    forward(latents (B, C, H, W), timesteps (B,) | scalar, class_labels (B,) | None,
    encoder_hidden_states (B, S, D) | None, pooled (B, D) | None) -> (B, C_out, H, W), the
    denoiser's raw output (C_out = 2C for a DiT with a learned variance).
    """

    family = "diffusion"

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        self.config = config
        self.denoiser = DiT(config.dit) if config.denoiser == "dit" else UNet(config.unet)
        self.text_encoder = TextTransformer(config.text) if config.conditioning == "text" else None
        self.process = config.process.build()

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, pooled: torch.Tensor | None = None) -> torch.Tensor:
        if self.config.denoiser == "unet":
            if pooled is not None:
                raise ValueError("a U-Net denoiser takes no pooled text embedding")
            return self.denoiser(latents, timesteps, class_labels=class_labels,
                                 encoder_hidden_states=encoder_hidden_states)
        return self.denoiser(latents, timesteps, class_labels=class_labels,
                             encoder_hidden_states=encoder_hidden_states, pooled=pooled)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """The process's prediction (B, C, H, W) for x_t: the forward without a learned-variance half
        (our samplers use the fixed DDPM posterior variance)."""
        return self(x_t, t, **cond)[:, :x_t.shape[1]]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The text condition: {"encoder_hidden_states": (B, T, D)} for cross-attention and
        {"pooled": (B, D)} for a DiT with pooled_dim, from token ids (B, T)."""
        if self.text_encoder is None:
            raise ValueError("this model is not text-conditioned (conditioning is "
                             f"{self.config.conditioning!r})")
        out = self.text_encoder(input_ids, attention_mask)
        cond = {}
        if self.config.denoiser == "unet" or self.config.dit.cross_attention_dim:
            cond["encoder_hidden_states"] = out.last_hidden_state
        if self.config.denoiser == "dit" and self.config.dit.pooled_dim:
            cond["pooled"] = out.pooler_output
        return cond

    @property
    def null_class(self) -> int:
        """The class id that stands for "no class" (classifier-free guidance): one past the last."""
        return self.config.num_classes

    def to_pixels(self, samples: torch.Tensor) -> torch.Tensor:
        """Samples of the process -> pixels (B, 3, H, W) in [-1, 1] (the identity in pixel space)."""
        return samples.clamp(-1, 1)

    def from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> what the denoiser is trained on (the identity here)."""
        return pixels


@dataclass
class LatentDiffusionConfig(DiffusionConfig):
    """A `DiffusionConfig` whose denoiser works in the latent space of `vae` (kept frozen)."""

    vae: VAEConfig = field(default_factory=VAEConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vae.latent_channels != self.sample_channels:
            raise ConfigError(f"LatentDiffusionConfig: the vae has {self.vae.latent_channels} latent channels but "
                              f"the denoiser takes {self.sample_channels} (in_channels)")


class LatentDiffusionModel(DiffusionModel):
    """`DiffusionModel` + a frozen `vae` part: trains on vae latents (scaled into the diffusion
    space) and decodes samples back to pixels."""

    family = "latent_diffusion"

    def __init__(self, config: LatentDiffusionConfig):
        super().__init__(config)
        self.vae = AutoencoderKL(config.vae).requires_grad_(False)

    def to_pixels(self, samples: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(self.vae.from_diffusion_space(samples)).clamp(-1, 1)

    @torch.no_grad()
    def from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.to_diffusion_space(self.vae.encode(pixels))


def diffusion_tiny() -> DiffusionConfig:
    """A two-layer class-conditional DiT on 8 x 8 RGB pixels (tests)."""
    return DiffusionConfig(dit=dit_tiny(in_channels=3), process=ProcessConfig(num_train_timesteps=100), steps=4)


def latent_diffusion_tiny() -> LatentDiffusionConfig:
    """`diffusion_tiny`'s DiT on the 4-channel latents of the tiny VAE (tests)."""
    vae = vae_tiny()
    return LatentDiffusionConfig(dit=dit_tiny(sample_size=vae.sample_size // 2, in_channels=vae.latent_channels),
                                 vae=vae, process=ProcessConfig(num_train_timesteps=100), steps=4)


def _example_batch(model: DiffusionModel) -> dict[str, torch.Tensor]:
    c = model.config
    size = c.sample_size * (2 if isinstance(model, LatentDiffusionModel) else 1)
    batch = {"pixels": torch.rand(2, 3, size, size) * 2 - 1}
    if c.conditioning == "class":
        batch["class_labels"] = torch.tensor([0, 1])
    return batch


_RECIPES = "polymodal.recipes.diffusion"
DIFFUSION = register(Family(
    "diffusion", DiffusionConfig, DiffusionModel, diffusion_tiny, _example_batch,
    objective="polymodal.train.objectives:diffusion_objective",
    tasks=("generate_image",),
    recipes=(Recipe("diffusion", f"{_RECIPES}:DiffusionRecipeConfig", f"{_RECIPES}:diffusion_job",
                    outputs=("eval.json", "samples.png")),),
    evaluate="polymodal.eval.generation:evaluate",
    converters=("polymodal.interop.diffusers_denoisers:DIT_CONVERTER",
                "polymodal.interop.diffusers_denoisers:UNET_CONVERTER"),
))
LATENT_DIFFUSION = register(Family(
    "latent_diffusion", LatentDiffusionConfig, LatentDiffusionModel, latent_diffusion_tiny, _example_batch,
    objective="polymodal.train.objectives:diffusion_objective",
    tasks=("generate_image",),
    recipes=(Recipe("latent_diffusion", f"{_RECIPES}:LatentDiffusionRecipeConfig", f"{_RECIPES}:latent_diffusion_job",
                    outputs=("eval.json", "samples.png")),),
    evaluate="polymodal.eval.generation:evaluate",
    parts=("vae",),
))
