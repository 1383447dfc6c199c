"""Token-wise projectors: one linear layer (LLaVA-1) or an MLP with GELU (LLaVA-1.5)."""
from __future__ import annotations

import torch
import torch.nn as nn

from polymodal.projectors.config import ProjectorConfig


class MLPProjector(nn.Module):
    """Maps every vision feature to one LM embedding. features (N, P, Dv) -> (N, P, D_lm).

    depth 1 = LLaVA-1's linear projector; depth 2 = LLaVA-1.5's `linear_1 -> GELU -> linear_2`.
    Hidden layers are `config.intermediate_size` wide (default: the LM width, as in LLaVA).
    """

    def __init__(self, config: ProjectorConfig, vision_dim: int, lm_dim: int):
        super().__init__()
        depth = 1 if config.kind == "linear" else config.mlp_depth
        hidden = config.intermediate_size or lm_dim
        widths = [vision_dim] + [hidden] * (depth - 1) + [lm_dim]
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.GELU()] if i else []
            layers.append(nn.Linear(widths[i], widths[i + 1]))
        self.layers = nn.Sequential(*layers)

    def num_tokens(self, num_patches: int) -> int:
        """LM tokens produced per image with `num_patches` features: one per feature."""
        return num_patches

    def forward(self, features: torch.Tensor, **_unused) -> torch.Tensor:
        return self.layers(features)
