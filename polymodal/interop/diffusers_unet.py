"""diffusers `UNet2DConditionModel` folders <-> `UNetConfig` and `UNet` weights.

A folder is config.json (`"_class_name": "UNet2DConditionModel"`) plus
diffusion_pytorch_model.safetensors. Supported: the Stable Diffusion 1.x / 2.x layout, i.e.
down blocks CrossAttnDownBlock2D / DownBlock2D, the mid block UNetMidBlock2DCrossAttn, up blocks
CrossAttnUpBlock2D / UpBlock2D, positional timestep features, optional class labels added to the
time embedding. Everything else (SDXL's added text/time embeddings, other block types,
scale-shift resnets, ...) is refused by the key or block type that asks for it.

Two diffusers naming facts worth knowing:
- `attention_head_dim` holds the number of *heads* per level (a historical misnomer that
  diffusers keeps for old configs; its `num_attention_heads` key is refused by diffusers itself).
- `upcast_attention` (Stable Diffusion 2.1) only changes half-precision numerics (scores in
  float32); it is accepted and not carried, so export writes the default.
Unknown config keys are ignored, as diffusers ignores them.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from polymodal.generators.unet import UNetConfig
from polymodal.interop.converters import build_config
from polymodal.interop.namemap import shapes_of, state_from_foreign

CLASS_NAME = "UNet2DConditionModel"
MID_BLOCK = "UNetMidBlock2DCrossAttn"
DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # type -> carries transformers
UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}

# Keys that select a feature we do not implement: accepted only at the value(s) listed.
_FIXED = {
    "center_input_sample": (False,),
    "act_fn": ("silu",),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,),
    "num_attention_heads": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "class_embed_type": (None,),
    "class_embeddings_concat": (False,),
    "projection_class_embeddings_input_dim": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
}
# UNetConfig field -> the config.json key it comes from (for error messages).
_KEYS = {"norm_groups": "norm_num_groups", "num_heads": "attention_head_dim",
         "down_cross_attention": "down_block_types", "up_cross_attention": "up_block_types"}
_DEFAULT_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_DEFAULT_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

# (diffusers, ours) module-path segments; every other name is the same on both sides.
_SEGMENTS = (
    ("time_embedding.linear_1", "time_embedding.fc1"),
    ("time_embedding.linear_2", "time_embedding.fc2"),
    ("to_q", "q_proj"),
    ("to_k", "k_proj"),
    ("to_v", "v_proj"),
    ("to_out.0", "o_proj"),
    ("ff.net.0.proj", "ff.proj"),
    ("ff.net.2", "ff.out"),
    ("downsamplers.0", "downsample"),
    ("upsamplers.0", "upsample"),
)


def _swap_segments(name: str, pairs: tuple[tuple[str, str], ...]) -> str:
    """`name` with each whole dotted segment run `a` of (a, b) in `pairs` replaced by `b`."""
    padded = f".{name}."
    for old, new in pairs:
        padded = padded.replace(f".{old}.", f".{new}.")
    return padded[1:-1]


def unet_name_to_ours(name: str) -> str:
    """Our `UNet` tensor name for a diffusers `UNet2DConditionModel` tensor name."""
    return _swap_segments(name, _SEGMENTS)


def unet_name_to_diffusers(name: str) -> str:
    """The diffusers tensor name for one of our `UNet` tensor names."""
    return _swap_segments(name, tuple((ours, theirs) for theirs, ours in _SEGMENTS))


def _per_block(cfg: dict, key: str, default, levels: int, source: str) -> list:
    """A per-level value of config.json as a list of `levels` items (a scalar applies to every level)."""
    value = cfg.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ValueError(f"{source}: {key} has {len(value)} entries for {levels} down blocks")
        return list(value)
    return [value] * levels


def _block_flags(types, known: dict[str, bool], key: str, source: str) -> list[bool]:
    """Which blocks of `types` carry transformers; a ValueError names an unsupported block type."""
    if not isinstance(types, (list, tuple)):
        raise ValueError(f"{source}: {key} must be a list of block types, got {types!r}")
    for kind in types:
        if kind not in known:
            raise ValueError(f"{source}: {key} entry {kind!r} is not a supported block type (supported: "
                             f"{sorted(known)})")
    return [known[kind] for kind in types]


def unet_config_from_diffusers(cfg: dict, source: str = "config.json") -> UNetConfig:
    """Translate a diffusers `UNet2DConditionModel` config.json dict into a `UNetConfig`.

    Raises ValueError naming `source` and the key (or block type) that asks for an unsupported
    feature; values out of bounds become a `CheckpointError` from `build_config`.
    """
    class_name = cfg.get("_class_name", CLASS_NAME)
    if class_name != CLASS_NAME:
        raise ValueError(f"{source}: _class_name {class_name!r} is not {CLASS_NAME!r}")
    for key, allowed in _FIXED.items():
        value = cfg.get(key, allowed[0])
        if isinstance(value, list) and key == "only_cross_attention":
            value = any(value)  # per-level flags: all must be off
        if value not in allowed:
            raise ValueError(f"{source}: {key}={value!r} is not supported (only {allowed[0]!r})")
    mid = cfg.get("mid_block_type", MID_BLOCK)
    if mid != MID_BLOCK:
        raise ValueError(f"{source}: mid_block_type {mid!r} is not a supported block type (supported: {MID_BLOCK!r})")
    down = _block_flags(cfg.get("down_block_types", _DEFAULT_DOWN), DOWN_BLOCKS, "down_block_types", source)
    up = _block_flags(cfg.get("up_block_types", _DEFAULT_UP), UP_BLOCKS, "up_block_types", source)
    levels = len(down)
    if len(up) != levels:
        raise ValueError(f"{source}: {len(up)} up_block_types for {levels} down_block_types")
    widths = _per_block(cfg, "block_out_channels", [320, 640, 1280, 1280], levels, source)
    if cfg.get("time_embedding_dim") not in (None, 4 * widths[0]):
        raise ValueError(f"{source}: time_embedding_dim={cfg['time_embedding_dim']!r} is not supported (only "
                         f"4 * block_out_channels[0] = {4 * widths[0]})")
    cross_dims = set(_per_block(cfg, "cross_attention_dim", 1280, levels, source))
    if len(cross_dims) != 1:
        raise ValueError(f"{source}: cross_attention_dim differs between blocks {sorted(cross_dims)}; only one "
                         "context width is supported")
    fields = dict(
        in_channels=cfg.get("in_channels", 4),
        out_channels=cfg.get("out_channels", 4),
        block_out_channels=widths,
        down_cross_attention=down,
        up_cross_attention=up,
        layers_per_block=_per_block(cfg, "layers_per_block", 2, levels, source),
        transformer_layers_per_block=_per_block(cfg, "transformer_layers_per_block", 1, levels, source),
        num_heads=_per_block(cfg, "attention_head_dim", 8, levels, source),
        cross_attention_dim=cross_dims.pop(),
        use_linear_projection=cfg.get("use_linear_projection", False),
        norm_groups=cfg.get("norm_num_groups", 32),
        norm_eps=cfg.get("norm_eps", 1e-5),
        flip_sin_to_cos=cfg.get("flip_sin_to_cos", True),
        freq_shift=cfg.get("freq_shift", 0),
        downsample_padding=cfg.get("downsample_padding", 1),
        mid_block_scale_factor=cfg.get("mid_block_scale_factor", 1.0),
        num_class_embeds=cfg.get("num_class_embeds"),
        dropout=cfg.get("dropout", 0.0),
        sample_size=cfg.get("sample_size"),
    )
    return build_config(UNetConfig, fields, source, _KEYS)


def diffusers_config_from_unet(config: UNetConfig) -> dict:
    """A diffusers `UNet2DConditionModel` config.json dict for `config` (every UNetConfig has one)."""
    c = config
    return {
        "_class_name": CLASS_NAME,
        "sample_size": c.sample_size,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "flip_sin_to_cos": c.flip_sin_to_cos,
        "freq_shift": c.freq_shift,
        "down_block_types": [next(k for k, v in DOWN_BLOCKS.items() if v == flag) for flag in c.down_cross_attention],
        "mid_block_type": MID_BLOCK,
        "up_block_types": [next(k for k, v in UP_BLOCKS.items() if v == flag) for flag in c.up_cross_attention],
        "block_out_channels": list(c.block_out_channels),
        "layers_per_block": list(c.layers_per_block),
        "transformer_layers_per_block": list(c.transformer_layers_per_block),
        "attention_head_dim": list(c.num_heads),  # heads, despite the key's name (see the module docstring)
        "cross_attention_dim": c.cross_attention_dim,
        "use_linear_projection": c.use_linear_projection,
        "norm_num_groups": c.norm_groups,
        "norm_eps": c.norm_eps,
        "downsample_padding": c.downsample_padding,
        "mid_block_scale_factor": c.mid_block_scale_factor,
        "num_class_embeds": c.num_class_embeds,
        "dropout": c.dropout,
        "act_fn": "silu",
    }


def unet_state_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a `UNet` state dict to diffusers' `UNet2DConditionModel` tensor names."""
    return {unet_name_to_diffusers(name): tensor for name, tensor in state.items()}


def unet_state_from_diffusers(tensors: Mapping[str, torch.Tensor], model: nn.Module,
                              source: str) -> dict[str, torch.Tensor]:
    """diffusers `UNet2DConditionModel` tensors -> a state dict for `model`, checked in diffusers'
    names first (`CheckpointMismatchError` naming missing, unexpected or mis-shaped tensors)."""
    expected = shapes_of(unet_state_to_diffusers(model.state_dict()))
    return state_from_foreign(tensors, expected, source, lambda name, t: {unet_name_to_ours(name): t})
