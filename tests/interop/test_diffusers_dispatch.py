"""diffusers folders through the registry: `polymodal.load` / `polymodal convert --to hf` of
AutoencoderKL, DiTTransformer2DModel and UNet2DConditionModel folders (outputs equal diffusers'),
and folders of classes no family reads refused by class name."""
from __future__ import annotations

import json

import diffusers
import pytest
import torch
from interop_parity import randomize_

from polymodal.api import load
from polymodal.cli import main
from polymodal.errors import CheckpointError, UsageError
from polymodal.infer.images import generate_images, generate_tensors

TOL = 1e-4


class _SharedEmbedderDiT:
    """diffusers' DiT keeps a timestep/class embedder per block; DiT checkpoints (converted from the
    paper's code) hold one shared embedder copied into every block, which is what ours reads."""

    def __new__(cls):
        model = diffusers.DiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=8,
                                                num_layers=2, num_attention_heads=2, attention_head_dim=16,
                                                num_embeds_ada_norm=10)
        original = model.save_pretrained

        def save_pretrained(folder, **kwargs):
            shared = model.transformer_blocks[0].norm1.emb.state_dict()
            for block in model.transformer_blocks[1:]:
                block.norm1.emb.load_state_dict(shared)
            return original(folder, **kwargs)

        model.save_pretrained = save_pretrained
        return model


def _dit():
    return _SharedEmbedderDiT()


def _unet():
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16)


def _vae():
    return diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                                   norm_num_groups=16, sample_size=32,
                                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def _inputs(size: int, with_context: bool, with_classes: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    inputs = {"timesteps": torch.tensor([10, 700])}
    if with_context:
        inputs["encoder_hidden_states"] = torch.randn(2, 5, 32, generator=g)
    if with_classes:
        inputs["class_labels"] = torch.tensor([3, 10])  # 10: the null class
    return torch.randn(2, 4, size, size, generator=g), inputs


def _reference(model, latents, inputs) -> torch.Tensor:
    """diffusers' output for our keyword inputs (its DiT takes no encoder_hidden_states)."""
    extra = {k: v for k, v in inputs.items() if k != "timesteps"}
    return model(latents, timestep=inputs["timesteps"], **extra).sample


@pytest.mark.parametrize("build, size, context, classes", [(_dit, 8, False, True), (_unet, 16, True, False)])
def test_denoiser_folders_load_as_diffusion_models_and_convert_back(tmp_path, build, size, context, classes):
    torch.manual_seed(0)
    reference = randomize_(build()).eval()
    reference.save_pretrained(tmp_path / "in")
    model = load(tmp_path / "in").model
    assert model.family == "diffusion" and model.config.conditioning == ("class" if classes else "external")
    latents, inputs = _inputs(size, context, classes)
    with torch.no_grad():
        expected = _reference(reference, latents, inputs)
        torch.testing.assert_close(model(latents, **inputs), expected, atol=TOL, rtol=TOL)
    assert main(["convert", str(tmp_path / "in"), str(tmp_path / "ours")]) == 0
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "back"), "--to", "hf"]) == 0
    again = type(reference).from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(_reference(again, latents, inputs), expected, atol=TOL, rtol=TOL)


def test_an_imported_dit_generates_and_an_imported_unet_says_how_to_call_it(tmp_path):
    torch.manual_seed(0)
    randomize_(_dit()).save_pretrained(tmp_path / "dit")
    randomize_(_unet()).save_pretrained(tmp_path / "unet")
    dit = load(tmp_path / "dit").model
    assert generate_tensors(dit, ["3", "9"], steps=2).shape == (2, 4, 8, 8)
    with pytest.raises(UsageError, match="4-channel tensors, not RGB pixels"):
        generate_images(dit, ["3"], steps=2)  # latents without a VAE
    with pytest.raises(UsageError, match="outside text encoder"):
        generate_images(load(tmp_path / "unet").model, ["a cat"], steps=2)


def test_an_autoencoder_folder_loads_as_a_vae_and_converts_back(tmp_path):
    torch.manual_seed(0)
    reference = randomize_(_vae(), std=0.05).eval()
    reference.save_pretrained(tmp_path / "in")
    model = load(tmp_path / "in").model
    assert model.family == "vae"
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model.encode(pixels), reference.encode(pixels).latent_dist.mean, atol=TOL, rtol=TOL)
    assert main(["convert", str(tmp_path / "in"), str(tmp_path / "back"), "--to", "hf"]) == 0
    again = diffusers.AutoencoderKL.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(again.decode(model.encode(pixels)).sample, model.decode(model.encode(pixels)),
                                   atol=TOL, rtol=TOL)


@pytest.mark.parametrize("class_name", ["UNet2DModel", "SD3Transformer2DModel", "AutoencoderTiny"])
def test_folders_of_unsupported_classes_are_refused_by_class_name(tmp_path, class_name):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": class_name, "sample_size": 8}))
    with pytest.raises(CheckpointError, match=class_name):
        load(tmp_path)
