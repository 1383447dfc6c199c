"""The training objective of the KL autoencoder, and the reconstruction metrics PSNR and SSIM.

Objective (Rombach et al. 2022, without the perceptual term):

    loss = rec(x_hat, x) + kl_weight * KL(q(z|x) || N(0, I))  [+ lambda * adversarial]

Both terms are *means over elements* (rec over the B*C*H*W pixels, KL over the B*c*h*w latents),
so the loss does not change with the image size or the batch. Latent diffusion sums both over an
image instead; its kl_weight maps to ours as beta_ours = beta_LDM * c / (C * f**2) (c latent and
C image channels, f the downsampling factor): 1e-6 in LDM is ~2e-8 here for the SD VAE, so our
default 1e-6 pulls the posterior ~50x harder toward N(0, I) than SD did.

No LPIPS: it needs a pretrained VGG/AlexNet, which is not available offline. The optional
adversarial term (Esser et al. 2021, VQGAN) uses a `PatchDiscriminator` with the hinge loss,
switched on after `disc_start` optimizer steps, weighted by `disc_weight` times (optionally) the
adaptive weight ||grad rec|| / ||grad adv|| at the decoder's last layer. The discriminator has
its own optimizer: the objective returns {generator: loss, discriminator: loss}, and `train`
back-propagates each into its own optimizer's parameters only. Wiring:

    objective = VAEObjective(VAELossConfig(disc_start=2000))
    optimizers = {"model": Optimization(AdamW(vae.parameters(), lr)),
                  "discriminator": Optimization(Adam(objective.discriminator.parameters(), lr, betas=(0.5, 0.9)))}
    train(vae, data, objective, config, optimizers=optimizers, state={"vae_objective": objective},
          callbacks=[objective.on_step])

`state` checkpoints the discriminator and the step counter (and moves them to the device);
`on_step` advances the counter. Before `disc_start` the discriminator's loss is an exact zero
with zero gradients: give its optimizer no weight decay, or decay would still shrink it.

Metrics: `psnr` and `ssim` take images in `value_range` ((-1, 1) for the VAE's pixels, (0, 1)
for the usual image tensors), map them to [0, 1] and score each image of a batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from polymodal.bounds import MAX_LAYERS, MAX_STEPS, MAX_WIDTH, check_float, check_int
from polymodal.errors import ConfigError, UsageError

RECONSTRUCTION_LOSSES = ("l1", "l2")


@dataclass
class AdversarialLossConfig:
    """What both autoencoder objectives share (this one's and the image tokenizer's).

    reconstruction: "l1" or "l2" (mean squared error). disc_start: optimizer steps before the
    adversarial term starts; None builds no discriminator. adaptive_disc_weight: scale the
    adversarial term by VQGAN's gradient-norm ratio (needs the unsharded decoder's last layer).
    disc_channels / disc_layers: the `PatchDiscriminator`; generator_optimizer /
    discriminator_optimizer: the names of the two optimizers the objective's losses go to.
    """

    reconstruction: str = "l1"
    disc_start: int | None = None
    disc_weight: float = 0.5
    adaptive_disc_weight: bool = True
    disc_channels: int = 64
    disc_layers: int = 3
    generator_optimizer: str = "model"
    discriminator_optimizer: str = "discriminator"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.reconstruction not in RECONSTRUCTION_LOSSES:
            raise ConfigError(f"{owner}.reconstruction must be one of {list(RECONSTRUCTION_LOSSES)}, "
                              f"got {self.reconstruction!r}")
        if self.disc_start is not None:
            check_int(owner, "disc_start", self.disc_start, 0, MAX_STEPS)
        check_float(owner, "disc_weight", self.disc_weight, 0, math.inf)
        check_int(owner, "disc_channels", self.disc_channels, 1, MAX_WIDTH)
        check_int(owner, "disc_layers", self.disc_layers, 1, MAX_LAYERS)
        if self.generator_optimizer == self.discriminator_optimizer:
            raise ConfigError(f"{owner}.discriminator_optimizer must differ from generator_optimizer "
                              f"({self.generator_optimizer!r})")


@dataclass
class VAELossConfig(AdversarialLossConfig):
    """Weights of the autoencoder objective (see the module docstring): kl_weight, plus the
    reconstruction and discriminator settings of `AdversarialLossConfig`."""

    kl_weight: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float(type(self).__name__, "kl_weight", self.kl_weight, 0, math.inf)


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean absolute ("l1") or squared ("l2") error over every element; (B, C, H, W) x 2 -> scalar."""
    if kind == "l1":
        return (reconstruction - target).abs().mean()
    if kind == "l2":
        return (reconstruction - target).square().mean()
    raise UsageError(f"reconstruction loss must be one of {list(RECONSTRUCTION_LOSSES)}, got {kind!r}")


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per element, averaged over every element -> scalar.

    0.5 * (mean^2 + var - 1 - logvar); zero exactly when mean = 0 and logvar = 0.
    """
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()


def _norm_groups(channels: int) -> int:
    return math.gcd(32, channels)


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017) as VQGAN uses it: real/fake logits for overlapping patches.

    pixels (B, in_channels, H, W) -> logits (B, 1, H', W'); with `num_layers` = 3 each logit sees
    a 70x70 pixel patch and H' = H/8 - 2. GroupNorm instead of VQGAN's BatchNorm: it behaves the
    same in train and eval, and does not mix statistics of the real and fake batches.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        widths = [channels * min(2 ** i, 8) for i in range(num_layers + 1)]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for i in range(1, num_layers + 1):
            stride = 2 if i < num_layers else 1  # the last hidden layer keeps the resolution
            layers += [nn.Conv2d(widths[i - 1], widths[i], 4, stride=stride, padding=1, bias=False),
                       nn.GroupNorm(_norm_groups(widths[i]), widths[i]), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self._init_weights()

    def _init_weights(self) -> None:
        # DCGAN's initialisation, as in pix2pix and VQGAN: N(0, 0.02) kernels, N(1, 0.02) norm gains.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.GroupNorm):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.layers(pixels)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake))) -> scalar."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's balance ||d rec / d W|| / (||d adv / d W|| + 1e-4) at the last layer W, clamped to
    [0, max_weight] and detached: the adversarial gradient is kept about as large as the
    reconstruction gradient where both enter the image. Keeps both graphs (retain_graph)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def pixels_of(batch: Any) -> torch.Tensor:
    """The pixels (B, C, H, W) of an autoencoder batch: the tensor itself or its "pixel_values"."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping) and "pixel_values" in batch:
        return batch["pixel_values"]
    raise UsageError("an autoencoder objective takes a batch of pixels (B, C, H, W) or {'pixel_values': pixels}, "
                     f"got {type(batch).__name__}")


def _rec_kl(out: Any, pixels: torch.Tensor, config: VAELossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction term, reconstruction + kl_weight * KL) of a `VAEOutput` against `pixels`."""
    rec = reconstruction_loss(out.reconstruction, pixels, config.reconstruction)
    return rec, rec + config.kl_weight * kl_to_standard_normal(out.mean, out.logvar)


class VAEObjective(nn.Module):
    """`objective(model, batch)` for `train`: reconstruction + kl_weight * KL, plus the adversarial
    term when `config.disc_start` is set (see the module docstring for the wiring).

    model(pixels) must return a `VAEOutput`; batch: pixels (B, C, H, W) in [-1, 1] or
    {"pixel_values": pixels}. Returns a scalar loss without a discriminator, else
    {generator_optimizer: loss, discriminator_optimizer: hinge loss}. `steps_done` (a buffer, so
    it is checkpointed) counts completed optimizer steps; `on_step` advances it.
    """

    def __init__(self, config: VAELossConfig | None = None, in_channels: int = 3):
        super().__init__()
        self.config = config or VAELossConfig()
        c = self.config
        self.discriminator = (PatchDiscriminator(in_channels, c.disc_channels, c.disc_layers)
                              if c.disc_start is not None else None)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def on_step(self, context: Any) -> None:
        """A `train` callback: record the optimizer steps completed (`context.step`)."""
        self.steps_done.fill_(context.step)

    def base_loss(self, out: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction term, the loss before the adversarial term) of a model output: here
        reconstruction + kl_weight * KL; the image tokenizer's objective puts its quantizer loss here."""
        return _rec_kl(out, pixels, self.config)

    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        """The loss (or the loss per optimizer) of one batch; see the class docstring."""
        c = self.config
        pixels = pixels_of(batch)
        out = model(pixels)
        rec, loss = self.base_loss(out, pixels)
        if self.discriminator is None:
            return loss
        if int(self.steps_done) < c.disc_start:
            # A zero that still reaches every discriminator parameter, so its backward is defined.
            idle = sum(p.sum() for p in self.discriminator.parameters()) * 0.0
            return {c.generator_optimizer: loss, c.discriminator_optimizer: idle}
        adv = -self.discriminator(out.reconstruction).mean()  # the generator's hinge term
        weight = c.disc_weight
        if c.adaptive_disc_weight and torch.is_grad_enabled():
            weight = weight * adaptive_weight(rec, adv, getattr(model, "module", model).last_layer)
        real = self.discriminator(pixels)
        fake = self.discriminator(out.reconstruction.detach())
        return {c.generator_optimizer: loss + weight * adv,
                c.discriminator_optimizer: hinge_discriminator_loss(real, fake)}


def vae_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The default objective without a discriminator: mean L1 + 1e-6 * mean KL -> scalar. batch as
    for `VAEObjective`; the registry's objective for the autoencoder family."""
    pixels = pixels_of(batch)
    return _rec_kl(model(pixels), pixels, VAELossConfig())[1]


def _unit_range(images: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    low, high = value_range
    if not high > low:
        raise UsageError(f"value_range must be (low, high) with high > low, got {value_range}")
    return (images.to(torch.promote_types(images.dtype, torch.float32)) - low) / (high - low)


def _check_pair(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise UsageError(f"{name} takes two image batches of one shape (B, C, H, W), got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each image pair: 10 log10(1 / MSE) after mapping
    `value_range` to [0, 1]. a, b (B, C, H, W) -> (B,); inf for identical images."""
    _check_pair(a, b, "psnr")
    mse = (_unit_range(a, value_range) - _unit_range(b, value_range)).square().flatten(1).mean(1)  # (B,)
    return 10.0 * torch.log10(1.0 / mse)


def _gaussian_window(sigma: float, radius: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()  # (2 * radius + 1,)


def ssim(a: torch.Tensor, b: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0),
         sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) of each image pair, after mapping `value_range` to
    [0, 1]: an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, population covariances,
    averaged over the positions where the window fits whole and over channels. This is
    `skimage.metrics.structural_similarity(..., data_range=1, gaussian_weights=True,
    use_sample_covariance=False, channel_axis=0)`. a, b (B, C, H, W), H and W >= 11 -> (B,) in [-1, 1].
    """
    _check_pair(a, b, "ssim")
    radius = int(3.5 * sigma + 0.5)  # scipy's gaussian_filter truncation at 3.5 sigma (as skimage)
    if min(a.shape[-2:]) < 2 * radius + 1:
        raise UsageError(f"ssim needs images of at least {2 * radius + 1}x{2 * radius + 1} pixels, "
                         f"got {tuple(a.shape[-2:])}")
    x, y = _unit_range(a, value_range), _unit_range(b, value_range)
    channels = x.shape[1]
    w = _gaussian_window(sigma, radius, x.dtype, x.device)
    rows, cols = w.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), w.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable depthwise Gaussian, valid positions only
        return F.conv2d(F.conv2d(t, rows, groups=channels), cols, groups=channels)

    mu_x, mu_y = blur(x), blur(y)  # (B, C, H - 2r, W - 2r)
    var_x, var_y = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)  # (B,)


__all__ = ["PatchDiscriminator", "VAELossConfig", "VAEObjective", "adaptive_weight", "hinge_discriminator_loss",
           "kl_to_standard_normal", "psnr", "reconstruction_loss", "ssim", "vae_loss"]
