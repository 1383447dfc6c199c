"""The `vit` family: a Vision Transformer image encoder (CLIP-ViT / SigLIP layouts)."""
from __future__ import annotations

import torch

from polymodal.encoders.vit import ViTConfig, VisionTransformer
from polymodal.models.registry import Family, register


def vit_tiny() -> ViTConfig:
    """A 2-layer 32 px ViT for unit tests."""
    return ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)


def siglip_tiny() -> ViTConfig:
    """A 2-layer SigLIP-layout ViT (no class token, post-norm on all tokens, MAP pooling)."""
    return ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                     act="gelu_tanh", norm_eps=1e-6, class_token=False, pre_norm=False, post_norm="all", pool="map",
                     patch_bias=True)


def _example_batch(model: VisionTransformer) -> dict:
    size = model.config.image_size
    return {"pixel_values": torch.randn(2, model.config.num_channels, size, size)}


# A tower that other families compose; on its own it has no objective and serves no task.
VIT = register(Family("vit", ViTConfig, VisionTransformer, vit_tiny, _example_batch, objective=None,
                      converters=("polymodal.interop.hf_vit:HF_VIT_CONVERTER",)))
