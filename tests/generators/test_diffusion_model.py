"""The `diffusion` family's model and generation API: conditions, guidance wiring, and clear errors
for bad input (sizes, channels, prompts, arguments)."""
from __future__ import annotations

import json

import pytest
import torch

from polymodal.api import load
from polymodal.checkpoint import save_checkpoint
from polymodal.errors import CheckpointError, ConfigError, UsageError
from polymodal.generators.dit import dit_tiny
from polymodal.generators.vae import vae_tiny
from polymodal.infer.images import (
    PromptTruncatedWarning,
    generate_images,
    generate_tensors,
    prompt_tokens,
)
from polymodal.models.diffusion import (
    DiffusionConfig,
    DiffusionModel,
    LatentDiffusionConfig,
    ProcessConfig,
    diffusion_tiny,
)


def _class_model(**overrides) -> DiffusionModel:
    """The tiny class-conditional model with random weights everywhere (adaLN-Zero would make a
    fresh DiT's output exactly zero, whatever the class)."""
    torch.manual_seed(0)
    model = DiffusionModel(DiffusionConfig(**{**vars(diffusion_tiny()), "class_names": [f"c{i}" for i in range(10)],
                                              **overrides})).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    return model


def test_class_prompts_by_name_or_id_and_unknown_ones_refused():
    model = _class_model()
    by_name = generate_tensors(model, ["c3"], seed=1, steps=2)
    by_id = generate_tensors(model, ["3"], seed=1, steps=2)
    torch.testing.assert_close(by_name, by_id)
    with pytest.raises(UsageError, match="'dog' is not a class.*c0"):
        generate_images(model, ["dog"], steps=2)
    with pytest.raises(UsageError, match="class ids run 0..9"):
        generate_images(model, ["10"], steps=2)


def test_guidance_one_is_the_conditional_model_and_other_scales_change_the_sample():
    model = _class_model()
    plain = generate_tensors(model, ["c1"], seed=2, steps=3, guidance=1.0)
    again = generate_tensors(model, ["c1"], seed=2, steps=3, guidance=1.0)
    guided = generate_tensors(model, ["c1"], seed=2, steps=3, guidance=4.0)
    torch.testing.assert_close(plain, again, rtol=0, atol=0)
    assert (plain - guided).abs().max() > 1e-4


@pytest.mark.parametrize("kwargs, message", [
    (dict(guidance=-0.5), "guidance"), (dict(steps=0), "steps"), (dict(n=0), "n must"),
    (dict(sampler="heun"), "does not fit"), (dict(sampler="plms"), "sampler must be one of"),
])
def test_bad_generation_arguments_name_the_argument(kwargs, message):
    with pytest.raises((UsageError, ConfigError), match=message):
        generate_images(_class_model(), ["c1"], **kwargs)


def test_an_image_size_the_denoiser_cannot_patchify_is_refused():
    with pytest.raises(ValueError, match="not a multiple of patch_size 2"):
        generate_images(_class_model(), ["c1"], size=7, steps=1)


def test_nan_in_sampling_is_a_clear_error():
    model = _class_model()
    with torch.no_grad():
        model.denoiser.final_proj.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="step"):
        generate_images(model, ["c1"], steps=2)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="denoiser must be one of"):
        DiffusionConfig(denoiser="mlp")
    with pytest.raises(ConfigError, match="conditioning 'class' needs class labels"):
        DiffusionConfig(dit=dit_tiny(num_classes=0))
    with pytest.raises(ConfigError, match="cross_attention_dim or dit.pooled_dim"):
        DiffusionConfig(dit=dit_tiny(num_classes=0), conditioning="text")
    with pytest.raises(ConfigError, match="sampler 'euler' does not fit process.kind 'ddpm'"):
        DiffusionConfig(dit=dit_tiny(), sampler="euler")
    with pytest.raises(ConfigError, match="schedule"):
        ProcessConfig(schedule="quadratic")
    with pytest.raises(ConfigError, match="4 latent channels but the denoiser takes 3"):
        LatentDiffusionConfig(dit=dit_tiny(in_channels=3), vae=vae_tiny())


def test_a_checkpoint_with_mismatched_vae_and_denoiser_channels_is_refused(tmp_path):
    from polymodal.models.diffusion import LatentDiffusionModel, latent_diffusion_tiny

    folder = save_checkpoint(LatentDiffusionModel(latent_diffusion_tiny()), tmp_path / "ldm")
    config = json.loads((folder / "vae" / "config.json").read_text())
    config["config"]["latent_channels"] = 8
    (folder / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="8 latent channels"):
        load(folder)


def test_long_prompts_are_cut_with_a_warning():
    from polymodal.data.world import world_tokenizer

    tokenizer = world_tokenizer()
    with pytest.warns(PromptTruncatedWarning, match="was cut"):
        ids, mask = prompt_tokens(tokenizer, ["a red circle " * 20, "a"], 8)
    assert ids.shape == (2, 8) and ids[0, -1] == tokenizer.eos_token_id and mask[0].all()
    assert mask[1].sum() == len(tokenizer.encode("a")) + 1


def test_text_models_need_their_tokenizer():
    config = DiffusionConfig(dit=dit_tiny(num_classes=0, in_channels=3, cross_attention_dim=32), conditioning="text",
                             text=diffusion_tiny().text.__class__(vocab_size=64, hidden_size=32, num_layers=1,
                                                                 num_heads=4, intermediate_size=64, max_positions=8,
                                                                 eos_token_id=2))
    with pytest.raises(UsageError, match="needs its tokenizer"):
        generate_images(DiffusionModel(config), ["a"], steps=1)
