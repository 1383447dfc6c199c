"""The one table of modality encoders every family builds its towers from.

A family config names its tower (`ContrastiveConfig.image_tower: cnn`, `MMLLMConfig.vision_tower:
gridpool`) and holds the tower's own config in the field the table gives (`cnn`, `gridpool`,
`vision` for the ViT, ...). The table says how to build the tower, how wide its features are,
and what it hands on: a pooled vector (contrastive towers) and/or a token grid (what an MM-LLM's
projector reads). Audio and video encoders join the same table later.

Every image encoder takes (B, C, H, W) pixels and returns an object with `last_hidden_state`
(B, N, D) and `pooler_output` (B, D) or None; every text encoder takes (input_ids, attention_mask)
and returns the same two.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from polymodal.encoders.bert import BertConfig, BertEncoder
from polymodal.encoders.convnet import ConvNet, ConvNetConfig
from polymodal.encoders.efficientnet import EfficientNetConfig, EfficientNetTower
from polymodal.encoders.gridpool import GridPoolConfig, GridPoolConvNet
from polymodal.encoders.text import TextEncoderConfig, TextTransformer
from polymodal.encoders.vit import ViTConfig, VisionTransformer
from polymodal.errors import ConfigError


@dataclass(frozen=True)
class EncoderSpec:
    """One encoder of the table.

    name: what configs call it; modality: "image" or "text"; field: the family-config field
    holding its config; config_cls: that config's class; build: config -> module;
    width: config -> feature width; pooled / tokens: whether it gives a pooled vector / a
    token grid. grid (image encoders with tokens): config -> tokens per side at `image_size`.
    """

    name: str
    modality: str
    field: str
    config_cls: type
    build: Callable[[Any], nn.Module]
    width: Callable[[Any], int]
    pooled: bool
    tokens: bool
    grid: Callable[[Any], int] | None = None


def _efficientnet(config: EfficientNetConfig) -> nn.Module:
    if config.num_classes:
        raise ConfigError("efficientnet.num_classes must be 0 for an encoder (a feature tower has no classifier): "
                          f"set it to 0, got {config.num_classes}")
    return EfficientNetTower(config)


def _text_width(config: TextEncoderConfig) -> int:
    return (config.projection_size or config.hidden_size) if config.head else config.hidden_size


ENCODERS: dict[str, EncoderSpec] = {spec.name: spec for spec in (
    EncoderSpec("vit", "image", "vision", ViTConfig, VisionTransformer, lambda c: c.hidden_size,
                pooled=True, tokens=True, grid=lambda c: c.grid),
    EncoderSpec("cnn", "image", "cnn", ConvNetConfig, ConvNet, lambda c: c.hidden_size,
                pooled=True, tokens=True, grid=lambda c: c.grid),
    EncoderSpec("gridpool", "image", "gridpool", GridPoolConfig, GridPoolConvNet, lambda c: c.hidden_size,
                pooled=False, tokens=True, grid=lambda c: c.grid),
    EncoderSpec("efficientnet_lite0", "image", "efficientnet", EfficientNetConfig, _efficientnet,
                lambda c: c.head_channels, pooled=True, tokens=False),
    EncoderSpec("transformer", "text", "text", TextEncoderConfig, TextTransformer, _text_width,
                pooled=True, tokens=True),
    EncoderSpec("bert", "text", "bert", BertConfig, BertEncoder, lambda c: c.hidden_size, pooled=True, tokens=True),
)}


def encoder_spec(name: str, modality: str, where: str, needs: str | None = None) -> EncoderSpec:
    """The table entry `name`, checked to be of `modality` (and to give `needs`: "pooled" or
    "tokens"); a `ConfigError` naming the config field `where` lists the fitting encoders."""
    fitting = [s.name for s in ENCODERS.values() if s.modality == modality and (needs is None or getattr(s, needs))]
    if name not in fitting:
        what = f"{modality} encoder" + (f" with {needs} output" if needs else "")
        raise ConfigError(f"{where} must name a {what}: one of {fitting}, got {name!r}")
    return ENCODERS[name]


def encoder_config(family_config: Any, spec: EncoderSpec) -> Any:
    """The encoder's config inside a family config (its `spec.field`)."""
    if not hasattr(family_config, spec.field):
        raise ConfigError(f"{type(family_config).__name__} has no `{spec.field}` field for the {spec.name} encoder")
    return getattr(family_config, spec.field)


def build_encoder(family_config: Any, spec: EncoderSpec) -> tuple[nn.Module, int]:
    """(the encoder module, its feature width), built from the family config's field."""
    config = encoder_config(family_config, spec)
    return spec.build(config), spec.width(config)
