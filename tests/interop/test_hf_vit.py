"""Parity of imported/exported CLIP and SigLIP vision towers against transformers."""
from __future__ import annotations

import json

import pytest
import torch
from interop_parity import max_abs_diff, randomize_
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from polymodal.checkpoint import CheckpointMismatchError
from polymodal.encoders.vit import VisionTransformer
from polymodal.interop import export_hf, import_hf
from polymodal.models.vit import vit_tiny

TOL = 1e-4
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
            max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
TOWERS = {
    "clip": (CLIPVisionConfig, CLIPVisionModel),
    "siglip": (SiglipVisionConfig, SiglipVisionModel),
}


def _pixels(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))


def _assert_outputs_match(ours, ref_out, pixels) -> None:
    """last_hidden_state, pooler_output and every hidden state of `ours` match an HF output."""
    with torch.no_grad():
        out = ours(pixels, output_hidden_states=True)
    assert ref_out.last_hidden_state.std() > 0.1
    assert max_abs_diff(out.last_hidden_state, ref_out.last_hidden_state) <= TOL
    assert max_abs_diff(out.pooler_output, ref_out.pooler_output) <= TOL
    assert len(out.hidden_states) == len(ref_out.hidden_states) == VISION["num_hidden_layers"] + 1
    for got, ref in zip(out.hidden_states, ref_out.hidden_states, strict=True):
        assert max_abs_diff(got, ref) <= TOL


@pytest.fixture(scope="module", params=list(TOWERS))
def tower(request, tmp_path_factory):
    """(kind, transformers vision model, its save_pretrained folder)."""
    config_cls, model_cls = TOWERS[request.param]
    torch.manual_seed(0)
    hf = randomize_(model_cls(config_cls(**VISION)))
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, folder


def test_vision_tower_matches_transformers(tower):
    kind, hf, folder = tower
    ours, tokenizer = import_hf(folder)
    assert isinstance(ours, VisionTransformer) and tokenizer is None
    assert ours.config.pool == ("cls" if kind == "clip" else "map")
    pixels = _pixels()
    with torch.no_grad():
        ref = hf(pixels, output_hidden_states=True)
    _assert_outputs_match(ours, ref, pixels)


def test_interpolated_positions_match_transformers(tower):
    kind, hf, folder = tower
    ours, _ = import_hf(folder)
    pixels = _pixels(48)  # a 6x6 patch grid against the native 4x4
    with torch.no_grad():
        ref = hf(pixels, interpolate_pos_encoding=True, output_hidden_states=True)
    _assert_outputs_match(ours, ref, pixels)


def test_export_loads_in_transformers(tower, tmp_path):
    kind, _, folder = tower
    ours, _ = import_hf(folder)
    out = export_hf(ours, tmp_path / "export")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [TOWERS[kind][1].__name__]
    reloaded = TOWERS[kind][1].from_pretrained(out).eval()
    pixels = _pixels()
    with torch.no_grad():
        ref = reloaded(pixels, output_hidden_states=True)
    _assert_outputs_match(ours, ref, pixels)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_full_model_folder_holds_the_same_vision_tower(kind, tmp_path):
    torch.manual_seed(0)
    if kind == "clip":
        hf = CLIPModel(CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=16))
    else:
        # SigLIP has no projections: its text head must output the vision width.
        hf = SiglipModel(SiglipConfig(vision_config=VISION, text_config=dict(TEXT, projection_size=VISION["hidden_size"])))
    randomize_(hf).save_pretrained(tmp_path)
    ours = import_hf(tmp_path)[0].vision_model
    pixels = _pixels()
    with torch.no_grad():
        ref = hf.vision_model(pixels, output_hidden_states=True)
    _assert_outputs_match(ours, ref, pixels)


def test_export_rejects_a_layout_without_hf_equivalent(tmp_path):
    config = vit_tiny()
    config.pool = "mean"
    with pytest.raises(ValueError, match="pool='mean'"):
        export_hf(VisionTransformer(config), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_wrong_shaped_vision_tensor_is_named(tower, tmp_path):
    from safetensors.torch import load_file, save_file

    kind, hf, _ = tower
    hf.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = next(n for n in tensors if n.endswith("encoder.layers.1.mlp.fc1.weight"))
    tensors[name] = tensors[name][:, :10].contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=rf"{name}: file \(128, 10\) vs expected \(128, 64\)"):
        import_hf(tmp_path)
