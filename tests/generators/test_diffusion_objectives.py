"""Prediction-type conversions, the diffusion / flow training loss, and condition dropout."""
import pytest
import torch
import torch.nn as nn

from polymodal.errors import ConfigError, UsageError
from polymodal.generators.diffusion import (
    DiffusionSchedule,
    FlowMatchingSchedule,
    condition_drop_mask,
    convert_prediction,
    diffusion_loss,
    drop_condition,
    prediction_from,
    x0_and_noise,
)

TYPES = ["epsilon", "sample", "v_prediction", "velocity"]



def _coefficients(kind, g):
    """Per-sample (alpha, sigma) of shape (B, 1, 1, 1): variance preserving or flow (1 - t, t)."""
    if kind == "vp":
        alphabar = DiffusionSchedule("cosine").alphas_cumprod[torch.tensor([0, 100, 500, 900])].float()
        return alphabar.sqrt().view(-1, 1, 1, 1), (1 - alphabar).sqrt().view(-1, 1, 1, 1)
    t = torch.tensor([0.05, 0.3, 0.6, 0.95]).view(-1, 1, 1, 1)
    return 1 - t, t


@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize("prediction_type", TYPES)
def test_conversions_round_trip(kind, prediction_type):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, 5, 5, generator=g,
                                                                                          dtype=torch.float64)
    alpha, sigma = (c.double() for c in _coefficients(kind, g))
    x_t = alpha * x0 + sigma * noise
    prediction = prediction_from(x0, noise, alpha, sigma, prediction_type)
    back_x0, back_noise = x0_and_noise(prediction, x_t, alpha, sigma, prediction_type)
    torch.testing.assert_close(back_x0, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(back_noise, noise, atol=1e-5, rtol=0)
    for other in TYPES:  # any type -> other -> back is the identity
        there = convert_prediction(prediction, x_t, alpha, sigma, prediction_type, other)
        torch.testing.assert_close(there, prediction_from(x0, noise, alpha, sigma, other), atol=1e-5, rtol=0)
        torch.testing.assert_close(convert_prediction(there, x_t, alpha, sigma, other, prediction_type), prediction,
                                   atol=1e-5, rtol=0)


def test_target_formulas():
    x0, noise, alpha, sigma = torch.randn(2, 3), torch.randn(2, 3), 0.8, 0.6
    torch.testing.assert_close(prediction_from(x0, noise, alpha, sigma, "v_prediction"), 0.8 * noise - 0.6 * x0)
    torch.testing.assert_close(prediction_from(x0, noise, alpha, sigma, "velocity"), noise - x0)


def _exact(process, x0, noise, t):
    """A denoiser that returns exactly the training target for this x0, noise and t."""
    alpha, sigma = process.coefficients(t, x0)
    target = prediction_from(x0, noise, alpha, sigma, process.prediction_type)

    def denoiser(x_t, time, labels):
        torch.testing.assert_close(x_t, alpha * x0 + sigma * noise)
        torch.testing.assert_close(time, process.model_time(t))
        assert labels.tolist() == [3, 1, 4, 1]
        return target
    return denoiser, target


@pytest.mark.parametrize("process, t", [
    (DiffusionSchedule(prediction_type="epsilon"), torch.tensor([0, 10, 500, 999])),
    (DiffusionSchedule(prediction_type="sample"), torch.tensor([0, 10, 500, 999])),
    (DiffusionSchedule("cosine", prediction_type="v_prediction"), torch.tensor([0, 10, 500, 999])),
    (FlowMatchingSchedule(), torch.tensor([0.0, 0.1, 0.5, 1.0])),
])
def test_loss_is_the_mse_to_the_target(process, t):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 2, 4, 4, generator=g), torch.randn(4, 2, 4, 4, generator=g)
    denoiser, target = _exact(process, x0, noise, t)
    cond = {"labels": torch.tensor([3, 1, 4, 1])}
    loss = diffusion_loss(denoiser, x0, process, cond, t=t, noise=noise)
    assert loss.shape == () and loss.dtype == torch.float32 and loss.item() == 0.0
    shifted = diffusion_loss(lambda *a, **k: denoiser(*a, **k) + 0.5, x0, process, cond, t=t, noise=noise)
    assert shifted.item() == pytest.approx(0.25, rel=1e-5)
    zero = diffusion_loss(lambda x, time, labels: torch.zeros_like(x), x0, process, cond, t=t, noise=noise)
    assert zero.item() == pytest.approx(target.pow(2).mean().item(), rel=1e-5)


class _TinyDenoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.time = nn.Linear(1, 2)

    def forward(self, x, t):
        return self.conv(x) + self.time(t.view(-1, 1) / 1000).view(-1, 2, 1, 1)


@pytest.mark.parametrize("process", [DiffusionSchedule("scaled_linear", prediction_type="v_prediction"),
                                     FlowMatchingSchedule("logit_normal")])
def test_loss_gradients_reach_the_denoiser_and_seeds_reproduce(process):
    model, x0 = _TinyDenoiser(), torch.randn(8, 2, 4, 4)
    loss = diffusion_loss(model, x0, process, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    again = diffusion_loss(model, x0, process, generator=torch.Generator().manual_seed(0))
    assert again.item() == loss.item()


def test_loss_rejects_mismatched_shapes():
    x0 = torch.randn(2, 1, 4, 4)
    with pytest.raises(UsageError, match="denoiser returned shape \\(2, 4, 4\\)"):
        diffusion_loss(lambda x, t: x[:, 0], x0, DiffusionSchedule())
    with pytest.raises(UsageError, match="noise"):
        diffusion_loss(lambda x, t: x, x0, DiffusionSchedule(), noise=torch.randn(2, 1, 4, 3))


def test_condition_dropout_drops_the_right_fraction_of_class_ids():
    labels = torch.arange(10000) % 7
    dropped = drop_condition(labels, 1000, 0.2, torch.Generator().manual_seed(0))
    is_null = dropped == 1000
    assert abs(is_null.float().mean().item() - 0.2) < 0.015
    assert torch.equal(dropped[~is_null], labels[~is_null])
    assert torch.equal(drop_condition(labels, 1000, 0.2, torch.Generator().manual_seed(0)), dropped)
    assert torch.equal(drop_condition(labels, 1000, 0.0), labels)
    assert (drop_condition(labels, 1000, 1.0) == 1000).all()


def test_condition_dropout_of_embeddings_with_a_shared_mask():
    g = torch.Generator().manual_seed(1)
    text, attention = torch.randn(64, 5, 8, generator=g), torch.ones(64, 5, dtype=torch.bool)
    null = nn.Parameter(torch.zeros(5, 8))  # a learned null embedding still gets gradients
    mask = condition_drop_mask(64, 0.5, g)
    dropped_text = drop_condition(text, null, mask=mask)
    dropped_attention = drop_condition(attention, False, mask=mask)
    assert 0 < mask.sum() < 64
    assert torch.equal(dropped_text[mask], torch.zeros(int(mask.sum()), 5, 8))
    assert torch.equal(dropped_text[~mask], text[~mask])
    assert torch.equal(dropped_attention.all(dim=1), ~mask)
    dropped_text.sum().backward()
    assert null.grad.abs().sum() > 0


def test_condition_dropout_errors():
    labels = torch.arange(4)
    with pytest.raises(ConfigError, match=r"p .* must be in \[0, 1\], got 1.5"):
        drop_condition(labels, 0, 1.5)
    with pytest.raises(UsageError, match="exactly one of p and mask"):
        drop_condition(labels, 0)
    with pytest.raises(UsageError, match="null of shape \\(3,\\)"):
        drop_condition(torch.randn(4, 8), torch.zeros(3), 0.5)


@pytest.mark.parametrize("call", [
    lambda: prediction_from(torch.zeros(1), torch.zeros(1), 1.0, 0.0, "eps"),
    lambda: x0_and_noise(torch.zeros(1), torch.zeros(1), 1.0, 0.0, "x0"),
])
def test_unknown_prediction_type_names_the_argument(call):
    with pytest.raises(ConfigError, match="prediction_type must be one of 'epsilon', 'sample', 'v_prediction'"):
        call()
