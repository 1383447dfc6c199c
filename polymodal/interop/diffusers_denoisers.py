"""diffusers denoiser folders as `diffusion` models: `DiTTransformer2DModel` and
`UNet2DConditionModel` become a `DiffusionModel` whose `denoiser` is the imported network.

The per-network translation (config keys, weight names) lives in `diffusers_dit` and
`diffusers_unet`; this module puts it under the family: the model config around the denoiser's,
weight names under `denoiser.`, and the condition and process the folder implies. A denoiser
folder carries no scheduler, so the process is the one the network family was published with:
DiT's linear betas 1e-4..0.02 (Peebles & Xie 2023), Stable Diffusion's scaled-linear
0.00085..0.012; both predict the noise. An imported DiT is class-conditional (or unconditional);
an imported U-Net reads `encoder_hidden_states` from an outside text encoder (conditioning
"external"), so it is called directly rather than through `generate_images`.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from polymodal.interop.converters import Converter
from polymodal.interop.diffusers_dit import (
    dit_config_from_diffusers,
    diffusers_config_from_dit,
    dit_state_from_diffusers,
    dit_state_to_diffusers,
)
from polymodal.interop.diffusers_unet import (
    diffusers_config_from_unet,
    unet_config_from_diffusers,
    unet_state_from_diffusers,
    unet_state_to_diffusers,
)
from polymodal.models.diffusion import DiffusionConfig, ProcessConfig

PREFIX = "denoiser."
DIT_PROCESS = ProcessConfig(kind="ddpm", schedule="linear", beta_start=1e-4, beta_end=0.02, prediction="epsilon")
SD_PROCESS = ProcessConfig(kind="ddpm", schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                           prediction="epsilon")


def _dit_config(cfg: dict, weights, source: str) -> DiffusionConfig:
    dit = dit_config_from_diffusers(cfg, source)
    return DiffusionConfig(denoiser="dit", dit=dit, conditioning="class" if dit.num_classes else "none",
                           process=DIT_PROCESS)


def _unet_config(cfg: dict, weights, source: str) -> DiffusionConfig:
    unet = unet_config_from_diffusers(cfg, source)
    return DiffusionConfig(denoiser="unet", unet=unet, conditioning="external", process=SD_PROCESS)


def _under_denoiser(denoiser_state_from: Callable) -> Callable:
    """A family-level `state_from` from a denoiser-level one (names get the `denoiser.` prefix)."""
    def state_from(tensors: Mapping[str, torch.Tensor], model, source: str) -> dict[str, torch.Tensor]:
        return {PREFIX + name: t for name, t in denoiser_state_from(tensors, model.denoiser, source).items()}

    return state_from


def _denoiser_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name[len(PREFIX):]: t for name, t in state.items() if name.startswith(PREFIX)}


def _refuse_text(model) -> None:
    if model.config.conditioning == "text":
        raise ValueError("conditioning 'text': a diffusers denoiser folder has no place for the jointly trained "
                         "text encoder (export it as a polymodal checkpoint)")


def _dit_config_to(model, tokenizer=None) -> dict:
    _refuse_text(model)
    return diffusers_config_from_dit(model.config.dit)


def _unet_config_to(model, tokenizer=None) -> dict:
    _refuse_text(model)
    return diffusers_config_from_unet(model.config.unet)


DIT_CONVERTER = Converter(
    name="diffusers DiTTransformer2DModel", family="diffusion", class_names=("DiTTransformer2DModel",),
    config_from=_dit_config, state_from=_under_denoiser(dit_state_from_diffusers),
    config_to=_dit_config_to, state_to=lambda state, config: dit_state_to_diffusers(_denoiser_state(state), config.dit),
    can_export=lambda model: model.config.denoiser == "dit",
)
UNET_CONVERTER = Converter(
    name="diffusers UNet2DConditionModel", family="diffusion", class_names=("UNet2DConditionModel",),
    config_from=_unet_config, state_from=_under_denoiser(unet_state_from_diffusers),
    config_to=_unet_config_to, state_to=lambda state, config: unet_state_to_diffusers(_denoiser_state(state)),
    can_export=lambda model: model.config.denoiser == "unet",
)
