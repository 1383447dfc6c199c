"""A tiny char-level LM family (with dropout and tied weights) registered for the training tests."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from polymodal.models.registry import Family, register

FAMILY = "test_tiny_lm_train"


@dataclass
class TinyLMConfig:
    """Sizes of the test LM."""

    vocab: int = 11
    dim: int = 16
    dropout: float = 0.2


class TinyLM(nn.Module):
    """Embedding -> LayerNorm -> MLP with dropout -> tied LM head. ids (B, T) -> logits (B, T, V)."""

    family = FAMILY

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.dim)
        self.norm = nn.LayerNorm(config.dim)
        self.mlp = nn.Sequential(nn.Linear(config.dim, 2 * config.dim), nn.GELU(),
                                 nn.Dropout(config.dropout), nn.Linear(2 * config.dim, config.dim))
        self.head = nn.Linear(config.dim, config.vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)  # (B, T, C)
        x = x + self.mlp(self.norm(x))
        return self.head(x)  # (B, T, V)


register(Family(name=FAMILY, config_cls=TinyLMConfig, build=TinyLM, tiny=TinyLMConfig,
                example_batch=lambda model: {"ids": torch.randint(0, model.config.vocab, (2, 5))}))


def _next_token_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ids[:, 1:] from ids[:, :-1]."""
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.fixture
def sequences() -> torch.Tensor:
    """48 counting sequences mod 11 with random starts: (48, 9) int64, learnable by the tiny LM."""
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 11, (48, 1), generator=gen)
    return (starts + torch.arange(9)) % 11


def _make_model(seed: int) -> TinyLM:
    """A fresh TinyLM initialised from `seed`."""
    torch.manual_seed(seed)
    return TinyLM(TinyLMConfig())


@pytest.fixture
def make_model():
    """Factory: seed -> freshly initialised TinyLM."""
    return _make_model


@pytest.fixture
def lm_loss():
    """The next-token loss_fn(model, ids) for TinyLM."""
    return _next_token_loss
