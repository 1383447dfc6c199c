"""Classifier-free guidance (Ho & Salimans 2022): push a conditional denoiser away from its
unconditional prediction, prediction = uncond + s * (cond - uncond).

The model must have been trained with condition dropout (`objectives.drop_condition`) so that
the null condition gives its unconditional prediction. The guided denoiser is again a plain
denoiser, so every sampler takes it unchanged. Guidance works on any prediction type: the
combination is linear, and every conversion in `objectives` is linear in the prediction.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real
from typing import Any

import torch

from polymodal.errors import ConfigError, UsageError
from polymodal.generators.diffusion.objectives import Denoiser


class ClassifierFreeGuidance:
    """A denoiser that runs `denoiser` on the condition and on the null condition in ONE forward
    of batch 2B and returns uncond + guidance * (cond - uncond), shape (B, ...).

    guidance: the scale s >= 0; 1 is the conditional model (one forward of batch B, no null
    half), 0 the unconditional one, > 1 stronger adherence to the condition.
    null_cond: {name: null value} for the condition keywords to replace, each broadcastable to the
    condition's shape (a null class id, a (D,) or (L, D) null embedding, or a full (B, ...) batch).
    Called as guided(x_t (B, ...), t (B,), **cond): tensor conditions not in null_cond (such as a
    resolution) must have batch B and go to both halves; non-tensor keywords pass through as they are.
    """

    def __init__(self, denoiser: Denoiser, guidance: float, null_cond: Mapping[str, Any]) -> None:
        if isinstance(guidance, bool) or not isinstance(guidance, Real) or not (
                math.isfinite(guidance) and guidance >= 0):
            raise ConfigError(f"guidance must be a finite number >= 0 (1 = the conditional model, no guidance), "
                              f"got {guidance!r}")
        self.denoiser, self.guidance, self.null_cond = denoiser, float(guidance), dict(null_cond)

    def _null(self, name: str, value: torch.Tensor) -> torch.Tensor:
        null = torch.as_tensor(self.null_cond[name], dtype=value.dtype, device=value.device)
        try:
            return null.broadcast_to(value.shape)
        except RuntimeError:
            raise UsageError(f"guidance: null_cond[{name!r}] of shape {tuple(null.shape)} does not broadcast to "
                             f"the condition's shape {tuple(value.shape)}") from None

    def _conditions(self, batch: int, cond: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(unconditional keywords for batch B, both halves concatenated for batch 2B)."""
        missing = sorted(set(self.null_cond) - set(cond))
        if missing:
            raise UsageError(f"guidance: null_cond names {missing}, which the call does not pass")
        uncond, both = {}, {}
        for name, value in cond.items():
            if not isinstance(value, torch.Tensor):
                uncond[name] = both[name] = value
                continue
            if value.ndim == 0 or value.shape[0] != batch:
                raise UsageError(f"guidance: condition {name!r} must have batch size {batch} first, "
                                 f"got shape {tuple(value.shape)}")
            uncond[name] = self._null(name, value) if name in self.null_cond else value
            both[name] = torch.cat([value, uncond[name]])
        return uncond, both

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        """The guided prediction (B, ...) for x_t (B, ...) at t (B,)."""
        if self.guidance == 1.0:
            return self.denoiser(x_t, t, **cond)
        uncond, both = self._conditions(x_t.shape[0], cond)
        if self.guidance == 0.0:
            return self.denoiser(x_t, t, **uncond)
        conditional, unconditional = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), **both).chunk(2)
        return unconditional + self.guidance * (conditional - unconditional)
