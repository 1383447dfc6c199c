"""Family `image_vq`: the VQGAN-style image tokenizer (`polymodal.tokenizers.image_vq.ImageVQ`).

Trained alone on shapes-world images (`configs/image_vq/world.yaml`), then frozen inside a
unified (Chameleon-style) model as its `image_tokenizer` part; Chameleon's encoder-only tokenizer
imports through `polymodal.interop.hf_chameleon_vq` (called by the unified family's converter).
"""
from __future__ import annotations

import torch

from polymodal.models.registry import Family, Recipe, register
from polymodal.tokenizers.image_vq import ImageVQ, ImageVQConfig, image_vq_tiny


def _example_batch(model: ImageVQ) -> torch.Tensor:
    size = model.config.image_size
    return torch.rand(2, model.config.in_channels, size, size) * 2 - 1


IMAGE_VQ = register(Family(
    "image_vq", ImageVQConfig, ImageVQ, image_vq_tiny, _example_batch,
    objective="polymodal.tokenizers.image_vq_losses:image_vq_loss",
    recipes=(Recipe("image_vq", "polymodal.recipes.image_vq:ImageVQRecipeConfig",
                    "polymodal.recipes.image_vq:image_vq_job", outputs=("eval.json", "reconstructions.png")),),
    evaluate="polymodal.eval.image_tokenizer:evaluate",
))
