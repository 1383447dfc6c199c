"""diffusers `AutoencoderKL` folders (the Stable Diffusion VAE layout) <-> `VAEConfig` and
`AutoencoderKL` weights.

A folder holds config.json (`"_class_name": "AutoencoderKL"`) and diffusion_pytorch_model.safetensors.
Config keys and defaults follow diffusers' `AutoencoderKL.__init__`. Weight names follow its
modules; the mid-block attention is stored in two ways: `query/key/value/proj_attn` (files written
before diffusers 0.14) and `to_q/to_k/to_v/to_out.0` (current). Both are read; the current one is
written.

Not translated: `latents_mean` / `latents_std` (per-channel latent statistics some later VAEs use
instead of one scaling factor: refused, since `to_diffusion_space` would silently differ) and
`force_upcast` (a hint that fp16 inference overflows: ignored; choose the dtype when loading).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from polymodal.generators.vae import VAEConfig
from polymodal.interop.converters import Converter, build_config
from polymodal.interop.namemap import NameMap, renamer, shapes_of, state_from_foreign

CLASS_NAME = "AutoencoderKL"
DIFFUSERS_VERSION = "0.42.1"  # the release whose layout the parity tests check
DOWN_BLOCK, UP_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"

_DEFAULTS = dict(  # diffusers' AutoencoderKL.__init__ defaults, for keys a config.json omits
    in_channels=3, out_channels=3, down_block_types=[DOWN_BLOCK], up_block_types=[UP_BLOCK], block_out_channels=[64],
    layers_per_block=1, act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=32,
    scaling_factor=0.18215, shift_factor=None, latents_mean=None, latents_std=None, use_quant_conv=True,
    use_post_quant_conv=True, mid_block_add_attention=True,
)
# VAEConfig fields whose config.json key differs (for error messages).
_KEYS = {"mid_block_attention": "mid_block_add_attention"}

_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _part_names(part: str) -> list[tuple[str, str]]:
    """(diffusers, ours) pairs shared by the encoder and the decoder."""
    attention = f"{part}.mid_block.attentions.0"
    return [
        (f"{part}.conv_in", f"{part}.conv_in"),
        (f"{part}.mid_block.resnets", f"{part}.mid_block.resnets"),
        (f"{attention}.group_norm", f"{part}.mid_block.attention.group_norm"),
        (f"{attention}.to_q", f"{part}.mid_block.attention.attn.q_proj"),
        (f"{attention}.to_k", f"{part}.mid_block.attention.attn.k_proj"),
        (f"{attention}.to_v", f"{part}.mid_block.attention.attn.v_proj"),
        (f"{attention}.to_out.0", f"{part}.mid_block.attention.attn.o_proj"),
        (f"{part}.conv_norm_out", f"{part}.norm_out"),
        (f"{part}.conv_out", f"{part}.conv_out"),
    ]


DIFFUSERS_VAE_NAMES = NameMap([
    *_part_names("encoder"),
    ("encoder.down_blocks.{}.resnets", "encoder.down_blocks.{}.resnets"),
    ("encoder.down_blocks.{}.downsamplers.0", "encoder.down_blocks.{}.downsample"),
    ("quant_conv", "quant_conv"),
    ("post_quant_conv", "post_quant_conv"),
    *_part_names("decoder"),
    ("decoder.up_blocks.{}.resnets", "decoder.up_blocks.{}.resnets"),
    ("decoder.up_blocks.{}.upsamplers.0", "decoder.up_blocks.{}.upsample"),
])


def _sample_size(value, source: str) -> int:
    """diffusers allows a [height, width] sample size; ours is square."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{source}: sample_size {value!r} is not square; only square sizes are supported")
        return value[0]
    return value


def vae_config_from_diffusers(cfg: dict, source: str = "config.json") -> VAEConfig:
    """Translate a diffusers `AutoencoderKL` config.json dict into a `VAEConfig`.

    Raises ValueError naming `source` and the key for block types, activations or latent
    statistics that `AutoencoderKL` does not implement.
    """
    c = {**_DEFAULTS, **{k: v for k, v in cfg.items() if k in _DEFAULTS}}
    levels = len(c["block_out_channels"])
    for key, block in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
        if list(c[key]) != [block] * levels:
            raise ValueError(f"{source}: {key} must be {levels} x {block!r} (one per block_out_channels entry), "
                             f"got {c[key]!r}")
    if c["act_fn"] != "silu":
        raise ValueError(f"{source}: act_fn {c['act_fn']!r} is not supported (only 'silu')")
    for key in ("latents_mean", "latents_std"):
        if c[key] is not None:
            raise ValueError(f"{source}: {key} is not supported (per-channel latent statistics); only "
                             "scaling_factor / shift_factor are")
    fields = dict(in_channels=c["in_channels"], out_channels=c["out_channels"],
                  block_out_channels=list(c["block_out_channels"]), layers_per_block=c["layers_per_block"],
                  latent_channels=c["latent_channels"], norm_num_groups=c["norm_num_groups"],
                  sample_size=_sample_size(c["sample_size"], source), scaling_factor=c["scaling_factor"],
                  shift_factor=c["shift_factor"], use_quant_conv=c["use_quant_conv"],
                  use_post_quant_conv=c["use_post_quant_conv"], mid_block_attention=c["mid_block_add_attention"])
    return build_config(VAEConfig, fields, source, _KEYS)


def diffusers_config_from_vae(config: VAEConfig) -> dict:
    """A diffusers `AutoencoderKL` config.json dict for `config` (every key written explicitly)."""
    levels = len(config.block_out_channels)
    return {
        "_class_name": CLASS_NAME,
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": [DOWN_BLOCK] * levels,
        "up_block_types": [UP_BLOCK] * levels,
        "block_out_channels": list(config.block_out_channels),
        "layers_per_block": config.layers_per_block,
        "act_fn": "silu",
        "latent_channels": config.latent_channels,
        "norm_num_groups": config.norm_num_groups,
        "sample_size": config.sample_size,
        "scaling_factor": config.scaling_factor,
        "shift_factor": config.shift_factor,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": True,
        "use_quant_conv": config.use_quant_conv,
        "use_post_quant_conv": config.use_post_quant_conv,
        "mid_block_add_attention": config.mid_block_attention,
    }


def _current_attention_name(name: str) -> str:
    """`...mid_block.attentions.0.query.weight` (pre-0.14 files) -> `...mid_block.attentions.0.to_q.weight`."""
    head, sep, tail = name.partition(".mid_block.attentions.0.")
    if not sep:
        return name
    module, dot, rest = tail.partition(".")
    return f"{head}{sep}{_LEGACY_ATTENTION.get(module, module)}{dot}{rest}"


def vae_state_from_diffusers(tensors: dict[str, torch.Tensor], model: nn.Module,
                             source: str) -> dict[str, torch.Tensor]:
    """diffusers `AutoencoderKL` tensors -> an `AutoencoderKL` state dict for `model`, checked in the
    file's names first (the legacy attention names are read as their current equivalents).

    Raises `CheckpointMismatchError` naming the tensors that are missing, unexpected or mis-shaped.
    """
    tensors = {_current_attention_name(name): t for name, t in tensors.items()}
    expected = shapes_of(vae_state_to_diffusers(model.state_dict()))
    return state_from_foreign(tensors, expected, source, renamer(DIFFUSERS_VAE_NAMES))


def vae_state_to_diffusers(state: dict[str, torch.Tensor], config: VAEConfig | None = None) -> dict[str, torch.Tensor]:
    """Rename an `AutoencoderKL` state dict to diffusers' current names (`config` is not needed:
    the layout is one to one)."""
    out = {}
    for name, tensor in state.items():
        foreign = DIFFUSERS_VAE_NAMES.to_foreign(name)
        if foreign is None:
            raise KeyError(f"AutoencoderKL tensor {name!r} has no diffusers name")
        out[foreign] = tensor
    return out


VAE_CONVERTER = Converter(
    name="diffusers AutoencoderKL",
    family="vae",
    class_names=(CLASS_NAME,),
    config_from=lambda cfg, weights, source: vae_config_from_diffusers(cfg, source),
    state_from=vae_state_from_diffusers,
    config_to=lambda model, tokenizer: diffusers_config_from_vae(model.config),
    state_to=vae_state_to_diffusers,
)

__all__ = ["DIFFUSERS_VAE_NAMES", "VAE_CONVERTER", "diffusers_config_from_vae", "vae_config_from_diffusers",
           "vae_state_from_diffusers", "vae_state_to_diffusers"]
