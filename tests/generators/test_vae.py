"""The KL autoencoder: parity with diffusers' AutoencoderKL (import and export), the latent-space
helpers, input and config checks, and a training step with its loss."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE

from polymodal.checkpoint import CheckpointMismatchError
from polymodal.errors import ConfigError, UsageError
from polymodal.generators.vae import AutoencoderKL, VAEConfig, VAEOutput, vae_tiny
from polymodal.generators.vae_losses import (
    VAELossConfig,
    VAEObjective,
    kl_to_standard_normal,
    vae_loss,
)
from polymodal.interop.diffusers_vae import VAE_CONVERTER, vae_config_from_diffusers
from polymodal.interop.safetensors_io import DIFFUSERS_STEM, HFWeights, write_hf_weights

TOL = 1e-4
SD_LIKE = dict(block_out_channels=(32, 64), layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=32)
# SD3/Flux-style: no 1x1 convs, a shift factor, wider latents; and no mid-block attention.
FLUX_LIKE = dict(block_out_channels=(32, 32), layers_per_block=1, latent_channels=16, norm_num_groups=16, sample_size=32,
                 use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
                 scaling_factor=0.3611, shift_factor=0.1159)



def _diffusers_vae(**kwargs) -> DiffusersVAE:
    """A diffusers AutoencoderKL with visible random weights (norm gains around 1), in eval mode."""
    levels = len(kwargs["block_out_channels"])
    vae = DiffusersVAE(down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                       **kwargs)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.15
            p.copy_(1 + noise if p.dim() == 1 and "norm" in name and name.endswith("weight") else noise)
    return vae.eval()


def _import(folder) -> AutoencoderKL:
    """What `import_hf` does once the converter is registered: config, a meta-device dry run, load."""
    source = str(folder / "config.json")
    weights = HFWeights(folder)
    config = VAE_CONVERTER.config_from(json.loads((folder / "config.json").read_text()), weights, source)
    with torch.device("meta"):
        VAE_CONVERTER.state_from(weights.meta(), AutoencoderKL(config), source)
    model = AutoencoderKL(config)
    model.load_state_dict(VAE_CONVERTER.state_from(weights.load(), model, source), strict=True)
    return model.eval()


def _export(model: AutoencoderKL, folder) -> None:
    """What `export_hf` does once the converter is registered."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(VAE_CONVERTER.config_to(model, None)))
    write_hf_weights(VAE_CONVERTER.state_to(model.state_dict(), model.config), folder, stem=DIFFUSERS_STEM)


def _pixels(size: int = 32) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _assert_parity(ours: AutoencoderKL, ref: DiffusersVAE) -> dict[str, float]:
    """Posterior mean/logvar, a seeded posterior draw, decode and forward agree; returns the errors."""
    x = _pixels()
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, logvar = ours.posterior(x)
        errors = {
            "mean": (mean - dist.mean).abs().max().item(),
            "logvar": (logvar - dist.logvar).abs().max().item(),
            "sample": (ours.encode(x, sample=True, generator=torch.Generator().manual_seed(5))
                       - dist.sample(generator=torch.Generator().manual_seed(5))).abs().max().item(),
            "decode": (ours.decode(dist.mean) - ref.decode(dist.mean).sample).abs().max().item(),
            "forward": (ours(x).reconstruction - ref(x).sample).abs().max().item(),
        }
    assert torch.equal(ours.encode(x), mean)
    assert dist.mean.std() > 0.1 and ref(x).sample.std() > 0.1  # a wrong mapping cannot hide in tiny outputs
    assert max(errors.values()) <= TOL, errors
    return errors


@pytest.fixture(scope="module", params=["sd", "flux"])
def pair(request, tmp_path_factory):
    """(diffusers VAE, ours imported from its save_pretrained folder, the folder)."""
    ref = _diffusers_vae(**(SD_LIKE if request.param == "sd" else FLUX_LIKE))
    folder = tmp_path_factory.mktemp(request.param) / "vae"
    ref.save_pretrained(folder)
    return ref, _import(folder), folder


def test_import_matches_diffusers(pair):
    ref, ours, _ = pair
    assert ours.config.scaling_factor == ref.config.scaling_factor
    assert ours.shift_factor == (ref.config.shift_factor or 0.0)
    assert ours.downsample_factor == 2 ** (len(ref.config.block_out_channels) - 1)
    _assert_parity(ours, ref)


def test_export_loads_in_diffusers(pair, tmp_path):
    ref, ours, _ = pair
    _export(ours, tmp_path / "out")
    back = DiffusersVAE.from_pretrained(tmp_path / "out").eval()
    assert back.config.shift_factor == ref.config.shift_factor
    _assert_parity(ours, back)


def test_legacy_attention_names_load():
    """Files older than diffusers 0.14 name the mid-block attention query/key/value/proj_attn."""
    ref = _diffusers_vae(**SD_LIKE)
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = {}
    for name, tensor in ref.state_dict().items():
        for new, old in legacy.items():
            name = name.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        tensors[name] = tensor
    assert any(".query." in name for name in tensors)
    ours = AutoencoderKL(vae_config_from_diffusers(dict(ref.config)))
    ours.load_state_dict(VAE_CONVERTER.state_from(tensors, ours, "legacy"), strict=True)
    _assert_parity(ours.eval(), ref)


def test_missing_tensor_is_named(pair):
    ref, ours, _ = pair
    tensors = dict(ref.state_dict())
    del tensors["decoder.conv_out.bias"]
    with pytest.raises(CheckpointMismatchError, match="decoder.conv_out.bias"):
        VAE_CONVERTER.state_from(tensors, ours, "vae.safetensors")


@pytest.mark.parametrize("key, value, match", [
    ("latents_mean", [0.0] * 4, "latents_mean"),
    ("act_fn", "relu", "act_fn"),
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"], "down_block_types"),
    ("norm_num_groups", 24, "block_out_channels"),
])
def test_unsupported_configs_are_refused(key, value, match):
    cfg = {"_class_name": "AutoencoderKL", **SD_LIKE, "down_block_types": ["DownEncoderBlock2D"] * 2,
           "up_block_types": ["UpDecoderBlock2D"] * 2, key: value}
    with pytest.raises(ValueError, match=match):
        vae_config_from_diffusers(cfg, "config.json")


@pytest.mark.parametrize("fields, name", [
    (dict(block_out_channels=(32, 48), norm_num_groups=32), r"block_out_channels\[1\]"),
    (dict(block_out_channels=()), "block_out_channels"),
    (dict(latent_channels=0), "latent_channels"),
    (dict(layers_per_block=0), "layers_per_block"),
    (dict(scaling_factor=0.0), "scaling_factor"),
    (dict(shift_factor=float("nan")), "shift_factor"),
])
def test_config_validation_names_the_field(fields, name):
    with pytest.raises(ConfigError, match=name):
        VAEConfig(**{**vars(vae_tiny()), **fields})


def test_shapes_and_bad_inputs():
    model = AutoencoderKL(VAEConfig(block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=4))
    assert model.downsample_factor == 4
    with torch.no_grad():
        latents = model.encode(torch.zeros(1, 3, 16, 24))
        assert latents.shape == (1, 4, 4, 6)
        assert model.decode(latents).shape == (1, 3, 16, 24)
    with pytest.raises(UsageError, match=r"multiples of the downsampling factor 4, got 18x24.*20x24"):
        model.encode(torch.zeros(1, 3, 18, 24))
    with pytest.raises(UsageError, match=r"\(B, 3, H, W\)"):
        model.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(UsageError, match=r"\(B, 4, h, w\)"):
        model.decode(torch.zeros(1, 3, 4, 4))


def test_diffusion_space_round_trip():
    model = AutoencoderKL(VAEConfig(**{**vars(vae_tiny()), "scaling_factor": 0.5, "shift_factor": 0.25}))
    latents = torch.randn(2, 4, 3, 3)
    z = model.to_diffusion_space(latents)
    assert torch.allclose(z, (latents - 0.25) * 0.5)
    assert torch.allclose(model.from_diffusion_space(z), latents)
    plain = AutoencoderKL(vae_tiny())
    assert torch.allclose(plain.to_diffusion_space(latents), latents * 0.18215)


def test_forward_backward_with_the_loss():
    torch.manual_seed(0)
    model = AutoencoderKL(vae_tiny()).train()
    objective = VAEObjective(VAELossConfig(kl_weight=1e-3))
    loss = objective(model, {"pixel_values": _pixels()})
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert torch.isfinite(vae_loss(model, _pixels()))  # the default objective, for the registry
    # In training the posterior is sampled; in eval forward decodes the mean, deterministically.
    model.eval()
    with torch.no_grad():
        out = model(_pixels())
    assert isinstance(out, VAEOutput)
    assert torch.equal(out.reconstruction, model.decode(out.mean))


def test_kl_of_the_standard_normal_is_zero():
    zeros = torch.zeros(2, 4, 8, 8)
    assert kl_to_standard_normal(zeros, zeros).item() == 0.0
    mean, logvar = torch.full_like(zeros, 2.0), torch.full_like(zeros, 1.0)
    assert kl_to_standard_normal(mean, logvar).item() == pytest.approx(0.5 * (4.0 + torch.e - 1.0 - 1.0))
