"""The autoencoder objective (reconstruction + KL, the optional patch discriminator) and the PSNR /
SSIM metrics against closed forms and scikit-image."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.optim import Adam

from polymodal.errors import ConfigError, UsageError
from polymodal.generators.vae import AutoencoderKL, vae_tiny
from polymodal.generators.vae_losses import (
    PatchDiscriminator,
    VAELossConfig,
    VAEObjective,
    adaptive_weight,
    hinge_discriminator_loss,
    psnr,
    reconstruction_loss,
    ssim,
)
from polymodal.train.loop import TrainConfig, train
from polymodal.train.optim import Optimization


def _images(seed: int, shape=(3, 3, 32, 32)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_psnr_closed_forms():
    a = _images(0) * 0.5
    assert torch.isinf(psnr(a, a, value_range=(0, 1))).all()
    # A constant offset d in [0, 1] units: MSE = d^2, PSNR = -20 log10(d).
    assert torch.allclose(psnr(a, a + 0.1, value_range=(0, 1)), torch.full((3,), 20.0, dtype=torch.float64))
    # The same images in [-1, 1] score the same (the range maps to [0, 1] first).
    assert torch.allclose(psnr(a * 2 - 1, a * 2 - 1 + 0.2), torch.full((3,), 20.0, dtype=torch.float64))
    assert psnr(a, a + 0.01, value_range=(0, 1)).shape == (3,)


def test_ssim_closed_forms():
    a = _images(1)
    assert torch.allclose(ssim(a, a, value_range=(0, 1)), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(ssim(a * 2 - 1, a * 2 - 1), torch.ones(3, dtype=torch.float64))
    assert (ssim(a, _images(2), value_range=(0, 1)) < 0.1).all()  # independent noise


def test_ssim_matches_skimage():
    from skimage import metrics

    a = _images(3)
    b = (a + 0.2 * _images(4) - 0.1).clamp(0, 1)
    b[1] = a[1].flip(-1)  # a structurally different pair too
    got = ssim(a * 2 - 1, b * 2 - 1)  # the VAE's [-1, 1] pixels
    for i in range(a.shape[0]):
        want = metrics.structural_similarity(a[i].numpy(), b[i].numpy(), data_range=1.0, channel_axis=0,
                                             gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert got[i].item() == pytest.approx(want, abs=1e-10)
        assert psnr(a[i:i + 1], b[i:i + 1], value_range=(0, 1)).item() == pytest.approx(
            metrics.peak_signal_noise_ratio(a[i].numpy(), b[i].numpy(), data_range=1.0), abs=1e-9)


def test_metric_inputs_are_checked():
    with pytest.raises(UsageError, match="one shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(UsageError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_reconstruction_losses():
    a, b = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    assert reconstruction_loss(b, a, "l1").item() == 0.5
    assert reconstruction_loss(b, a, "l2").item() == 0.25
    with pytest.raises(ConfigError, match="reconstruction"):
        VAELossConfig(reconstruction="lpips")
    with pytest.raises(ConfigError, match="kl_weight"):
        VAELossConfig(kl_weight=-1.0)


def test_patch_discriminator_and_hinge():
    disc = PatchDiscriminator(channels=8, num_layers=3)
    assert disc(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)  # 64/8 - 2
    confident = torch.full((2, 1, 3, 3), 2.0)
    assert hinge_discriminator_loss(confident, -confident).item() == 0.0
    assert hinge_discriminator_loss(-confident, confident).item() == 3.0


def test_adaptive_weight_is_the_gradient_norm_ratio():
    weight = torch.ones(3, 3, requires_grad=True)
    ratio = adaptive_weight((2 * weight).sum(), (0.5 * weight).sum(), weight)
    assert ratio.item() == pytest.approx(4.0, rel=1e-3) and not ratio.requires_grad
    assert adaptive_weight((2 * weight).sum(), (0 * weight).sum(), weight).item() == 1e4  # clamped


def _disc_wiring(disc_start: int, adaptive: bool = True):
    torch.manual_seed(0)
    model = AutoencoderKL(vae_tiny())
    objective = VAEObjective(VAELossConfig(disc_start=disc_start, disc_channels=8, disc_layers=2,
                                           adaptive_disc_weight=adaptive))
    optimizers = {"model": Optimization(Adam(model.parameters(), lr=1e-3)),
                  "discriminator": Optimization(Adam(objective.discriminator.parameters(), lr=1e-3,
                                                     betas=(0.5, 0.9)))}
    return model, objective, optimizers


def test_discriminator_is_idle_before_disc_start():
    model, objective, _ = _disc_wiring(disc_start=1)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    losses = objective(model.train(), pixels)
    assert set(losses) == {"model", "discriminator"} and losses["discriminator"].item() == 0.0
    losses["discriminator"].backward(inputs=list(objective.discriminator.parameters()))
    assert all((p.grad == 0).all() for p in objective.discriminator.parameters())
    objective.steps_done.fill_(1)
    active = objective(model, pixels)
    assert active["discriminator"].item() > 0 and active["model"].item() != losses["model"].item()


@pytest.mark.parametrize("adaptive", [True, False])
def test_train_loop_wiring(adaptive):
    """The documented wiring: two named optimizers, the objective in `state`, `on_step` as callback."""
    model, objective, optimizers = _disc_wiring(disc_start=2, adaptive=adaptive)
    before = [p.detach().clone() for p in objective.discriminator.parameters()]
    data = [{"pixel_values": torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) * 2 - 1}
            for i in range(4)]
    seen = []
    result = train(model, data, objective, TrainConfig(steps=4, device="cpu", log_every=1), optimizers=optimizers,
                   state={"vae_objective": objective},
                   callbacks=[objective.on_step, lambda ctx: seen.append(
                       [p.detach().clone() for p in objective.discriminator.parameters()])])
    assert int(objective.steps_done) == 4
    assert all(torch.equal(a, b) for a, b in zip(before, seen[1]))  # steps 1-2: discriminator idle
    assert not all(torch.equal(a, b) for a, b in zip(seen[1], seen[2]))  # step 3: it trains
    assert len(result.losses) == 4 and all(math.isfinite(x) for x in result.losses)


def test_plain_objective_trains_the_reconstruction_down():
    torch.manual_seed(0)
    model = AutoencoderKL(vae_tiny()).train()
    objective = VAEObjective(VAELossConfig(reconstruction="l2"))
    # Smooth images (upsampled 4x4 noise): learnable in a few steps, unlike pixel noise.
    pixels = F.interpolate(torch.rand(2, 3, 4, 4) * 2 - 1, size=32, mode="bilinear")
    optimizer = Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss = objective(model, pixels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_kl_matches_torch_distributions_on_a_non_standard_posterior():
    """Oracle: torch.distributions' closed-form KL between Normals, averaged over elements."""
    from torch.distributions import Normal, kl_divergence

    from polymodal.generators.vae_losses import kl_to_standard_normal

    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    expected = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).mean()
    torch.testing.assert_close(kl_to_standard_normal(mean, logvar), expected)
