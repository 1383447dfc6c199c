"""Weight initialisation for freshly built models (imported checkpoints overwrite it)."""
from __future__ import annotations

import torch.nn as nn


def init_weights(module: nn.Module) -> None:
    """GPT-style init (normal, std 0.02; zero biases) of a freshly built decoder's linear and
    embedding layers; imported weights overwrite it."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
