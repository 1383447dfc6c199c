"""Samplers driven by the exact denoiser of Gaussian data (an analytic oracle), determinism and
seeding, classifier-free guidance, and the errors for bad arguments and NaN denoisers."""
import pytest
import torch

from polymodal.errors import ConfigError, UsageError
from polymodal.generators.diffusion import (
    ClassifierFreeGuidance,
    DiffusionSchedule,
    FlowMatchingSchedule,
    NonFiniteSampleError,
    convert_prediction,
    sample,
)

MU, SIGMA = 0.7, 0.5  # data x0 ~ N(MU, SIGMA^2 I)
SHAPE = (4000, 1, 2, 2)  # 16000 independent values: the variance's standard error is ~1.1%



def ddpm_oracle(schedule: DiffusionSchedule):
    """The optimal denoiser for Gaussian data, E[noise | x_t], re-expressed as the schedule's prediction type."""
    def denoiser(x, t):
        alphabar = schedule.alphas_cumprod[t.long()].float().view(-1, 1, 1, 1)
        a, s = alphabar.sqrt(), (1 - alphabar).sqrt()
        eps = s * (x - a * MU) / (a * a * SIGMA ** 2 + s * s)
        return convert_prediction(eps, x, a, s, "epsilon", schedule.prediction_type)
    return denoiser


def flow_oracle(x, t):
    """E[noise - x0 | x_t] for x_t = (1 - t) x0 + t noise, with model time 1000 t."""
    t = (t / 1000).view(-1, 1, 1, 1)
    residual, var = x - (1 - t) * MU, (1 - t) ** 2 * SIGMA ** 2 + t ** 2
    return t * residual / var - (MU + (1 - t) * SIGMA ** 2 * residual / var)


def _check_moments(x):
    assert abs(x.mean().item() - MU) < 0.02
    assert abs(x.var().item() / SIGMA ** 2 - 1) < 0.05


@pytest.mark.parametrize("sampler, steps, eta", [("ddpm", 1000, 0.0), ("ddim", 250, 0.0), ("ddim", 1000, 1.0)])
def test_ddpm_samplers_recover_gaussian_data(sampler, steps, eta):
    schedule = DiffusionSchedule("cosine")
    x = sample(ddpm_oracle(schedule), schedule, SHAPE, sampler=sampler, steps=steps, eta=eta,
               generator=torch.Generator().manual_seed(0))
    assert x.shape == SHAPE
    _check_moments(x)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_every_prediction_type_samples_the_same(prediction_type):
    """The oracle re-expressed as x0 or v through the conversions gives the epsilon run's samples."""
    schedule, reference = DiffusionSchedule("linear", prediction_type=prediction_type), DiffusionSchedule("linear")
    noise = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    for sampler, eta in (("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)):
        runs = [sample(ddpm_oracle(process), process, noise, sampler=sampler, steps=50, eta=eta,
                       generator=torch.Generator().manual_seed(2)) for process in (schedule, reference)]
        torch.testing.assert_close(runs[0], runs[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sampler, steps", [("euler", 200), ("heun", 20)])
def test_flow_samplers_recover_gaussian_data(sampler, steps):
    x = sample(flow_oracle, FlowMatchingSchedule(), SHAPE, sampler=sampler, steps=steps,
               generator=torch.Generator().manual_seed(0))
    _check_moments(x)


def test_heun_is_more_accurate_than_euler_per_step():
    errors = {}
    for sampler in ("euler", "heun"):
        x = sample(flow_oracle, FlowMatchingSchedule(), SHAPE, sampler=sampler, steps=10,
                   generator=torch.Generator().manual_seed(0))
        errors[sampler] = abs(x.var().item() / SIGMA ** 2 - 1)
    assert errors["heun"] < errors["euler"] / 3


def test_ddim_eta0_is_deterministic_and_seeds_reproduce():
    schedule = DiffusionSchedule()
    noise = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    first = sample(ddpm_oracle(schedule), schedule, noise, steps=20, generator=torch.Generator().manual_seed(1))
    second = sample(ddpm_oracle(schedule), schedule, noise, steps=20, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, second)  # eta = 0: the generator is never drawn from
    runs = [sample(ddpm_oracle(schedule), schedule, (8, 2, 4, 4), sampler="ddpm", steps=20,
                   generator=torch.Generator().manual_seed(seed)) for seed in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_ddim_eta1_equals_ddpm_given_the_same_noise():
    schedule = DiffusionSchedule("cosine")
    runs = [sample(ddpm_oracle(schedule), schedule, (16, 1, 3, 3), sampler=name, steps=30, eta=eta,
                   generator=torch.Generator().manual_seed(4)) for name, eta in (("ddpm", 0.0), ("ddim", 1.0))]
    torch.testing.assert_close(runs[0], runs[1], atol=1e-5, rtol=1e-5)


def test_callback_and_denoiser_calls_per_step():
    seen, calls = [], []

    def counting(x, t):
        calls.append(t[0].item())
        return flow_oracle(x, t)

    sample(counting, FlowMatchingSchedule(), (2, 1, 2, 2), sampler="heun", steps=4,
           callback=lambda step, t, x: seen.append((step, t)))
    assert seen == [(0, 1.0), (1, 0.75), (2, 0.5), (3, 0.25)]
    assert calls == [1000.0, 750.0, 750.0, 500.0, 500.0, 250.0, 250.0]  # no correction on the last step
    calls.clear()
    sample(counting, FlowMatchingSchedule(), (2, 1, 2, 2), sampler="euler", steps=3, progress=True)
    assert len(calls) == 3


def _labelled(x, t, labels):
    """A conditional 'network': its output depends on x, t and the class label."""
    return x * 0.5 + labels.float().view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) / 1000


class _Counting:
    def __init__(self):
        self.batches = []

    def __call__(self, x, t, labels):
        self.batches.append(x.shape[0])
        return _labelled(x, t, labels)


def test_guidance_formula_and_one_batched_forward():
    x, t, labels = torch.randn(3, 2, 4, 4), torch.full((3,), 500.0), torch.tensor([1, 2, 3])
    cond, uncond = _labelled(x, t, labels), _labelled(x, t, torch.full((3,), 10))
    net = _Counting()
    guided = ClassifierFreeGuidance(net, 4.0, {"labels": 10})
    torch.testing.assert_close(guided(x, t, labels=labels), uncond + 4.0 * (cond - uncond))
    assert net.batches == [6]  # cond and uncond in one forward of batch 2B
    net.batches.clear()
    torch.testing.assert_close(ClassifierFreeGuidance(net, 1.0, {"labels": 10})(x, t, labels=labels), cond)
    torch.testing.assert_close(ClassifierFreeGuidance(net, 0.0, {"labels": 10})(x, t, labels=labels), uncond)
    assert net.batches == [3, 3]


def test_guided_sampling_calls_the_network_once_per_step_with_2b():
    net = _Counting()
    guided = ClassifierFreeGuidance(net, 3.0, {"labels": torch.tensor(0)})
    x = sample(guided, DiffusionSchedule(), (5, 2, 4, 4), steps=6, cond={"labels": torch.arange(5)},
               generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 2, 4, 4) and net.batches == [10] * 6


def test_guidance_with_null_embeddings_and_passthrough_conditions():
    def net(x, t, text, size):
        return x + text.mean(dim=(1, 2)).view(-1, 1, 1, 1) * size.view(-1, 1, 1, 1)

    x, t = torch.randn(2, 1, 2, 2), torch.zeros(2)
    text, size, null = torch.randn(2, 7, 4), torch.tensor([1.0, 2.0]), torch.zeros(7, 4)
    guided = ClassifierFreeGuidance(net, 2.0, {"text": null})(x, t, text=text, size=size)
    cond, uncond = net(x, t, text, size), net(x, t, null.expand(2, 7, 4), size)
    torch.testing.assert_close(guided, uncond + 2.0 * (cond - uncond))


@pytest.mark.parametrize("scale", [-0.5, float("nan"), float("inf")])
def test_bad_guidance_scale_names_guidance(scale):
    with pytest.raises(ConfigError, match="guidance"):
        ClassifierFreeGuidance(_labelled, scale, {"labels": 0})


def test_guidance_argument_errors():
    x, t = torch.randn(2, 1, 2, 2), torch.zeros(2)
    with pytest.raises(UsageError, match="null_cond names \\['labels'\\]"):
        ClassifierFreeGuidance(_labelled, 2.0, {"labels": 0})(x, t)
    with pytest.raises(UsageError, match=r"'labels'.*batch size 2"):
        ClassifierFreeGuidance(_labelled, 2.0, {"labels": 0})(x, t, labels=torch.tensor([1, 2, 3]))
    with pytest.raises(UsageError, match="null_cond\\['labels'\\]"):
        ClassifierFreeGuidance(_labelled, 2.0, {"labels": torch.zeros(3)})(x, t, labels=torch.tensor([1, 2]))


@pytest.mark.parametrize("process, kwargs, pattern", [
    (DiffusionSchedule(), dict(sampler="plms"), "sampler must be one of 'ddpm', 'ddim', 'euler', 'heun'"),
    (DiffusionSchedule(), dict(sampler="euler"), "sampler 'euler' does not fit a DiffusionSchedule.*'ddpm', 'ddim'"),
    (FlowMatchingSchedule(), dict(sampler="ddim"), "sampler 'ddim' does not fit a FlowMatchingSchedule"),
    (DiffusionSchedule(), dict(steps=0), "steps must be an integer in \\[1, 1000\\], got 0"),
    (DiffusionSchedule(), dict(steps=1001), "steps"),
    (FlowMatchingSchedule(), dict(steps=2.5), "steps"),
    (DiffusionSchedule(), dict(sampler="ddim", eta=1.5), "eta must be in \\[0, 1\\]"),
    (FlowMatchingSchedule(), dict(sampler="euler", eta=0.5), "eta applies to sampler 'ddim' only"),
])
def test_bad_sampler_arguments_name_the_argument(process, kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        sample(flow_oracle, process, (1, 1, 2, 2), **kwargs)


def test_nan_from_the_denoiser_names_the_step():
    def breaks_late(x, t):
        return torch.full_like(x, float("nan")) if t[0] <= 500 else torch.zeros_like(x)

    with pytest.raises(NonFiniteSampleError, match=r"step 3 of 4.*'euler'.*t=0.5"):
        sample(breaks_late, FlowMatchingSchedule(), (2, 1, 2, 2), steps=4)
    with pytest.raises(NonFiniteSampleError, match="step 1 of 5"):
        sample(lambda x, t: x / 0, DiffusionSchedule(), (2, 1, 2, 2), sampler="ddpm", steps=5)
    with pytest.raises(NonFiniteSampleError, match=r"overflowed.*step 1 of 2.*'heun'"):
        sample(lambda x, t: torch.full_like(x, 3e38), FlowMatchingSchedule(), (2, 1, 2, 2), sampler="heun", steps=2)


def test_wrong_output_shape_is_a_usage_error():
    with pytest.raises(UsageError, match="denoiser returned shape \\(2, 1, 2\\)"):
        sample(lambda x, t: x[..., 0], FlowMatchingSchedule(), (2, 1, 2, 2), steps=2)
