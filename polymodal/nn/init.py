"""Weight initialisation for freshly built models (imported checkpoints overwrite it)."""
from __future__ import annotations

import torch.nn as nn


def init_weights(module: nn.Module) -> None:
    """GPT-style init (normal, std 0.02; zero biases) for freshly built decoders; imported
    weights overwrite it."""
    if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d, nn.Conv3d)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)

