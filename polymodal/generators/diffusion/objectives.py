"""What a denoiser predicts, how predictions convert, the training loss, and condition dropout.

With x_t = alpha x0 + sigma noise (see `schedules`), a denoiser may predict
- "epsilon": the noise (Ho et al. 2020);
- "sample": x0 itself;
- "v_prediction": v = alpha noise - sigma x0 (Salimans & Ho 2022);
- "velocity": the flow-matching velocity noise - x0 (Lipman et al. 2022; Liu et al. 2022),
  the time derivative of x_t = (1 - t) x0 + t noise.
Any of them together with x_t determines both x0 and the noise, so samplers work on (x0, noise)
and never on a particular parametrisation. The conversions below hold for any (alpha, sigma);
they do not assume alpha^2 + sigma^2 = 1.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from polymodal.errors import ConfigError, UsageError
from polymodal.generators.diffusion.schedules import DiffusionProcess, gaussian_noise

CONVERTIBLE_TYPES = ("epsilon", "sample", "v_prediction", "velocity")
Denoiser = Callable[..., torch.Tensor]  # denoiser(x_t (B, ...), t (B,) float, **cond) -> (B, ...)
Coefficient = torch.Tensor | float


def _check_type(name: str, value: str) -> None:
    if value not in CONVERTIBLE_TYPES:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, CONVERTIBLE_TYPES))}, got {value!r}")


def prediction_from(x0: torch.Tensor, noise: torch.Tensor, alpha: Coefficient, sigma: Coefficient,
                    prediction_type: str) -> torch.Tensor:
    """The prediction of type `prediction_type` that corresponds to (x0, noise): the training target.

    x0, noise: (B, ...); alpha, sigma: floats or tensors broadcastable to them."""
    _check_type("prediction_type", prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return alpha * noise - sigma * x0
    return noise - x0


def x0_and_noise(prediction: torch.Tensor, x_t: torch.Tensor, alpha: Coefficient, sigma: Coefficient,
                 prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, noise) implied by a prediction of `prediction_type` at x_t = alpha x0 + sigma noise.

    prediction, x_t: (B, ...); alpha, sigma broadcastable. epsilon needs alpha > 0 and sample
    needs sigma > 0 (at the pure-noise or the clean end the other half is undetermined)."""
    _check_type("prediction_type", prediction_type)
    if prediction_type == "epsilon":
        return (x_t - sigma * prediction) / alpha, prediction
    if prediction_type == "sample":
        return prediction, (x_t - alpha * prediction) / sigma
    if prediction_type == "v_prediction":
        # alpha x_t - sigma v = (alpha^2 + sigma^2) x0 and sigma x_t + alpha v = (alpha^2 + sigma^2) noise
        norm = alpha * alpha + sigma * sigma
        return (alpha * x_t - sigma * prediction) / norm, (sigma * x_t + alpha * prediction) / norm
    # velocity: noise = v + x0 gives x_t = (alpha + sigma) x0 + sigma v
    total = alpha + sigma
    return (x_t - sigma * prediction) / total, (x_t + alpha * prediction) / total


def convert_prediction(prediction: torch.Tensor, x_t: torch.Tensor, alpha: Coefficient, sigma: Coefficient,
                       from_type: str, to_type: str) -> torch.Tensor:
    """Re-express a `from_type` prediction at x_t as a `to_type` prediction; shapes as `x0_and_noise`."""
    _check_type("to_type", to_type)
    x0, noise = x0_and_noise(prediction, x_t, alpha, sigma, from_type)
    return prediction_from(x0, noise, alpha, sigma, to_type)


def diffusion_loss(denoiser: Denoiser, x0: torch.Tensor, process: DiffusionProcess,
                   cond: Mapping[str, Any] | None = None, *, generator: torch.Generator | None = None,
                   t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The mean-squared error between the denoiser's output and its target; a float32 scalar.

    x0: (B, C, H, W...) clean data (pixels or latents). Draws t with `process.sample_time` and
    noise ~ N(0, I) (from `generator` when given; or pass `t` (B,) and `noise` (B, ...) to fix
    them), forms x_t = alpha x0 + sigma noise, calls denoiser(x_t, process.model_time(t), **cond)
    and compares with the target of `process.prediction_type` (the noise, x0, v, or the flow
    velocity noise - x0). Unweighted: every timestep's term counts equally (Ho et al.'s L_simple).
    """
    batch = x0.shape[0]
    if t is None:
        t = process.sample_time(batch, generator, x0.device)
    if noise is None:
        noise = gaussian_noise(tuple(x0.shape), generator, x0.device, x0.dtype)
    if noise.shape != x0.shape or t.shape != (batch,):
        raise UsageError(f"diffusion_loss: noise must have x0's shape {tuple(x0.shape)} and t shape ({batch},), "
                         f"got noise {tuple(noise.shape)} and t {tuple(t.shape)}")
    alpha, sigma = process.coefficients(t, x0)
    x_t = alpha * x0 + sigma * noise
    prediction = denoiser(x_t, process.model_time(t).to(x0.device), **(cond or {}))
    if prediction.shape != x_t.shape:
        raise UsageError(f"diffusion_loss: the denoiser returned shape {tuple(prediction.shape)}, "
                         f"expected x_t's shape {tuple(x_t.shape)}")
    target = prediction_from(x0, noise, alpha, sigma, process.prediction_type)
    return F.mse_loss(prediction.float(), target.float())


def condition_drop_mask(batch: int, p: float, generator: torch.Generator | None = None,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """(B,) bool mask, each entry True with probability p: the rows whose condition is dropped."""
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"p (the condition dropout probability) must be in [0, 1], got {p}")
    source = generator.device if generator is not None else device
    return (torch.rand(batch, generator=generator, device=source) < p).to(device)


def drop_condition(cond: torch.Tensor, null: torch.Tensor | float, p: float | None = None,
                   generator: torch.Generator | None = None, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Replace the condition of a random fraction p of the batch by `null`, for classifier-free
    guidance training (Ho & Salimans 2022): the model learns the unconditional prediction too.

    cond: (B, ...) class ids (B,) or embeddings (B, D) / (B, L, D); null: the null condition,
    broadcastable to one row (a class id, a (D,) or (L, D) embedding, possibly learned) or to the
    whole batch. Give either p (each row dropped independently with probability p, drawn from
    `generator`) or `mask` ((B,) bool from `condition_drop_mask`, to drop the same rows of
    several tensors, such as text embeddings and their attention mask). Other rows are unchanged.
    """
    if (p is None) == (mask is None):
        raise UsageError("drop_condition: give exactly one of p and mask")
    if mask is None:
        mask = condition_drop_mask(cond.shape[0], p, generator, cond.device)
    if mask.shape != cond.shape[:1]:
        raise UsageError(f"drop_condition: mask must have shape ({cond.shape[0]},), got {tuple(mask.shape)}")
    null = torch.as_tensor(null, dtype=cond.dtype, device=cond.device)
    try:
        fits = torch.broadcast_shapes(null.shape, cond.shape) == cond.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise UsageError(f"drop_condition: null of shape {tuple(null.shape)} does not broadcast to the "
                         f"condition's shape {tuple(cond.shape)}")
    return torch.where(mask.reshape(mask.shape + (1,) * (cond.ndim - 1)), null, cond)
