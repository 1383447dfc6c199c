"""Input projectors: vision features (N, P, Dv) -> LM embeddings (N, K, D_lm).

Every projector takes `(config: ProjectorConfig, vision_dim, lm_dim)`, offers
`num_tokens(num_patches) -> K` and `forward(features, **optional_text_inputs)`.
"""
from __future__ import annotations

import importlib

import torch.nn as nn

from polymodal.projectors.config import ProjectorConfig

# kind -> "module:Class"; imported lazily so each projector lives in its own module.
PROJECTORS = {
    "linear": "polymodal.projectors.mlp:MLPProjector",
    "mlp": "polymodal.projectors.mlp:MLPProjector",
    "resampler": "polymodal.projectors.resampler:ResamplerProjector",
    "qformer": "polymodal.projectors.qformer:QFormerProjector",
}


def build_projector(config: ProjectorConfig, vision_dim: int, lm_dim: int) -> nn.Module:
    """The projector named by `config.kind`."""
    if config.kind not in PROJECTORS:
        raise ValueError(f"projector kind must be one of {sorted(PROJECTORS)}, got {config.kind!r}")
    module, cls = PROJECTORS[config.kind].split(":")
    return getattr(importlib.import_module(module), cls)(config, vision_dim, lm_dim)


__all__ = ["PROJECTORS", "ProjectorConfig", "build_projector"]
