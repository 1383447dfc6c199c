"""The U-Net denoiser: parity of imported/exported diffusers UNet2DConditionModel folders, and the
model's own checks (config bounds, latent sizes, gradients)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from polymodal.checkpoint import CheckpointMismatchError, load_state_dict_checked
from polymodal.errors import CheckpointError, ConfigError
from polymodal.generators.unet import TINY_UNET, UNet, UNetConfig, unet_tiny
from polymodal.interop.converters import translate_config
from polymodal.interop.diffusers_denoisers import UNET_CONVERTER
from polymodal.interop.diffusers_unet import (
    diffusers_config_from_unet,
    unet_config_from_diffusers,
    unet_state_from_diffusers,
    unet_state_to_diffusers,
)
from polymodal.interop.safetensors_io import DIFFUSERS_STEM, HFWeights, write_hf_weights

TOL = 1e-4
# Two small layouts: SD 1-like (1x1 conv projections, one layer per block) and SD 2-like (linear
# projections, per-level sizes, cross-attention on an up level whose down level has none) with every
# other supported option away from its default.
REFERENCES = {
    "sd1": dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=32,
                attention_head_dim=8, norm_num_groups=8, sample_size=16),
    "sd2": dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=[2, 1],
                transformer_layers_per_block=[2, 1], cross_attention_dim=24, attention_head_dim=[2, 4],
                norm_num_groups=16, use_linear_projection=True, num_class_embeds=5, flip_sin_to_cos=False,
                freq_shift=1, downsample_padding=0, mid_block_scale_factor=0.7, upcast_attention=True,
                sample_size=16),
}


def _randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Visible random weights (norm scales around 1), so a wrong mapping cannot hide in the init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.15
            p.copy_(1 + noise if p.dim() == 1 and "norm" in name and name.endswith("weight") else noise)
    return model.eval()


def _import(folder: Path) -> UNet:
    """Load a diffusers folder through the converter, as `import_hf` does (meta dry run, then load)."""
    source = str(folder / "config.json")
    weights = HFWeights(folder)
    config = translate_config(UNET_CONVERTER, json.loads(Path(source).read_text()), weights, source).unet
    with torch.device("meta"):
        unet_state_from_diffusers(weights.meta(), UNet(config), str(weights.source))
    model = UNet(config)
    load_state_dict_checked(model, unet_state_from_diffusers(weights.load(), model, str(weights.source)), source)
    return model.eval()


def _export(model: UNet, folder: Path) -> Path:
    """Write `model` as a diffusers folder through the converter, as `export_hf` does."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(diffusers_config_from_unet(model.config)))
    write_hf_weights(unet_state_to_diffusers(model.state_dict()), folder, stem=DIFFUSERS_STEM)
    return folder


def _inputs(config: UNetConfig, seed: int = 1):
    """(latents (2, C, 16, 16), timesteps (2,), class labels or None, encoder states (2, 7, D))."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, config.in_channels, 16, 16, generator=gen)
    context = torch.randn(2, 7, config.cross_attention_dim, generator=gen)
    labels = torch.tensor([0, config.num_class_embeds - 1]) if config.num_class_embeds else None
    return latents, torch.tensor([3, 871]), labels, context


def _max_diff(ours: UNet, ref: UNet2DConditionModel, timesteps=None) -> float:
    latents, steps, labels, context = _inputs(ours.config)
    steps = steps if timesteps is None else timesteps
    with torch.no_grad():
        expected = ref(latents, steps, context, class_labels=labels).sample
        got = ours(latents, steps, labels, context)
    assert expected.std() > 0.3  # a live network, not a near-constant output
    return (got - expected).abs().max().item()



@pytest.fixture(scope="module", params=list(REFERENCES))
def reference(request, tmp_path_factory):
    """(diffusers model with random weights, its save_pretrained folder)."""
    torch.manual_seed(0)
    ref = _randomize_(UNet2DConditionModel(**REFERENCES[request.param]))
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    return ref, folder


def test_import_matches_diffusers(reference):
    ref, folder = reference
    ours = _import(folder)
    assert ours.config.use_linear_projection == ref.config.use_linear_projection
    assert _max_diff(ours, ref) <= TOL
    assert _max_diff(ours, ref, timesteps=37.5) <= TOL  # a scalar (fractional) timestep broadcasts


def test_export_loads_in_diffusers(reference, tmp_path):
    ref, folder = reference
    ours = _import(folder)
    back = UNet2DConditionModel.from_pretrained(_export(ours, tmp_path / "export")).eval()
    assert set(back.state_dict()) == set(ref.state_dict())
    assert _max_diff(ours, back) <= TOL


def test_tiny_round_trip(tmp_path):
    ours = _randomize_(unet_tiny(num_class_embeds=3), seed=4)
    folder = _export(ours, tmp_path / "tiny")
    assert _max_diff(ours, UNet2DConditionModel.from_pretrained(folder).eval()) <= TOL
    again = _import(folder)
    assert again.config == ours.config
    for name, tensor in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


@pytest.mark.parametrize("key, value, named", [
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"], "SimpleCrossAttnDownBlock2D"),
    ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"], "AttnUpBlock2D"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", "UNetMidBlock2DSimpleCrossAttn"),
    ("addition_embed_type", "text_time", "addition_embed_type"),
    ("resnet_time_scale_shift", "scale_shift", "resnet_time_scale_shift"),
])
def test_refuses_unsupported_layouts(key, value, named):
    cfg = {"_class_name": "UNet2DConditionModel", **REFERENCES["sd1"], key: value}
    with pytest.raises(ValueError, match=named):
        unet_config_from_diffusers(cfg)
    with pytest.raises(CheckpointError, match=f"unet/config.json.*{named}"):
        translate_config(UNET_CONVERTER, cfg, None, "unet/config.json")


def test_refuses_out_of_bounds_config_by_key():
    cfg = {**REFERENCES["sd1"], "norm_num_groups": 24}  # 32 channels do not split into 24 groups
    with pytest.raises(CheckpointError, match="norm_num_groups"):
        translate_config(UNET_CONVERTER, cfg, None, "config.json")


def test_missing_tensor_is_named(reference, tmp_path):
    ref, _ = reference
    state = {k: v for k, v in ref.state_dict().items() if "attn2.to_k" not in k}
    with pytest.raises(CheckpointMismatchError, match=r"missing.*attn2\.to_k\.weight"):
        unet_state_from_diffusers(state, UNet(unet_config_from_diffusers(dict(ref.config))), "unet.safetensors")


def test_forward_backward_tiny():
    torch.manual_seed(0)
    model = unet_tiny()
    latents, _, _, context = _inputs(model.config)
    out = model(latents.requires_grad_(), torch.tensor([1, 999]), encoder_hidden_states=context)
    assert out.shape == latents.shape
    out.square().mean().backward()
    assert latents.grad is not None and torch.isfinite(latents.grad).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_forward_errors_name_the_problem():
    model = unet_tiny(block_out_channels=(32, 64, 64), down_cross_attention=(True, True, False),
                      up_cross_attention=(False, True, True), layers_per_block=(1, 1, 1),
                      transformer_layers_per_block=(1, 1, 1), num_heads=(2, 4, 4))
    _, _, _, context = _inputs(model.config)
    with pytest.raises(ValueError, match="18x16 is not divisible by 4"):
        model(torch.randn(2, 4, 18, 16), 5, encoder_hidden_states=context)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(torch.randn(2, 4, 16, 16), 5)
    with pytest.raises(ValueError, match="timesteps"):
        model(torch.randn(2, 4, 16, 16), torch.tensor([1, 2, 3]), encoder_hidden_states=context)
    with pytest.raises(ValueError, match="class_labels"):
        unet_tiny(num_class_embeds=4)(torch.randn(2, 4, 16, 16), 5, encoder_hidden_states=context)


@pytest.mark.parametrize("override, field", [
    (dict(block_out_channels=(32, 48)), r"block_out_channels\[1\]"),  # 48 is not a multiple of 32 groups
    (dict(cross_attention_dim=0), "cross_attention_dim"),
    (dict(num_heads=(2, 4, 4)), "num_heads"),
    (dict(num_heads=(3, 4)), r"num_heads\[0\]"),
    (dict(freq_shift=16), "freq_shift"),
    (dict(layers_per_block=(1, 0)), r"layers_per_block\[1\]"),
])
def test_config_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        UNetConfig(**{**TINY_UNET, "norm_groups": 32, **override})
