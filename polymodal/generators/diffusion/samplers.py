"""Samplers: turn noise into data with any denoiser and either process of `schedules`.

- "ddpm": ancestral sampling with the posterior variance (Ho et al. 2020, eq. 6-7);
- "ddim": Song et al. 2021, eq. 12; eta = 0 is deterministic, eta = 1 matches "ddpm";
- "euler", "heun": integrate the flow ODE dx/dt = v from t = 1 (noise) to t = 0 (data);
  Heun is Karras et al. 2022's Algorithm 1 (a trapezoid correction, Euler on the last step).
"ddpm"/"ddim" fit a `DiffusionSchedule` only, "euler"/"heun" a `FlowMatchingSchedule` only; any
other pairing is a `ConfigError` (on rectified flow, deterministic DDIM would just be Euler).

Fewer steps than training timesteps use "trailing" spacing: the first step is the noisiest
training timestep T - 1 (Lin et al. 2024), so sampling starts where training's noise ends.
The loop runs over steps only; every step is whole-tensor arithmetic.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from tqdm.auto import tqdm

from polymodal.errors import ConfigError, PolymodalError, UsageError
from polymodal.generators.diffusion.objectives import Denoiser, x0_and_noise
from polymodal.generators.diffusion.schedules import (
    DiffusionProcess,
    DiffusionSchedule,
    gaussian_noise,
)

SAMPLERS = {"ddpm": "ddpm", "ddim": "ddpm", "euler": "flow", "heun": "flow"}  # sampler -> process kind
DEFAULT_SAMPLER = {"ddpm": "ddim", "flow": "euler"}
MAX_FLOW_STEPS = 100_000
Callback = Callable[[int, float, torch.Tensor], None]  # (step index, process time t, sample after the step)


class NonFiniteSampleError(PolymodalError, FloatingPointError):
    """NaN or inf while sampling (from the denoiser, or an update that overflowed); the message
    names the step, the sampler and the time."""


def ddpm_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """The `steps` integer timesteps a DDPM/DDIM sampler visits, descending, "trailing" spacing.

    T - i * T / steps rounded half up, minus 1, for i = 0..steps-1: starts at T - 1, evenly
    spaced, distinct (rounding half up, unlike round-half-even, never merges two neighbours)."""
    return [math.floor(num_train_timesteps - i * num_train_timesteps / steps + 0.5) - 1 for i in range(steps)]


def flow_times(steps: int) -> list[float]:
    """The steps + 1 times 1, 1 - 1/steps, ..., 0 a flow sampler visits."""
    return [1.0 - i / steps for i in range(steps + 1)]


def ddpm_posterior(schedule: DiffusionSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: int,
                   t_prev: int) -> tuple[torch.Tensor, float]:
    """Mean (B, ...) and variance (a float) of q(x_{t_prev} | x_t, x0) (Ho et al. 2020, eq. 7).

    t_prev < t may skip timesteps (then beta_t = 1 - alphabar_t / alphabar_prev, the beta of the
    merged step); t_prev = -1 means the clean data, which has variance 0."""
    alphabar, alphabar_prev = schedule.alphabar(t), schedule.alphabar(t_prev)
    beta = 1.0 - alphabar / alphabar_prev
    mean = (math.sqrt(alphabar_prev) * beta / (1 - alphabar)) * x0 \
        + (math.sqrt(1 - beta) * (1 - alphabar_prev) / (1 - alphabar)) * x_t
    return mean, (1 - alphabar_prev) / (1 - alphabar) * beta


def _split(schedule: DiffusionSchedule, prediction: torch.Tensor, x_t: torch.Tensor, t: int):
    alphabar = schedule.alphabar(t)
    return x0_and_noise(prediction, x_t, math.sqrt(alphabar), math.sqrt(1 - alphabar), schedule.prediction_type)


def ddpm_step(schedule: DiffusionSchedule, x_t: torch.Tensor, prediction: torch.Tensor, t: int, t_prev: int,
              noise: torch.Tensor) -> torch.Tensor:
    """One ancestral step x_t -> x_{t_prev}: the posterior mean plus sqrt(posterior variance) * noise.

    x_t, prediction (the denoiser's output, of `schedule.prediction_type`), noise: (B, ...)."""
    x0, _ = _split(schedule, prediction, x_t, t)
    mean, variance = ddpm_posterior(schedule, x0, x_t, t, t_prev)
    return mean + math.sqrt(variance) * noise


def ddim_step(schedule: DiffusionSchedule, x_t: torch.Tensor, prediction: torch.Tensor, t: int, t_prev: int,
              eta: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12); shapes as `ddpm_step`.

    x_prev = sqrt(alphabar_prev) x0 + sqrt(1 - alphabar_prev - s^2) eps + s noise, with
    s = eta * sqrt((1 - alphabar_prev) / (1 - alphabar_t)) * sqrt(1 - alphabar_t / alphabar_prev).
    `noise` is needed only when eta > 0."""
    x0, eps = _split(schedule, prediction, x_t, t)
    alphabar, alphabar_prev = schedule.alphabar(t), schedule.alphabar(t_prev)
    std = eta * math.sqrt((1 - alphabar_prev) / (1 - alphabar) * (1 - alphabar / alphabar_prev))
    x_prev = math.sqrt(alphabar_prev) * x0 + math.sqrt(max(1 - alphabar_prev - std ** 2, 0.0)) * eps
    if std > 0:
        if noise is None:
            raise UsageError("ddim_step: eta > 0 needs noise")
        x_prev = x_prev + std * noise
    return x_prev


def _check_arguments(process: DiffusionProcess, sampler: str, steps, eta) -> None:
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler must be one of {', '.join(map(repr, SAMPLERS))}, got {sampler!r}")
    if SAMPLERS[sampler] != process.kind:
        fitting = [name for name, kind in SAMPLERS.items() if kind == process.kind]
        raise ConfigError(f"sampler {sampler!r} does not fit a {type(process).__name__}; "
                          f"use one of {', '.join(map(repr, fitting))}")
    high = process.num_train_timesteps if process.kind == "ddpm" else MAX_FLOW_STEPS
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= high:
        raise ConfigError(f"steps must be an integer in [1, {high}], got {steps!r}")
    if not 0.0 <= eta <= 1.0:
        raise ConfigError(f"eta must be in [0, 1], got {eta}")
    if eta and sampler != "ddim":
        raise ConfigError(f"eta applies to sampler 'ddim' only, got eta={eta} with sampler {sampler!r}")


@torch.no_grad()
def sample(denoiser: Denoiser, process: DiffusionProcess, noise: torch.Tensor | tuple[int, ...], *,
           sampler: str | None = None, steps: int = 50, eta: float = 0.0, cond: Mapping[str, Any] | None = None,
           generator: torch.Generator | None = None, device: torch.device | str | None = None,
           progress: bool = False, callback: Callback | None = None) -> torch.Tensor:
    """Draw samples (B, C, H, W...) by running `sampler` for `steps` denoiser calls (Heun: 2 * steps - 1).

    denoiser(x_t (B, ...), t (B,) float, **cond) -> prediction (B, ...), of
    `process.prediction_type`, with t in the units of `process.model_time` (DDPM: the integer
    timestep as float; flow: num_train_timesteps * t). noise: the initial noise (B, ...), or a
    shape to draw it from `generator` on `device`; the same generator also draws the per-step
    noise of ddpm / ddim (eta > 0), so a seed fixes the whole sample. sampler: defaults to
    "ddim" for a DiffusionSchedule and "euler" for a FlowMatchingSchedule. progress: a tqdm bar;
    callback(step, t, x) after every step. Raises ConfigError for a bad sampler / steps / eta and
    NonFiniteSampleError when the denoiser returns NaN or inf or an update overflows.
    """
    sampler = DEFAULT_SAMPLER[process.kind] if sampler is None else sampler
    _check_arguments(process, sampler, steps, eta)
    cond = dict(cond or {})
    if isinstance(noise, torch.Tensor):
        x = noise.to(device=device or noise.device, dtype=torch.promote_types(noise.dtype, torch.float32))
    else:
        x = gaussian_noise(tuple(noise), generator, device)

    def predict(x_t: torch.Tensor, t: float, step: int) -> torch.Tensor:
        time = torch.full((x_t.shape[0],), float(process.model_time(t)), device=x_t.device)
        out = denoiser(x_t, time, **cond)
        if out.shape != x_t.shape:
            raise UsageError(f"sample: the denoiser returned shape {tuple(out.shape)}, expected {tuple(x_t.shape)}")
        if not torch.isfinite(out).all():  # fail at the step that broke, not with a NaN image
            raise NonFiniteSampleError(f"sample: the denoiser returned NaN or inf at step {step + 1} of {steps} "
                                       f"(sampler {sampler!r}, t={t:g})")
        return out

    if process.kind == "ddpm":  # -1 after the last timestep: the clean data, alphabar = 1
        pairs = list(itertools.pairwise([*ddpm_timesteps(process.num_train_timesteps, steps), -1]))
    else:
        pairs = list(itertools.pairwise(flow_times(steps)))
    with tqdm(total=steps, desc=f"sample ({sampler})", disable=not progress, dynamic_ncols=True) as bar:
        for step, (t, t_next) in enumerate(pairs):
            prediction = predict(x, t, step)
            if sampler == "ddpm":
                x = ddpm_step(process, x, prediction, t, t_next, gaussian_noise(x.shape, generator, x.device, x.dtype))
            elif sampler == "ddim":
                fresh = gaussian_noise(x.shape, generator, x.device, x.dtype) if eta > 0 else None
                x = ddim_step(process, x, prediction, t, t_next, eta, fresh)
            else:
                x_euler = x + (t_next - t) * prediction
                if sampler == "heun" and t_next > 0:  # trapezoid: average the slopes at both ends
                    x = x + (t_next - t) * 0.5 * (prediction + predict(x_euler, t_next, step))
                else:
                    x = x_euler
            if not torch.isfinite(x).all():
                raise NonFiniteSampleError(f"sample: the update overflowed to inf or NaN at step {step + 1} of "
                                           f"{steps} (sampler {sampler!r}, t={t:g}); the denoiser's outputs were finite")
            bar.update(1)
            if callback is not None:
                callback(step, t, x)
    return x
