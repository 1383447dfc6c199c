"""The image tokenizer (`ImageVQ`): shapes, input checks, the straight-through gradient, both
quantizers, its objective and a checkpoint round trip through the `image_vq` family."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from polymodal.api import load
from polymodal.checkpoint import save_checkpoint
from polymodal.errors import ConfigError, UsageError
from polymodal.eval.image_tokenizer import evaluate_tokenizer
from polymodal.tokenizers.image_vq import ImageVQ, ImageVQConfig, image_vq_tiny
from polymodal.generators.vae_losses import reconstruction_loss
from polymodal.tokenizers.image_vq_losses import (
    ImageVQLossConfig,
    ImageVQObjective,
    foreground_weights,
    weighted_reconstruction_loss,
)

FSQ = dict(quantizer="fsq", fsq_levels=(4, 3, 3), embed_dim=3, codebook_size=36)


def _model(**changes) -> ImageVQ:
    torch.manual_seed(0)
    return ImageVQ(dataclasses.replace(image_vq_tiny(), **changes))


def _pixels(*shape, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("changes", [{}, FSQ], ids=["vq", "fsq"])
def test_encode_decode_shapes_and_decode_of_codes_is_the_forward_reconstruction(changes):
    model = _model(**changes).eval()
    pixels = _pixels(2, 3, 16, 24)
    codes = model.encode(pixels)
    assert codes.shape == (2, 4, 6) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < model.codebook_size
    assert model.grid((16, 24)) == (4, 6) and model.downsample_factor == 4
    out = model(pixels)
    assert torch.equal(out.codes, codes)
    # The straight-through value is the code vector itself, so decoding the codes rebuilds exactly
    # what training saw.
    torch.testing.assert_close(model.decode(codes), out.reconstruction)
    assert out.reconstruction.shape == pixels.shape


def test_an_image_the_tokenizer_cannot_tile_is_refused_naming_its_size():
    model = _model()
    with pytest.raises(ValueError, match=r"30x32 image .*cannot tile.*factor 4.*32x32"):
        model.encode(_pixels(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode(_pixels(3, 16, 16))


@pytest.mark.parametrize("bad", [32, -1])
def test_a_code_outside_the_codebook_is_refused_naming_the_range(bad):
    model = _model()
    codes = torch.zeros(1, 4, 4, dtype=torch.long)
    codes[0, 1, 2] = bad
    with pytest.raises(ValueError, match=r"\[0, 31\].*32"):
        model.decode(codes)
    with pytest.raises(ValueError, match="integer codes"):
        model.decode(codes.float())


@pytest.mark.parametrize("changes", [{}, FSQ], ids=["vq", "fsq"])
def test_the_reconstruction_gradient_reaches_the_encoder_through_the_quantizer(changes):
    model = _model(**changes)
    model(_pixels(2, 3, 16, 16)).reconstruction.square().mean().backward()  # no quantizer loss
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quant_conv.weight.grad.abs().sum() > 0


def test_usage_counts_training_forwards_and_resets():
    model = _model().train()
    model.reset_usage()
    assert model.usage() == 0.0
    model(_pixels(2, 3, 16, 16))
    assert 0.0 < model.usage() <= 1.0
    model.reset_usage()
    assert model.usage() == 0.0


def test_config_checks_name_the_field():
    with pytest.raises(ConfigError, match="embed_dim"):
        ImageVQConfig(**{**FSQ, "embed_dim": 4})
    with pytest.raises(ConfigError, match="codebook_size"):
        ImageVQConfig(**{**FSQ, "codebook_size": 100})
    with pytest.raises(ConfigError, match="image_size"):
        dataclasses.replace(image_vq_tiny(), image_size=18)
    with pytest.raises(ConfigError, match="quantizer"):
        dataclasses.replace(image_vq_tiny(), quantizer="rvq")


def test_a_tokenizer_without_decoder_encodes_but_refuses_to_decode_or_train():
    model = _model(has_decoder=False).eval()
    assert model.decoder is None
    assert model.encode(_pixels(1, 3, 16, 16)).shape == (1, 4, 4)
    for call in (lambda: model.decode(torch.zeros(1, 4, 4, dtype=torch.long)), lambda: model(_pixels(1, 3, 16, 16))):
        with pytest.raises(ValueError, match="has no decoder"):
            call()
    metrics = evaluate_tokenizer(model, n=2, size=16)
    assert set(metrics) == {"codebook_usage", "codes_per_image"} and metrics["codes_per_image"] == 16


def test_checkpoint_round_trip_through_the_family_keeps_the_ema_codebook(tmp_path):
    model = _model(ema_decay=0.9, restart_after=1).train()
    model(_pixels(4, 3, 16, 16))  # moves the EMA statistics, restarts unused codes
    model.eval()
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt").model
    assert type(loaded) is ImageVQ and loaded.config == model.config
    state = model.state_dict()
    assert {"quantizer.embed_sum_ema", "quantizer.cluster_size_ema", "quantizer.steps_unused"} <= set(state)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    pixels = _pixels(2, 3, 16, 16)
    assert torch.equal(loaded.encode(pixels), model.encode(pixels))


def test_the_objective_adds_the_discriminator_after_disc_start():
    model = _model()
    objective = ImageVQObjective(ImageVQLossConfig(disc_start=1, disc_channels=8, disc_layers=1))
    pixels = _pixels(2, 3, 16, 16)
    before = objective(model, pixels)
    assert set(before) == {"model", "discriminator"} and before["discriminator"].item() == 0.0
    objective.steps_done.fill_(1)
    after = objective(model, pixels)
    assert after["discriminator"].item() > 0.0
    assert not torch.allclose(after["model"], before["model"])


def test_foreground_weights_mark_pixels_far_from_the_median_color():
    pixels = torch.full((2, 3, 8, 8), -0.5)
    pixels[0, :, 2:4, 2:4] = torch.tensor([0.9, -0.9, 0.2])[:, None, None]  # a 2x2 object on image 0
    pixels[1, 1, 5, 5] = -0.45  # within the threshold of the background
    weights = foreground_weights(pixels, weight=4.0, threshold=0.1)
    assert weights.shape == (2, 1, 8, 8)
    expected = torch.ones(2, 1, 8, 8)
    expected[0, 0, 2:4, 2:4] = 5.0
    assert torch.equal(weights, expected)


def test_weighted_reconstruction_equals_the_plain_loss_under_uniform_weights_and_favours_weighted_pixels():
    target = _pixels(2, 3, 8, 8)
    reconstruction = target + 0.1 * _pixels(2, 3, 8, 8, seed=1)
    for kind in ("l1", "l2"):
        uniform = weighted_reconstruction_loss(reconstruction, target, kind, torch.full((2, 1, 8, 8), 3.0))
        assert torch.allclose(uniform, reconstruction_loss(reconstruction, target, kind))
    weights = torch.ones(2, 1, 8, 8)
    weights[:, :, 0, 0] = 10.0
    wrong_corner = target.clone()
    wrong_corner[:, :, 0, 0] += 1.0
    wrong_elsewhere = target.clone()
    wrong_elsewhere[:, :, 7, 7] += 1.0
    assert weighted_reconstruction_loss(wrong_corner, target, "l2", weights) > \
        weighted_reconstruction_loss(wrong_elsewhere, target, "l2", weights)
    with pytest.raises(UsageError, match="reconstruction loss"):
        weighted_reconstruction_loss(reconstruction, target, "l3", weights)


def test_the_objective_uses_foreground_weights_when_asked():
    model = _model()
    pixels = _pixels(2, 3, 16, 16)
    plain = ImageVQObjective(ImageVQLossConfig())(model, pixels)
    weighted = ImageVQObjective(ImageVQLossConfig(foreground_weight=5.0, foreground_threshold=0.5))(model, pixels)
    out = model(pixels)
    weights = foreground_weights(pixels, 5.0, 0.5)
    expected = weighted_reconstruction_loss(out.reconstruction, pixels, "l2", weights) + out.quantizer_loss
    assert torch.allclose(weighted, expected) and not torch.allclose(weighted, plain)
    with pytest.raises(ConfigError, match="foreground_weight"):
        ImageVQLossConfig(foreground_weight=-1.0)
