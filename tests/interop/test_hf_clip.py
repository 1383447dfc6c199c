"""Parity of imported/exported full CLIPModel / SiglipModel folders (both towers) against transformers."""
from __future__ import annotations

import json

import pytest
import torch
from interop_parity import max_abs_diff, randomize_
from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

from polymodal.checkpoint import CheckpointMismatchError
from polymodal.interop import export_hf, import_hf
from polymodal.models.contrastive import ContrastiveModel, clip_tiny

TOL = 1e-4
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
EOS = 63
TEXT = dict(intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
            max_position_embeddings=16, bos_token_id=0, pad_token_id=1, eos_token_id=EOS)
MODELS = {"clip": CLIPModel, "siglip": SiglipModel}


def _hf_model(kind: str):
    torch.manual_seed(0)
    if kind == "clip":
        hf = CLIPModel(CLIPConfig(vision_config=VISION, text_config=dict(TEXT, hidden_size=32), projection_dim=16))
    else:  # SigLIP has no projections: the text head maps into the vision width
        hf = SiglipModel(SiglipConfig(vision_config=VISION, text_config=dict(TEXT, hidden_size=48, projection_size=64)))
    randomize_(hf)
    with torch.no_grad():  # values unlike the defaults, so a dropped or swapped scalar shows
        hf.logit_scale.fill_(1.7)
        if kind == "siglip":
            hf.logit_bias.fill_(-2.5)
    return hf


def _batch(kind: str) -> dict:
    """3 images, 2 texts; CLIP's second text is padded after its end-of-text token (SigLIP uses no mask)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, EOS - 1, (2, 10), generator=gen)
    ids[0, 9] = ids[1, 6] = EOS
    mask = torch.ones_like(ids)
    if kind == "clip":
        mask[1, 7:] = 0
        ids[1, 7:] = 1
    return {"pixel_values": torch.randn(3, 3, 32, 32, generator=gen), "input_ids": ids, "attention_mask": mask}


def _features(out) -> torch.Tensor:
    """transformers 5 returns outputs whose pooler_output is the feature; older versions a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _assert_matches(ours: ContrastiveModel, hf, batch: dict) -> None:
    pixels, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ref_image = _features(hf.get_image_features(pixel_values=pixels))
        ref_text = _features(hf.get_text_features(input_ids=ids, attention_mask=mask))
        ref = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask)
        assert ref_image.std() > 0.1 and ref_text.std() > 0.1 and ref.logits_per_image.std() > 0.1
        assert max_abs_diff(ours.encode_image(pixels), ref_image) <= TOL
        assert max_abs_diff(ours.encode_text(ids, mask), ref_text) <= TOL
        assert max_abs_diff(ours.similarity(pixels, ids, mask), ref.logits_per_image) <= TOL


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request, tmp_path_factory):
    """(kind, transformers model, its save_pretrained folder)."""
    hf = _hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, folder


def test_full_model_matches_transformers(saved):
    kind, hf, folder = saved
    ours, tokenizer = import_hf(folder)
    assert isinstance(ours, ContrastiveModel) and tokenizer is None
    assert ours.config.loss == kind and ours.config.text.pool == ("eos" if kind == "clip" else "last")
    assert ours.logit_scale.item() == pytest.approx(1.7)
    _assert_matches(ours, hf, _batch(kind))


def test_siglip_logit_bias_is_imported(saved):
    kind, _, folder = saved
    ours, _ = import_hf(folder)
    if kind == "siglip":
        assert ours.logit_bias.item() == pytest.approx(-2.5)
    else:  # CLIP has none: the model's own initial value stays and its loss never reads it
        assert ours.logit_bias.item() == ours.config.logit_bias_init


def test_export_loads_in_transformers_and_matches(saved, tmp_path):
    kind, hf, folder = saved
    ours, _ = import_hf(folder)
    out = export_hf(ours, tmp_path / "export")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [MODELS[kind].__name__]
    reloaded = MODELS[kind].from_pretrained(out).eval()
    _assert_matches(ours, reloaded, _batch(kind))
    with torch.no_grad():
        assert max_abs_diff(reloaded.logit_scale, hf.logit_scale) == 0.0


def test_tiny_registry_model_round_trips_through_transformers(tmp_path):
    torch.manual_seed(0)
    ours = ContrastiveModel(clip_tiny()).eval()
    export_hf(ours, tmp_path / "tiny")
    reloaded = CLIPModel.from_pretrained(tmp_path / "tiny").eval()
    batch = _batch("clip")
    batch["input_ids"][0, 9] = batch["input_ids"][1, 6] = ours.config.text.eos_token_id
    _assert_matches(ours, reloaded, batch)


def test_export_rejects_a_model_without_hf_equivalent(tmp_path):
    config = clip_tiny()
    config.text.pool = "mean"
    with pytest.raises(ValueError, match="text.pool='mean'"):
        export_hf(ContrastiveModel(config), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_wrong_shaped_text_tensor_is_named(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    _, hf, _ = saved
    hf.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = "text_model.encoder.layers.1.mlp.fc1.weight"
    width = tensors[name].shape[1]
    tensors[name] = tensors[name][:, :10].contiguous()
    del tensors["logit_scale"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=rf"{name}: file \(64, 10\) vs expected \(64, {width}\)") as err:
        import_hf(tmp_path)
    assert "missing (1): logit_scale" in str(err.value)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_folder_image_tower_becomes_an_mmllm_vision_tower(kind, tmp_path):
    """`vision_from` an HF CLIP / SigLIP folder: the MM-LLM's image features are that tower's
    penultimate hidden states (patches only for CLIP, as LLaVA takes them), and its pixels get
    that family's preprocessing."""
    from polymodal.data.conversation import ImageProcessor
    from polymodal.models.mmllm import mmllm_tiny
    from polymodal.recipes.mmllm import MMLLMRecipeConfig, build_mmllm

    hf = _hf_model(kind)
    hf.save_pretrained(tmp_path)
    model_config = mmllm_tiny()
    model_config.drop_class_token = kind == "clip"
    model, _ = build_mmllm(MMLLMRecipeConfig(vision_from=str(tmp_path), model=model_config))
    pixels = _batch(kind)["pixel_values"]
    with torch.no_grad():
        hidden = hf.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        ours = model.vision.patch_features(pixels, model.config.vision_feature_layer, model.config.drop_class_token)
    assert model.config.vision_feature_layer == -2
    assert max_abs_diff(ours, hidden[:, 1:] if kind == "clip" else hidden) < TOL
    assert model.config.image_preset == kind and ImageProcessor.for_model(model.config).preset == kind
