"""Chameleon's image tokenizer (transformers' `ChameleonVQVAE`, the `model.vqmodel.*` weights of a
`ChameleonForConditionalGeneration` folder) -> an encoder-only `ImageVQ`.

transformers ships the VQGAN's encoder, codebook, quant_conv and post_quant_conv, not its decoder,
so the imported tokenizer has `has_decoder=False`: it encodes images to codes, and `decode` says
why it cannot. Config keys, defaults and formulas follow transformers' `ChameleonVQVAEConfig` and
`modeling_chameleon` (5.x):
- levels: width base_channels * channel_multiplier[i]; num_res_blocks ResBlocks per level; a
  one-head self-attention (1x1 conv q/k/v/proj_out, scale channels ** -0.5) after each ResBlock
  of a level whose side `resolution / 2**i` is in attn_resolutions, and in the mid block, both
  only with attn_type "vanilla"; GroupNorm(32, eps 1e-6) everywhere; 2x downsampling by a
  stride-2 3x3 conv after right/bottom zero padding.
- latents: conv_out -> latent_channels, quant_conv (1x1) -> embed_dim, nearest of num_embeddings
  codebook vectors by squared L2 distance.
Names map one to one but for `down.{i}.block` -> `down_blocks.{i}.resnets`, `nin_shortcut` ->
`conv_shortcut`, `mid.block_1/attn_1/block_2` -> `mid_block.resnets.0/attention/resnets.1`,
`attn.{j}.norm/q/k/v/proj_out` -> `attentions.{j}.group_norm/attn.q_proj/k_proj/v_proj/o_proj`
(the 1x1 conv kernels (C, C, 1, 1) become our linear weights (C, C)) and `quantize.embedding` ->
`quantizer.embedding`.

Refused, each with a one-line error naming the key: double_latent=true (its conv_out would not
fit quant_conv), a channel_multiplier not starting at 1 (our conv_in is as wide as the first
level) and attn_type values other than "vanilla" or none. Not carried: dropout (the tokenizer is
frozen). No registry wiring here: the unified family's converter calls these functions.
"""
from __future__ import annotations

from typing import Mapping

import torch

from polymodal.checkpoint import CheckpointMismatchError
from polymodal.errors import ConfigError
from polymodal.interop.converters import build_config
from polymodal.interop.namemap import NameMap, shapes_of, state_from_foreign
from polymodal.tokenizers.image_vq import ImageVQ, ImageVQConfig

# ChameleonVQVAEConfig's defaults, for keys a config.json leaves out.
_DEFAULTS = dict(embed_dim=256, num_embeddings=8192, double_latent=False, latent_channels=256, resolution=512,
                 in_channels=3, base_channels=128, channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=2,
                 attn_resolutions=None, attn_type="vanilla", beta=0.25)
_GROUPS = 32  # transformers hard-codes GroupNorm(num_groups=32) in the Chameleon VQGAN
# ImageVQConfig fields whose vq_config key differs (for error messages).
_KEYS = {"codebook_size": "num_embeddings", "layers_per_block": "num_res_blocks", "image_size": "resolution",
         "block_out_channels": "channel_multiplier"}


def _attention_names(foreign: str, ours: str) -> list[tuple[str, str]]:
    return [(f"{foreign}.norm", f"{ours}.group_norm"), (f"{foreign}.q", f"{ours}.attn.q_proj"),
            (f"{foreign}.k", f"{ours}.attn.k_proj"), (f"{foreign}.v", f"{ours}.attn.v_proj"),
            (f"{foreign}.proj_out", f"{ours}.attn.o_proj")]


# First match wins, so the shortcut rule comes before the whole-block rule it refines.
CHAMELEON_VQ_NAMES = NameMap([
    ("encoder.conv_in", "encoder.conv_in"),
    ("encoder.down.{}.block.{}.nin_shortcut", "encoder.down_blocks.{}.resnets.{}.conv_shortcut"),
    ("encoder.down.{}.block", "encoder.down_blocks.{}.resnets"),
    *_attention_names("encoder.down.{}.attn.{}", "encoder.down_blocks.{}.attentions.{}"),
    ("encoder.down.{}.downsample", "encoder.down_blocks.{}.downsample"),
    ("encoder.mid.block_1", "encoder.mid_block.resnets.0"),
    ("encoder.mid.block_2", "encoder.mid_block.resnets.1"),
    *_attention_names("encoder.mid.attn_1", "encoder.mid_block.attention"),
    ("encoder.norm_out", "encoder.norm_out"),
    ("encoder.conv_out", "encoder.conv_out"),
    ("quant_conv", "quant_conv"),
    ("quantize.embedding", "quantizer.embedding"),
    ("post_quant_conv", "post_quant_conv"),
])
_LINEAR_FROM_CONV = (".attn.q_proj.weight", ".attn.k_proj.weight", ".attn.v_proj.weight", ".attn.o_proj.weight")


def chameleon_vq_config(vq_config: dict, image_size: int | None = None, source: str = "vq_config") -> ImageVQConfig:
    """An encoder-only `ImageVQConfig` for a ChameleonVQVAEConfig dict (the `vq_config` of a
    ChameleonConfig). image_size: the side the tokenizer is used at (default: the config's
    `resolution`); attention stays on the levels Chameleon puts it on whatever the size.

    Raises `ConfigError` for the settings the module docstring lists as refused, and
    `CheckpointError` (naming the key) for values out of `ImageVQConfig`'s bounds.
    """
    cfg = {**_DEFAULTS, **vq_config}
    if cfg["double_latent"]:
        raise ConfigError(f"{source}: double_latent=true is not supported (the encoder's conv_out would not fit "
                          "quant_conv)")
    multipliers = list(cfg["channel_multiplier"])
    if not multipliers or multipliers[0] != 1:
        raise ConfigError(f"{source}: channel_multiplier {multipliers!r} must start at 1 (conv_in is as wide as "
                          "the first level)")
    attn_type = cfg["attn_type"]
    if attn_type not in ("vanilla", None, "none"):
        raise ConfigError(f"{source}: attn_type {attn_type!r} is not supported (only 'vanilla' or none)")
    attention = attn_type == "vanilla"
    resolution = cfg["resolution"]
    size = resolution if image_size is None else image_size
    # The levels Chameleon gives attention, named by their side at our image_size.
    sides = set(cfg["attn_resolutions"] or ()) if attention else set()
    levels = [i for i in range(len(multipliers)) if resolution // 2 ** i in sides]
    return build_config(ImageVQConfig, dict(
        in_channels=cfg["in_channels"],
        image_size=size,
        block_out_channels=[cfg["base_channels"] * m for m in multipliers],
        layers_per_block=cfg["num_res_blocks"],
        attn_resolutions=[size // 2 ** i for i in levels],
        mid_block_attention=attention,
        norm_num_groups=_GROUPS,
        latent_channels=cfg["latent_channels"],
        embed_dim=cfg["embed_dim"],
        quantizer="vq",
        codebook_size=cfg["num_embeddings"],
        beta=float(cfg["beta"]),
        has_decoder=False,
    ), source, _KEYS)


def _rename(prefix: str):
    def rename(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        ours = CHAMELEON_VQ_NAMES.to_ours(name[len(prefix):])
        if ours is None:
            raise CheckpointMismatchError(f"Chameleon checkpoint: unexpected tensor {name} (no image tokenizer "
                                          "weight has that name)")
        if ours.endswith(_LINEAR_FROM_CONV):
            tensor = tensor.reshape(tensor.shape[:2])  # 1x1 conv (C, C, 1, 1) -> linear (C, C)
        return {ours: tensor}
    return rename


def _expected(config: ImageVQConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    """{transformers name: shape} of every tensor the encoder-only `ImageVQ(config)` loads."""
    with torch.device("meta"):
        probe = ImageVQ(config)
    expected = {}
    for name, shape in shapes_of(probe.state_dict()).items():
        foreign = CHAMELEON_VQ_NAMES.to_foreign(name)
        if foreign is None:
            raise ConfigError(f"chameleon_vq_state: {name} of this ImageVQConfig has no Chameleon counterpart "
                              "(give the config chameleon_vq_config made)")
        expected[prefix + foreign] = shape + (1, 1) if name.endswith(_LINEAR_FROM_CONV) else shape
    return expected


def chameleon_vq_state(hf_state: Mapping[str, torch.Tensor], prefix: str = "model.vqmodel.", *,
                       config: ImageVQConfig | None = None,
                       source: str = "Chameleon checkpoint") -> dict[str, torch.Tensor]:
    """The `ImageVQ` state dict (our names) of the Chameleon tokenizer tensors in `hf_state`.

    hf_state: {transformers name: tensor} (real, or meta stand-ins for a dry run); only names
    starting with `prefix` are read ("model.vqmodel." in a ChameleonForConditionalGeneration, ""
    for a bare ChameleonVQVAE). With `config` (from `chameleon_vq_config`), every missing,
    unexpected or mis-shaped tensor is named, in transformers' names, before anything is renamed;
    without it, a tensor with no counterpart is refused and missing ones surface when loading.
    Raises `CheckpointMismatchError` naming `source`.
    """
    def ignore(name: str) -> bool:
        return not name.startswith(prefix)

    if config is None:
        state: dict[str, torch.Tensor] = {}
        rename = _rename(prefix)
        for name, tensor in hf_state.items():
            if not ignore(name):
                state.update(rename(name, tensor))
        if not state:
            raise CheckpointMismatchError(f"{source}: no tensor starts with {prefix!r}: no Chameleon image tokenizer")
        return state
    try:
        return state_from_foreign(hf_state, _expected(config, prefix), source, _rename(prefix), ignore)
    except CheckpointMismatchError as err:  # one line: the report's sections joined
        raise CheckpointMismatchError(" ".join(line.strip() for line in str(err).splitlines())) from None


__all__ = ["CHAMELEON_VQ_NAMES", "chameleon_vq_config", "chameleon_vq_state"]
