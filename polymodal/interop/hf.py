"""Import and export Hugging Face model folders (config.json + safetensors + tokenizer).

Supported architectures: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (-> `DecoderLM`),
CLIP / SigLIP vision towers (-> `VisionTransformer`), full CLIPModel / SiglipModel (-> the `clip`
family's `ContrastiveModel`) and BertModel (-> `BertEncoder`). The per-family config and name maps
live in `hf_lm`, `hf_vit`, `hf_clip` and `hf_bert`. LlavaForConditionalGeneration (import and export)
and Blip2 / InstructBlipForConditionalGeneration (import) -> `MultimodalLM`, see `hf_llava` / `hf_blip2`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from polymodal.backbones.decoder import DecoderLM
from polymodal.checkpoint import load_state_dict_checked
from polymodal.encoders.bert import BertEncoder
from polymodal.encoders.vit import VisionTransformer
from polymodal.interop.hf_clip import (
    CONTRASTIVE_ARCHITECTURES,
    CONTRASTIVE_MODEL_TYPES,
    contrastive_config_from_hf,
    contrastive_layout,
    contrastive_state_from_hf,
    contrastive_state_to_hf,
    hf_config_from_contrastive,
)
from polymodal.interop.hf_bert import (
    BERT_ARCHITECTURES,
    BERT_MODEL_TYPES,
    bert_config_from_hf,
    bert_state_from_hf,
    bert_state_to_hf,
    has_cls_pooler,
    hf_config_from_bert,
)
from polymodal.interop.hf_blip2 import BLIP2_MODEL_TYPES, blip2_config_from_hf, blip2_state_from_hf
from polymodal.interop.hf_llava import (
    LLAVA_MODEL_TYPES,
    hf_config_from_llava,
    llava_config_from_hf,
    llava_state_from_hf,
    llava_state_to_hf,
)
from polymodal.interop.hf_lm import (
    LM_MODEL_TYPES,
    decoder_config_from_hf,
    hf_config_from_decoder,
    lm_state_from_hf,
    lm_state_to_hf,
)
from polymodal.interop.hf_vit import (
    VIT_MODEL_TYPES,
    hf_config_from_vit,
    vit_config_from_hf,
    vit_state_from_hf,
    vit_state_to_hf,
)
from polymodal.atomic import atomic_folder
from polymodal.interop.formats import read_hf_config
from polymodal.models.contrastive import ContrastiveModel
from polymodal.models.mmllm import MultimodalLM
from polymodal.interop.safetensors_io import read_hf_weights, write_hf_weights
from polymodal.tokenizers.text import TextTokenizer

CONFIG_FILE = "config.json"
LM_ARCHITECTURES = tuple(LM_MODEL_TYPES.values())
VIT_ARCHITECTURES = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "SiglipVisionModel")
# Exported vision towers use the hub's classic `vision_model.` prefix, which every transformers
# version loads into CLIPVisionModel / SiglipVisionModel.
VISION_PREFIX = "vision_model."
# Multimodal folders (-> MultimodalLM): model_type -> (config translator, weight renamer).
MMLLM_IMPORTERS = {
    **{t: (llava_config_from_hf, llava_state_from_hf) for t in LLAVA_MODEL_TYPES},
    **{t: (blip2_config_from_hf, blip2_state_from_hf) for t in BLIP2_MODEL_TYPES},
}



def hf_family(cfg: dict, source: str) -> str:
    """"lm", "vit", "clip", "bert" or "mmllm" for an HF config dict, by `architectures` (when given) or `model_type`."""
    if cfg.get("model_type") in MMLLM_IMPORTERS:  # LLaVA, BLIP-2, InstructBLIP
        return "mmllm"
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    known = ("supported architectures: "
             f"{list(LM_ARCHITECTURES + VIT_ARCHITECTURES + CONTRASTIVE_ARCHITECTURES + BERT_ARCHITECTURES)}")
    if archs:
        if all(a in LM_ARCHITECTURES for a in archs):
            return "lm"
        if all(a in VIT_ARCHITECTURES for a in archs):
            return "vit"
        if all(a in CONTRASTIVE_ARCHITECTURES for a in archs):
            return "clip"
        if all(a in BERT_ARCHITECTURES for a in archs):
            return "bert"
        raise ValueError(f"{source}: architecture {archs} (model_type {model_type!r}) is not supported; {known}")
    if model_type in LM_MODEL_TYPES:
        return "lm"
    if model_type in CONTRASTIVE_MODEL_TYPES:
        return "clip"
    if model_type in VIT_MODEL_TYPES:
        return "vit"
    if model_type in BERT_MODEL_TYPES:
        return "bert"
    raise ValueError(f"{source}: model_type {model_type!r} (no 'architectures') is not supported; {known}")


def import_hf(folder: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, TextTokenizer | None]:
    """Load an HF model folder as (DecoderLM | VisionTransformer | ContrastiveModel | BertEncoder |
    MultimodalLM in eval mode, tokenizer or None).

    Weights are read from model.safetensors or the shards of model.safetensors.index.json and
    cast to `dtype`. The tokenizer is loaded when the folder has a tokenizer.json. Raises
    `CheckpointMismatchError` naming HF tensors that are missing, unexpected or mis-shaped.
    """
    folder = Path(folder)
    source = str(folder / CONFIG_FILE)
    cfg = read_hf_config(folder)
    family = hf_family(cfg, source)
    tensors = read_hf_weights(folder)
    weights_source = str(folder)
    if family == "lm":
        model = DecoderLM(decoder_config_from_hf(cfg, source))
        state = lm_state_from_hf(tensors, model, weights_source)
    elif family == "bert":
        model = BertEncoder(bert_config_from_hf(cfg, source, cls_pooler=has_cls_pooler(tensors, weights_source)))
        state = bert_state_from_hf(tensors, model, weights_source)
    elif family == "clip":
        model = ContrastiveModel(contrastive_config_from_hf(cfg, tensors, source))
        state = contrastive_state_from_hf(tensors, model, weights_source)
    elif family == "mmllm":
        config_from_hf, state_from_hf = MMLLM_IMPORTERS[cfg["model_type"]]
        model = MultimodalLM(config_from_hf(cfg, source))
        state = state_from_hf(tensors, model, weights_source)
    else:
        model = VisionTransformer(vit_config_from_hf(cfg, source))
        state = vit_state_from_hf(tensors, model, weights_source)
    load_state_dict_checked(model, state, weights_source)
    model.to(dtype=dtype).eval()
    tokenizer = TextTokenizer.from_pretrained(folder) if (folder / "tokenizer.json").is_file() else None
    return model, tokenizer


def export_hf(model: nn.Module, folder: str | Path, tokenizer: TextTokenizer | None = None,
              max_shard_bytes: int | None = None) -> Path:
    """Write `model` as an HF folder that transformers' `from_pretrained` loads; return the folder.

    DecoderLM -> LlamaForCausalLM (Qwen2ForCausalLM when attention_bias); VisionTransformer ->
    CLIPVisionModel or SiglipVisionModel by its layout; ContrastiveModel -> CLIPModel or SiglipModel
    by its layout; BertEncoder -> BertModel; MultimodalLM (MLP projector) -> LlavaForConditionalGeneration.
    Weights go to model.safetensors, or to shards plus model.safetensors.index.json above
    `max_shard_bytes`. The folder is replaced as a whole and atomically (see `atomic_folder`).
    """
    if isinstance(model, DecoderLM):
        cfg = hf_config_from_decoder(model.config)
        if tokenizer is not None:
            # Fill token roles the model config leaves open from the tokenizer, for HF's generate().
            for role in ("bos", "eos", "pad"):
                if cfg[f"{role}_token_id"] is None:
                    cfg[f"{role}_token_id"] = getattr(tokenizer, f"{role}_token_id")
        tensors = lm_state_to_hf(model.state_dict(), model.config)
    elif isinstance(model, VisionTransformer):
        cfg = hf_config_from_vit(model.config)
        tensors = vit_state_to_hf(model.state_dict(), prefix=VISION_PREFIX)
    elif isinstance(model, ContrastiveModel):
        cfg = hf_config_from_contrastive(model.config, float(model.logit_scale.detach()))
        tensors = contrastive_state_to_hf(model.state_dict(), contrastive_layout(model.config))
    elif isinstance(model, BertEncoder):
        cfg = hf_config_from_bert(model.config)
        tensors = bert_state_to_hf(model.state_dict())
    elif isinstance(model, MultimodalLM):  # -> LlavaForConditionalGeneration (MLP projector only)
        cfg = hf_config_from_llava(model.config, tokenizer)
        tensors = llava_state_to_hf(model.state_dict(), model.config)
    else:
        raise TypeError(f"export_hf: no HF architecture for {type(model).__name__} "
                        "(only DecoderLM, VisionTransformer, ContrastiveModel, BertEncoder)")
    cfg["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        write_hf_weights(tensors, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return folder
