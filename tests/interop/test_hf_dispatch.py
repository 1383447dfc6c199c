"""Outside folders reach a family only through its registered converters: each supported
declaration picks its converter, unsupported ones are refused naming the file and the supported
list, and a throwaway family declared in this test alone is imported and exported end to end."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import polymodal
from polymodal.errors import CheckpointError, UnsupportedTaskError
from polymodal.interop import detect_format, export_hf, import_hf
from polymodal.interop.converters import Converter, build_config, converter_for, exporter_for
from polymodal.interop.namemap import NameMap, renamer, shapes_of, state_from_foreign
from polymodal.models.registry import Family, get_family, register, resolve, unregister

SOURCE = "/somewhere/config.json"
NAME = "test_toy_converter_family"
IMPORT_ONLY = "test_toy_import_only_family"


@dataclass
class ToyConfig:
    """One square linear map of `width`."""

    width: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.width, int) or not 1 <= self.width <= 64:
            raise ValueError(f"ToyConfig.width must be in [1, 64], got {self.width!r}")


class ToyModel(nn.Module):
    """x (B, width) -> (B, width)."""

    def __init__(self, config: ToyConfig, family: str = NAME) -> None:
        super().__init__()
        self.config, self.family = config, family
        self.proj = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


TOY_NAMES = NameMap([("toy.proj", "proj")])


def toy_state_to(state: dict, config: ToyConfig) -> dict:
    """Our names -> the toy layout's."""
    return {TOY_NAMES.to_foreign(name): t for name, t in state.items()}


def toy_state_from(tensors, model: ToyModel, source: str) -> dict:
    """The toy layout's tensors -> our state dict, through the shared skeleton."""
    return state_from_foreign(tensors, shapes_of(toy_state_to(model.state_dict(), model.config)), source,
                              renamer(TOY_NAMES))


def toy_config_from(cfg: dict, weights, source: str) -> ToyConfig:
    """`toy_width` -> ToyConfig.width."""
    return build_config(ToyConfig, {"width": cfg["toy_width"]}, source, {"width": "toy_width"})


# Reads a transformers-style folder; writes (and reads) a diffusers-style one.
TOY_HF_CONVERTER = Converter(name="toy (transformers layout)", family=NAME, architectures=("ToyForTesting",),
                             config_from=toy_config_from, state_from=toy_state_from)
TOY_DIFFUSERS_CONVERTER = Converter(
    name="toy (diffusers layout)", family=NAME, class_names=("ToyModel2D",), config_from=toy_config_from,
    state_from=toy_state_from, state_to=toy_state_to,
    config_to=lambda model, tokenizer: {"_class_name": "ToyModel2D", "toy_width": model.config.width})
IMPORT_ONLY_CONVERTER = Converter(name="toy (import only)", family=IMPORT_ONLY, architectures=("ToyImportOnly",),
                                  config_from=toy_config_from, state_from=toy_state_from)
CLASH_CONVERTER = Converter(name="clash", family=IMPORT_ONLY, architectures=("ToyForTesting",),
                            config_from=toy_config_from, state_from=toy_state_from)


@pytest.fixture
def toy_family():
    """Register the toy family with its two converters for one test, and remove it after."""
    spec = register(Family(NAME, ToyConfig, ToyModel, ToyConfig, lambda model: {"x": torch.ones(1, 4)},
                           converters=(f"{__name__}:TOY_HF_CONVERTER", f"{__name__}:TOY_DIFFUSERS_CONVERTER")))
    yield spec
    unregister(NAME)


def _toy_folder(folder, width: int = 3, **config) -> dict:
    """An HF-style folder declaring the toy architecture; returns its tensors."""
    folder.mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    tensors = {"toy.proj.weight": torch.randn(width, width, generator=gen),
               "toy.proj.bias": torch.randn(width, generator=gen)}
    save_file(tensors, str(folder / "model.safetensors"))
    cfg = {"architectures": ["ToyForTesting"], "toy_width": width, **config}
    (folder / "config.json").write_text(json.dumps(cfg))
    return tensors


LM, VIT, CLIP = (f"polymodal.interop.hf_{m}:HF_{m.upper()}_CONVERTER" for m in ("lm", "vit", "clip"))
BERT, LLAVA, BLIP2 = (f"polymodal.interop.hf_{m}:HF_{m.upper()}_CONVERTER" for m in ("bert", "llava", "blip2"))


@pytest.mark.parametrize("declared, family, converter", [
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "lm", LM),
    ({"architectures": ["MistralForCausalLM"]}, "lm", LM),
    ({"architectures": ["Qwen2ForCausalLM"]}, "lm", LM),
    ({"model_type": "qwen2"}, "lm", LM),
    ({"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model"}, "vit", VIT),
    ({"architectures": ["CLIPVisionModelWithProjection"]}, "vit", VIT),
    ({"architectures": ["SiglipVisionModel"]}, "vit", VIT),
    ({"model_type": "siglip_vision_model"}, "vit", VIT),
    ({"architectures": ["CLIPModel"], "model_type": "clip"}, "clip", CLIP),
    ({"architectures": ["SiglipModel"]}, "clip", CLIP),
    ({"model_type": "clip"}, "clip", CLIP),  # a full model, not its vision tower
    ({"architectures": ["BertModel"], "model_type": "bert"}, "bert", BERT),
    ({"model_type": "bert"}, "bert", BERT),
    ({"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava"}, "mmllm", LLAVA),
    ({"model_type": "llava"}, "mmllm", LLAVA),
    ({"architectures": ["Blip2ForConditionalGeneration"], "model_type": "blip-2"}, "mmllm", BLIP2),
    ({"architectures": ["InstructBlipForConditionalGeneration"]}, "mmllm", BLIP2),
    ({"model_type": "instructblip"}, "mmllm", BLIP2),
    ({"_class_name": "AutoencoderKL"}, "vae", "polymodal.interop.diffusers_vae:VAE_CONVERTER"),
    ({"_class_name": "DiTTransformer2DModel"}, "diffusion", "polymodal.interop.diffusers_denoisers:DIT_CONVERTER"),
    ({"_class_name": "UNet2DConditionModel"}, "diffusion", "polymodal.interop.diffusers_denoisers:UNET_CONVERTER"),
])
def test_each_declaration_picks_its_family_converter(declared, family, converter):
    found = converter_for(declared, SOURCE)
    assert found is resolve(converter) and found.family == family
    assert converter in get_family(family).converters


@pytest.mark.parametrize("declared, shown", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "architectures ['GPT2LMHeadModel']"),
    ({"architectures": ["LlamaForSequenceClassification"], "model_type": "llama"}, "LlamaForSequenceClassification"),
    ({"architectures": ["LlamaForCausalLM", "CLIPModel"]}, "'CLIPModel']"),  # no converter reads both
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"_class_name": "UNet2DModel"}, "_class_name 'UNet2DModel'"),  # diffusers' unconditional U-Net
    ({}, "declaring no model"),
])
def test_unsupported_declarations_are_refused_naming_file_and_supported(declared, shown):
    with pytest.raises(CheckpointError) as err:
        converter_for(declared, SOURCE)
    message = str(err.value)
    assert message.startswith(SOURCE) and shown in message and "\n" not in message
    for supported in ("LlamaForCausalLM", "CLIPVisionModel", "LlavaForConditionalGeneration", "'bert'"):
        assert supported in message


def test_an_unsupported_folder_is_refused_by_import_naming_its_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["WhisperForConditionalGeneration"]}))
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'config.json'}: architectures \['Whisper"):
        import_hf(tmp_path)


def test_a_model_without_family_or_exporter_is_refused(tmp_path):
    with pytest.raises(UnsupportedTaskError, match="Linear belongs to no registered model family"):
        export_hf(nn.Linear(2, 2), tmp_path / "x")
    register(Family(IMPORT_ONLY, ToyConfig, ToyModel, ToyConfig, lambda model: None,
                    converters=(f"{__name__}:IMPORT_ONLY_CONVERTER",)))
    try:
        with pytest.raises(UnsupportedTaskError) as err:
            export_hf(ToyModel(ToyConfig(), family=IMPORT_ONLY), tmp_path / "x")
    finally:
        unregister(IMPORT_ONLY)
    assert f"a '{IMPORT_ONLY}' model (ToyModel) has no outside layout" in str(err.value)
    assert "lm: Llama / Mistral / Qwen2 causal LM" in str(err.value)
    assert not (tmp_path / "x").exists()


def test_a_family_registered_in_a_test_is_imported_and_exported_through_its_converters(toy_family, tmp_path):
    tensors = _toy_folder(tmp_path / "src")
    assert converter_for({"architectures": ["ToyForTesting"]}, SOURCE) is TOY_HF_CONVERTER
    model, tokenizer = polymodal.load(tmp_path / "src")
    assert type(model) is ToyModel and model.config == ToyConfig(width=3) and tokenizer is None
    assert torch.equal(model.proj.weight, tensors["toy.proj.weight"])
    assert exporter_for(model) is TOY_DIFFUSERS_CONVERTER

    out = export_hf(model, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["_class_name"] == "ToyModel2D"
    assert (out / "diffusion_pytorch_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert detect_format(out) == "hf"
    again, _ = polymodal.load(out)
    assert type(again) is ToyModel and torch.equal(again.proj.bias, tensors["toy.proj.bias"])

    # The toy tensors are still checked in the folder's own names.
    save_file({"toy.proj.weight": torch.zeros(3, 3)}, str(tmp_path / "src" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing \(1\): toy\.proj\.bias"):
        polymodal.load(tmp_path / "src")


def test_a_toy_config_out_of_bounds_names_the_file_and_key(toy_family, tmp_path):
    _toy_folder(tmp_path, toy_width=10**9)
    with pytest.raises(CheckpointError, match=r"config\.json: ToyConfig\.width must be in \[1, 64\], got 1000000000 "
                                              r"\(from key 'toy_width'\)"):
        import_hf(tmp_path)


def test_without_its_registration_the_toy_folder_is_refused(tmp_path):
    _toy_folder(tmp_path)
    with pytest.raises(CheckpointError, match="ToyForTesting.*is not supported"):
        polymodal.load(tmp_path)


def test_two_converters_claiming_one_declaration_is_a_registry_error(toy_family):
    register(Family(IMPORT_ONLY, ToyConfig, ToyModel, ToyConfig, lambda model: None,
                    converters=(f"{__name__}:CLASH_CONVERTER",)))
    try:
        with pytest.raises(ValueError, match=r"claimed by several converters: \['test_toy_converter_family: toy"):
            converter_for({"architectures": ["ToyForTesting"]}, SOURCE)
    finally:
        unregister(IMPORT_ONLY)


def test_a_converter_reference_must_name_a_converter_of_its_family(toy_family):
    register(Family(IMPORT_ONLY, ToyConfig, ToyModel, ToyConfig, lambda model: None,
                    converters=(f"{__name__}:TOY_HF_CONVERTER",)))  # the toy family's, not this one's
    try:
        with pytest.raises(TypeError, match="TOY_HF_CONVERTER' is not a Converter of that family"):
            converter_for({"model_type": "anything"}, SOURCE)
    finally:
        unregister(IMPORT_ONLY)


def test_a_converter_declares_what_it_reads_and_exports_both_ways():
    common = dict(name="x", family="x", config_from=toy_config_from, state_from=toy_state_from)
    with pytest.raises(ValueError, match="declares no architectures"):
        Converter(**common)
    with pytest.raises(ValueError, match="config_to and state_to together"):
        Converter(**common, architectures=("X",), state_to=toy_state_to)
