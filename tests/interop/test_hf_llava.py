"""Parity of imported/exported LLaVA (`LlavaForConditionalGeneration`) folders against transformers."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from interop_parity import max_abs_diff, randomize_
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

import polymodal
from polymodal.checkpoint import CheckpointMismatchError
from polymodal.interop import export_hf, import_hf
from polymodal.models.mmllm import MultimodalLM
from polymodal.projectors import ProjectorConfig
from polymodal.tokenizers.text import TextTokenizer

TOL = 1e-4
VOCAB, IMAGE_TOKEN = 96, 95
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
TEXT = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
# (LM config class, vision_feature_layer, vision_feature_select_strategy)
VARIANTS = {"llama-default": (LlamaConfig, -2, "default"), "qwen2-full": (Qwen2Config, -1, "full")}


def _hf_llava(variant: str) -> LlavaForConditionalGeneration:
    text_cls, layer, strategy = VARIANTS[variant]
    config = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=text_cls(**TEXT),
                         image_token_index=IMAGE_TOKEN, vision_feature_layer=layer,
                         vision_feature_select_strategy=strategy)
    torch.manual_seed(0)
    return randomize_(LlavaForConditionalGeneration(config))


def _inputs(image_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain (B, T) ids with one image's placeholders per row, and (B, 3, 32, 32) pixels."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, IMAGE_TOKEN, (2, image_tokens + 7), generator=gen)
    ids[:, 3:3 + image_tokens] = IMAGE_TOKEN
    return ids, torch.randn(2, 3, 32, 32, generator=gen)


def _logits(model, ids, pixels) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, MultimodalLM):
            return model(ids, pixels).logits
        return model(input_ids=ids, pixel_values=pixels).logits


@pytest.fixture(scope="module", params=list(VARIANTS))
def llava(request, tmp_path_factory):
    """(variant, transformers model, its save_pretrained folder)."""
    hf = _hf_llava(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, folder


def test_llava_logits_match_transformers(llava):
    variant, hf, folder = llava
    loaded = polymodal.load(folder)
    ours = loaded.model
    assert isinstance(ours, MultimodalLM) and loaded.tokenizer is None
    _, layer, strategy = VARIANTS[variant]
    c = ours.config
    assert (c.image_token_id, c.vision_feature_layer, c.drop_class_token) == (IMAGE_TOKEN, layer, strategy == "default")
    assert c.lm.attention_bias == variant.startswith("qwen2")
    assert ours.image_tokens == 16 + (strategy == "full")
    ids, pixels = _inputs(ours.image_tokens)
    ref = _logits(hf, ids, pixels)
    got = _logits(ours, ids, pixels)
    assert got.shape == (2, ids.shape[1], VOCAB)
    assert ref.std() > 0.1
    assert max_abs_diff(got, ref) <= TOL
    # The image matters: other pixels change the logits after the image span.
    assert max_abs_diff(_logits(ours, ids, -pixels), got) > 1e-2


def test_llava_export_loads_in_transformers(llava, tmp_path):
    variant, hf, folder = llava
    ours, _ = import_hf(folder)
    out = export_hf(ours, tmp_path / "export")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"] and cfg["image_token_index"] == IMAGE_TOKEN
    assert cfg["vision_feature_select_strategy"] == VARIANTS[variant][2]
    assert cfg["image_seq_length"] == ours.image_tokens
    again = LlavaForConditionalGeneration.from_pretrained(out).eval()
    ids, pixels = _inputs(ours.image_tokens)
    assert max_abs_diff(_logits(again, ids, pixels), _logits(hf, ids, pixels)) <= TOL


def test_llava_4_52_layout_prefixes_import(llava, tmp_path):
    """Folders saved as `model.vision_tower.*`, `model.language_model.*` (no inner `model.`), `lm_head.*`."""
    _, hf, folder = llava
    renamed = {}
    for name, tensor in load_file(str(folder / "model.safetensors")).items():
        if name.startswith("language_model.model."):
            name = "model.language_model." + name[len("language_model.model."):]
        elif name.startswith("language_model.lm_head."):
            name = name[len("language_model."):]
        else:
            name = "model." + name
        renamed[name] = tensor
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(renamed, str(tmp_path / "model.safetensors"))
    ours, _ = import_hf(tmp_path)
    ids, pixels = _inputs(ours.image_tokens)
    assert max_abs_diff(_logits(ours, ids, pixels), _logits(hf, ids, pixels)) <= TOL


def test_llava_tokenizer_is_imported_and_exported(tmp_path):
    # The folder's tokenizer travels with the model (its size need not match this tiny LM's vocabulary).
    tok = TextTokenizer.train_bpe(["a red square left of a blue circle"] * 4, vocab_size=270,
                                  special_tokens=["<|endoftext|>"])
    _hf_llava("llama-default").save_pretrained(tmp_path / "src")
    tok.save(tmp_path / "src")
    ours, tok2 = import_hf(tmp_path / "src")
    assert tok2 is not None and tok2.encode("a red square") == tok.encode("a red square")
    _, tok3 = import_hf(export_hf(ours, tmp_path / "out", tokenizer=tok2))
    assert tok3.encode("a blue circle") == tok.encode("a blue circle")


def test_llava_config_errors_name_the_field(llava, tmp_path):
    _, _, folder = llava
    cfg = json.loads((folder / "config.json").read_text())
    for key, value, message in (("projector_hidden_act", "relu", "projector_hidden_act"),
                                ("vision_feature_layer", [-2, -1], "vision_feature_layer"),
                                ("vision_feature_select_strategy", "cls", "vision_feature_select_strategy")):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, key: value}))
        (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
        with pytest.raises(ValueError, match=message):
            import_hf(tmp_path)


def test_llava_weight_errors_name_the_tensor(llava, tmp_path):
    _, _, folder = llava
    tensors = load_file(str(folder / "model.safetensors"))
    tensors.pop("multi_modal_projector.linear_2.bias")
    tensors["stray.weight"] = torch.zeros(1)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="stray.weight"):
        import_hf(tmp_path)
    tensors.pop("stray.weight")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="linear_2.bias"):
        import_hf(tmp_path)


def test_export_refuses_non_llava_projectors(llava, tmp_path):
    _, _, folder = llava
    ours, _ = import_hf(folder)
    linear = MultimodalLM(dataclasses.replace(ours.config, projector=ProjectorConfig(kind="linear")))
    with pytest.raises(ValueError, match="mlp_depth=2"):
        export_hf(linear, tmp_path / "out")


def test_llava_tower_family_sets_the_pixel_preprocessing():
    """A CLIP-tower LLaVA takes CLIP mean/std pixels, a SigLIP-tower one SigLIP's [-1, 1]."""
    from polymodal.interop.hf_llava import llava_config_from_hf

    base = {"text_config": {"model_type": "llama", **TEXT}, "vision_feature_select_strategy": "full"}
    clip = llava_config_from_hf({**base, "vision_config": {"model_type": "clip_vision_model", **VISION}})
    siglip = llava_config_from_hf({**base, "vision_config": {"model_type": "siglip_vision_model", **VISION}})
    assert (clip.image_preset, siglip.image_preset) == ("clip", "siglip")
