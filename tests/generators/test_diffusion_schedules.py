"""Noise schedules and single sampler steps against diffusers' DDPM/DDIM schedulers (an oracle
only), the forward process formulas, the timestep conventions and the bad-argument errors."""
import math

import diffusers
import pytest
import torch

from polymodal.errors import ConfigError
from polymodal.generators.diffusion import (
    DiffusionSchedule,
    FlowMatchingSchedule,
    ddim_step,
    ddpm_posterior,
    ddpm_step,
    ddpm_timesteps,
    flow_times,
    sample,
    x0_and_noise,
)

SCHEDULES = [  # (ours, diffusers' name, beta_start, beta_end)
    ("linear", "linear", 1e-4, 0.02),
    ("scaled_linear", "scaled_linear", 0.00085, 0.012),
    ("cosine", "squaredcos_cap_v2", 1e-4, 0.02),
]


def _pair(name, diffusers_name, start, end, prediction_type="epsilon", cls=None, **extra):
    ours = DiffusionSchedule(name, beta_start=start, beta_end=end, prediction_type=prediction_type)
    cls = cls or diffusers.DDPMScheduler
    theirs = cls(beta_schedule=diffusers_name, beta_start=start, beta_end=end, prediction_type=prediction_type,
                 clip_sample=False, **extra)
    return ours, theirs


@pytest.mark.parametrize("name, diffusers_name, start, end", SCHEDULES)
def test_betas_and_alphas_cumprod_match_diffusers(name, diffusers_name, start, end):
    ours, theirs = _pair(name, diffusers_name, start, end)
    torch.testing.assert_close(ours.betas, theirs.betas.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod.double(), atol=1e-6, rtol=0)


def test_diffusers_cosine_name_is_an_alias():
    torch.testing.assert_close(DiffusionSchedule("squaredcos_cap_v2").betas, DiffusionSchedule("cosine").betas)
    assert DiffusionSchedule("cosine").betas.max() == pytest.approx(0.999)  # the clip of the last steps


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("name, diffusers_name, start, end", SCHEDULES[:2])
def test_ddpm_step_matches_diffusers(name, diffusers_name, start, end, prediction_type):
    ours, theirs = _pair(name, diffusers_name, start, end, prediction_type, timestep_spacing="trailing")
    theirs.set_timesteps(20)  # trailing spacing: the same timesteps as ours, so "previous" agrees
    assert theirs.timesteps.tolist() == ddpm_timesteps(1000, 20)
    g = torch.Generator().manual_seed(0)
    x_t, prediction = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    for index in (0, 7, 19):
        t = ddpm_timesteps(1000, 20)[index]
        t_prev = ddpm_timesteps(1000, 20)[index + 1] if index < 19 else -1
        expected = theirs.step(prediction, t, x_t, generator=torch.Generator().manual_seed(5)).prev_sample
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(ddpm_step(ours, x_t, prediction, t, t_prev, noise), expected, atol=1e-5, rtol=1e-5)
        # the posterior mean alone: diffusers' step minus its noise term
        alphabar = ours.alphabar(t)
        x0, _ = x0_and_noise(prediction, x_t, math.sqrt(alphabar), math.sqrt(1 - alphabar), prediction_type)
        mean, variance = ddpm_posterior(ours, x0, x_t, t, t_prev)
        torch.testing.assert_close(mean + math.sqrt(variance) * noise, expected, atol=1e-5, rtol=1e-5)
        assert (variance == 0) == (t_prev == -1)


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_ddim_step_matches_diffusers(prediction_type, eta):
    ours, theirs = _pair("scaled_linear", "scaled_linear", 0.00085, 0.012, prediction_type,
                         cls=diffusers.DDIMScheduler, set_alpha_to_one=True)
    theirs.set_timesteps(50)  # diffusers steps from t to t - T // 50
    g = torch.Generator().manual_seed(1)
    x_t, prediction, noise = (torch.randn(3, 2, 5, 5, generator=g) for _ in range(3))
    for t in (981, 501, 21):
        expected = theirs.step(prediction, t, x_t, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(ddim_step(ours, x_t, prediction, t, t - 20, eta, noise), expected,
                                   atol=1e-5, rtol=1e-5)


def test_whole_ddim_run_matches_diffusers_loop():
    ours, theirs = _pair("linear", "linear", 1e-4, 0.02, cls=diffusers.DDIMScheduler, set_alpha_to_one=True,
                         timestep_spacing="trailing")
    theirs.set_timesteps(10)
    weight = torch.randn(3, 3, generator=torch.Generator().manual_seed(2)) * 0.3

    def denoiser(x, t):  # a fixed nonlinear map standing in for a network
        return torch.tanh(torch.einsum("ij,bjhw->bihw", weight, x)) * (t / 1000).view(-1, 1, 1, 1)

    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    x = noise.clone()
    for t in theirs.timesteps:
        x = theirs.step(denoiser(x, torch.full((2,), float(t))), t, x).prev_sample
    torch.testing.assert_close(sample(denoiser, ours, noise, sampler="ddim", steps=10), x, atol=1e-5, rtol=1e-5)


def test_q_sample_formulas():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    schedule, t = DiffusionSchedule("linear"), torch.tensor([0, 10, 500, 999])
    alphabar = schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(schedule.q_sample(x0, t, noise), alphabar.sqrt() * x0 + (1 - alphabar).sqrt() * noise)
    flow, tf = FlowMatchingSchedule(), torch.tensor([0.0, 0.25, 0.5, 1.0])
    expected = (1 - tf.view(-1, 1, 1, 1)) * x0 + tf.view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(flow.q_sample(x0, tf, noise), expected)
    torch.testing.assert_close(flow.q_sample(x0, tf, noise)[0], x0[0])  # t = 0 is data, t = 1 noise
    torch.testing.assert_close(flow.q_sample(x0, tf, noise)[3], noise[3])


def test_model_time_conventions():
    ddpm, flow = DiffusionSchedule(), FlowMatchingSchedule()
    assert ddpm.model_time(torch.tensor([0, 999])).tolist() == [0.0, 999.0]
    assert ddpm.model_time(torch.tensor([3])).dtype == torch.float32
    assert flow.model_time(torch.tensor([0.0, 0.25, 1.0])).tolist() == [0.0, 250.0, 1000.0]


def test_training_time_sampling():
    g = torch.Generator().manual_seed(0)
    t = DiffusionSchedule(num_train_timesteps=10).sample_time(20000, g)
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 9
    assert torch.bincount(t).float().div(20000).sub(0.1).abs().max() < 0.015
    uniform = FlowMatchingSchedule().sample_time(20000, g)
    assert 0 <= uniform.min() and uniform.max() < 1 and abs(uniform.mean().item() - 0.5) < 0.01
    logit = FlowMatchingSchedule("logit_normal", logit_mean=0.5, logit_std=0.8).sample_time(20000, g)
    z = torch.logit(logit.double())
    assert abs(z.mean().item() - 0.5) < 0.03 and abs(z.std().item() - 0.8) < 0.03


def test_sampling_time_grids():
    assert ddpm_timesteps(1000, 1) == [999]
    assert ddpm_timesteps(1000, 1000) == list(range(999, -1, -1))
    for steps in (3, 7, 50, 333, 999):
        grid = ddpm_timesteps(1000, steps)
        assert len(set(grid)) == steps and grid[0] == 999 and grid == sorted(grid, reverse=True) and grid[-1] >= 0
    assert flow_times(4) == [1.0, 0.75, 0.5, 0.25, 0.0]


@pytest.mark.parametrize("kwargs, names", [
    (dict(schedule="quadratic"), ["schedule", "'linear', 'scaled_linear', 'cosine'", "quadratic"]),
    (dict(prediction_type="noise"), ["prediction_type", "'epsilon', 'sample', 'v_prediction'"]),
    (dict(num_train_timesteps=0), ["num_train_timesteps"]),
    (dict(beta_start=0.0), ["beta_start"]),
    (dict(beta_start=0.1, beta_end=0.01), ["beta_end"]),
])
def test_bad_schedule_arguments_name_the_argument(kwargs, names):
    with pytest.raises(ConfigError) as err:
        DiffusionSchedule(**kwargs)
    for name in names:
        assert name in str(err.value)


def test_bad_flow_arguments_name_the_argument():
    with pytest.raises(ConfigError, match=r"time_sampling.*'uniform', 'logit_normal'"):
        FlowMatchingSchedule("lognormal")
    with pytest.raises(ConfigError, match="logit_std"):
        FlowMatchingSchedule("logit_normal", logit_std=0.0)
