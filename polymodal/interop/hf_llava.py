"""Hugging Face `LlavaForConditionalGeneration` folders <-> `MultimodalLM` (vision tower + MLP projector + LM).

Config keys follow transformers' `LlavaConfig`: `vision_config` (CLIP or SigLIP vision tower),
`text_config` (Llama / Mistral / Qwen2), `image_token_index` (5.x also says `image_token_id`),
`vision_feature_layer` (an int; HF's list form concatenates layers and is refused),
`vision_feature_select_strategy` ("default" drops the class token, "full" keeps it),
`projector_hidden_act` ("gelu") and `multimodal_projector_bias` (true).

Weight layouts accepted on import:
    transformers < 4.52 and what 5.x `save_pretrained` still writes:
        vision_tower.vision_model.*, multi_modal_projector.linear_{1,2}.*,
        language_model.model.*, language_model.lm_head.weight
    transformers 4.52+ in-memory layout (found in some hub folders):
        model.vision_tower.vision_model.*, model.multi_modal_projector.*, model.language_model.*, lm_head.weight
Export writes the first layout, which every transformers version loads.

Images enter the prompt as in HF: each image takes `image_tokens` copies of the image token id,
replaced in order by the projected features (see `polymodal.models.mmllm`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from polymodal.checkpoint import CheckpointMismatchError
from polymodal.interop.converters import Converter, build_config
from polymodal.interop.hf_lm import (
    decoder_config_from_hf,
    fill_token_roles,
    hf_config_from_decoder,
    lm_state_from_hf,
    lm_state_to_hf,
)
from polymodal.interop.hf_vit import hf_config_from_vit, vit_config_from_hf, vit_state_from_hf, vit_state_to_hf
from polymodal.interop.namemap import state_from_foreign
from polymodal.models.mmllm import MMLLMConfig
from polymodal.projectors import ProjectorConfig

LLAVA_MODEL_TYPES = ("llava",)
LLAVA_ARCHITECTURE = "LlavaForConditionalGeneration"
_DEFAULT_IMAGE_TOKEN = 32000  # LlavaConfig's default image_token_index

# (prefix in the file, component, prefix within the component's own HF names), first match wins.
_PREFIXES = (
    ("model.vision_tower.", "vision", ""),
    ("vision_tower.", "vision", ""),
    ("model.multi_modal_projector.", "projector", ""),
    ("multi_modal_projector.", "projector", ""),
    ("model.language_model.", "lm", "model."),  # 4.52+: the bare LlamaModel under model.language_model
    ("language_model.", "lm", ""),  # older: a whole LlamaForCausalLM (model.*, lm_head.*)
    ("lm_head.", "lm", "lm_head."),
)
# MLPProjector's Sequential(Linear, GELU, Linear) <-> LlavaMultiModalProjector's linear_1 / linear_2.
_PROJECTOR_NAMES = {"layers.0": "linear_1", "layers.2": "linear_2"}


def llava_config_from_hf(cfg: dict, source: str = "config.json") -> MMLLMConfig:
    """Translate an HF LlavaConfig dict into an `MMLLMConfig` (MLP projector, CLIP/SigLIP tower, Llama-style LM)."""
    act = cfg.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"{source}: projector_hidden_act {act!r} is not supported (the MLP projector uses 'gelu')")
    if not cfg.get("multimodal_projector_bias", True):
        raise ValueError(f"{source}: multimodal_projector_bias=false is not supported (the MLP projector has biases)")
    layer = cfg.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ValueError(f"{source}: vision_feature_layer {layer!r} is not supported (one int layer, not a list)")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"{source}: vision_feature_select_strategy {strategy!r} must be 'default' or 'full'")
    vision_cfg = {"model_type": "clip_vision_model", **(cfg.get("vision_config") or {})}
    vision = vit_config_from_hf(vision_cfg, f"{source} (vision_config)")
    if strategy == "default" and not vision.class_token:
        # HF would drop the first *patch* of a tower without class token; nobody ships that layout.
        raise ValueError(f"{source}: vision_feature_select_strategy 'default' on a tower without class token "
                         "(SigLIP) is not supported; use 'full'")
    text_cfg = {"model_type": "llama", **(cfg.get("text_config") or {})}
    lm = decoder_config_from_hf(text_cfg, f"{source} (text_config)")
    image_token = cfg.get("image_token_id", cfg.get("image_token_index", _DEFAULT_IMAGE_TOKEN))
    preset = "siglip" if vision_cfg["model_type"].startswith("siglip") else "clip"  # the tower's own pixels
    fields = dict(vision=vision, lm=lm, projector=ProjectorConfig(kind="mlp", mlp_depth=2), vision_feature_layer=layer,
                  drop_class_token=strategy == "default", image_token_id=image_token, image_preset=preset)
    return build_config(MMLLMConfig, fields, source, {"image_token_id": "image_token_index"})


def hf_config_from_llava(config: MMLLMConfig, tokenizer=None) -> dict:
    """An HF LlavaForConditionalGeneration config.json dict for `config`.

    Needs an "mlp" projector of depth 2 and a CLIP/SigLIP-layout tower. Token roles the LM config
    leaves open (bos/eos/pad) are filled from `tokenizer` when given.
    """
    if config.image_lora.rank:
        raise ValueError("MMLLMConfig.image_lora: LLaVA has no image-position LoRA adapters; such a model cannot be "
                         "exported (train with lora.image_tokens_only: false to get mergeable adapters)")
    if config.vision_tower != "vit":
        raise ValueError(f"MMLLMConfig.vision_tower: LLaVA export needs a ViT (CLIP/SigLIP) tower, got {config.vision_tower!r}")
    p = config.projector
    if p.kind != "mlp" or p.mlp_depth != 2:
        raise ValueError(f"MMLLMConfig.projector: LLaVA export needs kind='mlp' with mlp_depth=2, got kind={p.kind!r}, "
                         f"mlp_depth={p.mlp_depth}")
    vision = {k: v for k, v in hf_config_from_vit(config.vision).items() if k != "architectures"}
    text = fill_token_roles({k: v for k, v in hf_config_from_decoder(config.lm).items() if k != "architectures"},
                            tokenizer)
    drops = config.drop_class_token and config.vision.class_token
    return {
        "architectures": [LLAVA_ARCHITECTURE],
        "model_type": "llava",
        "vision_config": vision,
        "text_config": text,
        "image_token_index": config.image_token_id,
        "image_seq_length": config.vision_patches,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": "default" if drops else "full",
        "tie_word_embeddings": config.lm.tie_word_embeddings,
    }


def _split_components(tensors: dict[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """File tensors -> {"vision" | "projector" | "lm": {component-relative HF name: tensor}}."""
    parts: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "projector": {}, "lm": {}}
    unknown = []
    for name, tensor in tensors.items():
        for prefix, part, inner in _PREFIXES:
            if name.startswith(prefix):
                parts[part][inner + name[len(prefix):]] = tensor
                break
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointMismatchError(f"tensors in {source} belong to no LLaVA component (vision_tower, "
                                      f"multi_modal_projector, language_model, lm_head): {sorted(unknown)}")
    return parts


def llava_state_from_hf(tensors: dict[str, torch.Tensor], model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """LLaVA tensors (either layout) -> a `MultimodalLM` state dict, each component checked in HF names."""
    parts = _split_components(tensors, source)
    state = {f"vision.{k}": t for k, t in vit_state_from_hf(parts["vision"], model.vision, source).items()}
    ours_state = model.projector.state_dict()
    expected = {f"{hf}.{kind}": tuple(ours_state[f"{ours}.{kind}"].shape)
                for ours, hf in _PROJECTOR_NAMES.items() for kind in ("weight", "bias")}
    hf_to_ours = {hf: ours for ours, hf in _PROJECTOR_NAMES.items()}

    def rename(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        layer, kind = name.split(".")
        return {f"projector.{hf_to_ours[layer]}.{kind}": tensor}

    state.update(state_from_foreign(parts["projector"], expected, f"{source} (multi_modal_projector)", rename))
    state.update({f"lm.{k}": t for k, t in lm_state_from_hf(parts["lm"], model.lm, source).items()})
    return state


def llava_state_to_hf(state: dict[str, torch.Tensor], config: MMLLMConfig) -> dict[str, torch.Tensor]:
    """A `MultimodalLM` state dict -> LLaVA tensor names (the classic layout all transformers versions load)."""
    vision = {k[len("vision."):]: t for k, t in state.items() if k.startswith("vision.")}
    lm = {k[len("lm."):]: t for k, t in state.items() if k.startswith("lm.")}
    out = vit_state_to_hf(vision, prefix="vision_tower.vision_model.")
    for ours, hf in _PROJECTOR_NAMES.items():
        for kind in ("weight", "bias"):
            out[f"multi_modal_projector.{hf}.{kind}"] = state[f"projector.{ours}.{kind}"]
    out.update({f"language_model.{k}": t for k, t in lm_state_to_hf(lm, config.lm).items()})
    return out


HF_LLAVA_CONVERTER = Converter(
    name="LLaVA (LlavaForConditionalGeneration: CLIP/SigLIP tower + MLP projector + Llama-style LM)",
    family="mmllm",
    architectures=(LLAVA_ARCHITECTURE,),
    model_types=LLAVA_MODEL_TYPES,
    config_from=lambda cfg, weights, source: llava_config_from_hf(cfg, source),
    state_from=llava_state_from_hf,
    config_to=lambda model, tokenizer: hf_config_from_llava(model.config, tokenizer),
    state_to=llava_state_to_hf,
    # A Q-Former model has BLIP-2's layout, which is read but never written. Any other model is
    # LLaVA's to write, and config_to names what it lacks (an MLP projector of depth 2, a ViT tower).
    can_export=lambda model: model.config.projector.kind != "qformer",
)
