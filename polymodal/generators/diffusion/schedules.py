"""The two noising processes: DDPM-type discrete schedules and flow matching (rectified flow).

Both write a noisy sample as x_t = alpha_t * x0 + sigma_t * noise, noise ~ N(0, I), and share
one small interface (`coefficients`, `q_sample`, `sample_time`, `model_time`,
`prediction_type`), so the loss and the samplers take either without branching on formulas.

- `DiffusionSchedule` (Ho et al. 2020, DDPM): integer timesteps t = 0..T-1, a beta schedule,
  alpha_t = sqrt(alphabar_t), sigma_t = sqrt(1 - alphabar_t). Variance preserving.
- `FlowMatchingSchedule` (Lipman et al. 2022 flow matching; Liu et al. 2022 rectified flow):
  continuous t in [0, 1], x_t = (1 - t) x0 + t noise, the network predicts the velocity
  v = noise - x0. t = 0 is data, t = 1 is pure noise.

Timestep units the denoiser receives (`model_time`), one convention so that one timestep
embedding serves both processes:
- DDPM: the integer timestep 0..T-1 as a float tensor, e.g. 999.0 at the noisiest step;
- flow: num_train_timesteps * t, i.e. 1000 * t in [0, 1000] by default (as diffusers'
  flow-matching transformers receive it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from polymodal.bounds import check_float, check_int
from polymodal.errors import ConfigError

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
_BETA_ALIASES = {"squaredcos_cap_v2": "cosine"}  # the diffusers name, so imported configs load
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIME_SAMPLINGS = ("uniform", "logit_normal")
MAX_TRAIN_TIMESTEPS = 100_000


def gaussian_noise(shape: tuple[int, ...], generator: torch.Generator | None = None,
                   device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, I) noise of `shape` on `device`, drawn on the generator's device.

    A CPU generator thus gives the same numbers whatever device the sample lives on."""
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source, dtype=dtype).to(device)


def _uniform(batch: int, generator: torch.Generator | None, device) -> torch.Tensor:
    source = generator.device if generator is not None else device
    return torch.rand(batch, generator=generator, device=source).to(device)


def _broadcast(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) against `like`; 0-dim stays 0-dim. Computed in at least float32."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    value = value.to(device=like.device, dtype=dtype)
    return value.reshape(value.shape + (1,) * (like.ndim - value.ndim)) if value.ndim else value


def _check_choice(owner: str, name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{owner}.{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def make_betas(schedule: str, num_train_timesteps: int, beta_start: float = 1e-4,
               beta_end: float = 0.02) -> torch.Tensor:
    """The (T,) float64 betas of a named schedule.

    linear: linspace(beta_start, beta_end, T) (Ho et al. 2020);
    scaled_linear: linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2 (Stable Diffusion);
    cosine: alphabar(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), s = 0.008, and
    beta_t = min(1 - alphabar(t + 1) / alphabar(t), 0.999) (Nichol & Dhariwal 2021; the clip
    keeps the last steps from being singular). beta_start / beta_end are unused by cosine.
    """
    schedule = _BETA_ALIASES.get(schedule, schedule)
    _check_choice("DiffusionSchedule", "schedule", schedule, BETA_SCHEDULES)
    n = num_train_timesteps
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), n, dtype=torch.float64) ** 2
    steps = torch.arange(n + 1, dtype=torch.float64) / n
    alphabar = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
    return (1 - alphabar[1:] / alphabar[:-1]).clamp(max=0.999)


@dataclass(eq=False)
class DiffusionSchedule:
    """A DDPM-type process over T = num_train_timesteps integer timesteps.

    schedule: "linear", "scaled_linear" or "cosine" (see `make_betas`; "squaredcos_cap_v2" is
    accepted as diffusers' name for cosine); prediction_type: what the denoiser outputs,
    "epsilon" (the noise), "sample" (x0) or "v_prediction" (v = alpha * noise - sigma * x0).
    betas, alphas_cumprod: (T,) float64 tables on the CPU.
    """

    schedule: str = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    betas: torch.Tensor = field(init=False, repr=False)
    alphas_cumprod: torch.Tensor = field(init=False, repr=False)

    kind = "ddpm"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_int(owner, "num_train_timesteps", self.num_train_timesteps, 1, MAX_TRAIN_TIMESTEPS)
        check_float(owner, "beta_start", self.beta_start, 0.0, 1.0, low_open=True, high_open=True)
        check_float(owner, "beta_end", self.beta_end, self.beta_start, 1.0, high_open=True)
        _check_choice(owner, "prediction_type", self.prediction_type, PREDICTION_TYPES)
        self.betas = make_betas(self.schedule, self.num_train_timesteps, self.beta_start, self.beta_end)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)

    def alphabar(self, t: int) -> float:
        """alphabar at integer timestep t; 1.0 for t < 0 (the clean data after the last step)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def coefficients(self, t: torch.Tensor | int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) = (sqrt(alphabar_t), sqrt(1 - alphabar_t)) for integer timesteps.

        t: (B,) integer tensor or an int; returned shaped (B, 1, ..., 1) to broadcast against
        `like` (B, C, H, W...), on its device, in at least float32."""
        t = torch.as_tensor(t, dtype=torch.long)
        table = self.alphas_cumprod if t.device.type == "cpu" else self.alphas_cumprod.float().to(t.device)
        alphabar = table[t]
        return _broadcast(alphabar.sqrt(), like), _broadcast((1 - alphabar).sqrt(), like)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alphabar_t) x0 + sqrt(1 - alphabar_t) noise (Ho et al. 2020, eq. 4); x0, noise (B, ...)."""
        alpha, sigma = self.coefficients(t, x0)
        return alpha * x0 + sigma * noise

    def sample_time(self, batch: int, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> torch.Tensor:
        """(B,) training timesteps, integers uniform in [0, T)."""
        return (_uniform(batch, generator, device) * self.num_train_timesteps).long().clamp(
            max=self.num_train_timesteps - 1)

    def model_time(self, t: torch.Tensor | int) -> torch.Tensor:
        """What the denoiser receives: the integer timestep as float (see the module doc)."""
        return torch.as_tensor(t).float()


@dataclass(eq=False)
class FlowMatchingSchedule:
    """Flow matching / rectified flow: x_t = (1 - t) x0 + t noise for t in [0, 1].

    The denoiser predicts the velocity v = noise - x0 (prediction_type "velocity"), the time
    derivative of x_t; sampling integrates dx/dt = v from t = 1 (noise) to t = 0 (data).
    time_sampling: training t drawn "uniform" on [0, 1) or "logit_normal", sigmoid(N(logit_mean,
    logit_std)), which weights the middle of the path (Esser et al. 2024, SD3).
    num_train_timesteps only scales the time the denoiser receives: model_time = T * t.
    """

    time_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    num_train_timesteps: int = 1000

    kind = "flow"
    prediction_type = "velocity"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _check_choice(owner, "time_sampling", self.time_sampling, TIME_SAMPLINGS)
        check_float(owner, "logit_mean", self.logit_mean, -math.inf, math.inf)
        check_float(owner, "logit_std", self.logit_std, 0.0, low_open=True)
        check_int(owner, "num_train_timesteps", self.num_train_timesteps, 1, MAX_TRAIN_TIMESTEPS)

    def coefficients(self, t: torch.Tensor | float, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) = (1 - t, t); t a (B,) tensor or a float, shaped to broadcast against `like`."""
        t = _broadcast(t if isinstance(t, torch.Tensor) else torch.tensor(t, dtype=torch.float64), like)
        return 1 - t, t

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x0 + t noise; x0, noise (B, ...), t (B,) in [0, 1]."""
        alpha, sigma = self.coefficients(t, x0)
        return alpha * x0 + sigma * noise

    def sample_time(self, batch: int, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> torch.Tensor:
        """(B,) float training times in [0, 1] drawn as `time_sampling` says."""
        if self.time_sampling == "uniform":
            return _uniform(batch, generator, device)
        normal = gaussian_noise((batch,), generator, device)
        return torch.sigmoid(self.logit_mean + self.logit_std * normal)

    def model_time(self, t: torch.Tensor | float) -> torch.Tensor:
        """What the denoiser receives: num_train_timesteps * t as float (see the module doc)."""
        return torch.as_tensor(t).float() * self.num_train_timesteps


DiffusionProcess = DiffusionSchedule | FlowMatchingSchedule
