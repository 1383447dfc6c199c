"""The training objective of the image tokenizer (`ImageVQ`), VQGAN's without the perceptual term:

    loss = rec(x_hat, x) + quantizer_weight * quantizer loss  [+ lambda * adversarial]

rec is a mean over pixels, L2 by default: on the shapes world, where objects are ~5% of the
pixels, L1 gives every pixel the same gradient and the background wins (our KL autoencoder
rendered every object in one median color with L1; docs/notes/generation.md). The quantizer loss
is the quantizer's own (codebook + beta * commitment for a VQ codebook, zero for FSQ).

The adversarial term is the KL autoencoder's (`ImageVQObjective` is `VAEObjective` with the
quantizer loss in place of the KL term): a `PatchDiscriminator` switched on after `disc_start`
optimizer steps and trained by its own optimizer, VQGAN's adaptive weight, hinge losses, and the
objective returning {generator: loss, discriminator: loss}.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from polymodal.bounds import check_float
from polymodal.generators.vae_losses import AdversarialLossConfig, VAEObjective, pixels_of, reconstruction_loss


@dataclass
class ImageVQLossConfig(AdversarialLossConfig):
    """Weights of the tokenizer objective (see the module docstring): L2 reconstruction by
    default, quantizer_weight (the multiplier of the quantizer's loss), and the discriminator
    settings of `AdversarialLossConfig`."""

    reconstruction: str = "l2"
    quantizer_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float(type(self).__name__, "quantizer_weight", self.quantizer_weight, 0, math.inf)


class ImageVQObjective(VAEObjective):
    """`objective(model, batch)` for `train`: reconstruction + quantizer_weight * quantizer loss,
    plus the adversarial term when `config.disc_start` is set — `VAEObjective`'s wiring (returns,
    optimizers, `steps_done`, `on_step`) with the quantizer loss in place of the KL term.

    model(pixels) must return an `ImageVQOutput`; batch: pixels (B, C, H, W) in [-1, 1] or
    {"pixel_values": pixels}.
    """

    def __init__(self, config: ImageVQLossConfig | None = None, in_channels: int = 3):
        super().__init__(config or ImageVQLossConfig(), in_channels)

    def base_loss(self, out: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction term, reconstruction + quantizer_weight * quantizer loss)."""
        rec = reconstruction_loss(out.reconstruction, pixels, self.config.reconstruction)
        return rec, rec + self.config.quantizer_weight * out.quantizer_loss


def image_vq_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The default objective without a discriminator: mean L2 + the quantizer loss -> scalar; the
    registry's objective for the image tokenizer family. batch as for `ImageVQObjective`."""
    pixels = pixels_of(batch)
    out = model(pixels)
    return reconstruction_loss(out.reconstruction, pixels, "l2") + out.quantizer_loss


__all__ = ["ImageVQLossConfig", "ImageVQObjective", "image_vq_loss"]
