"""Hugging Face `CLIPModel` / `SiglipModel` folders <-> `ContrastiveConfig` and `ContrastiveModel` weights.

Both towers, the projections and the temperature (and SigLIP's logit bias) are mapped:
- CLIP: ViT with class token, causal text tower pooled at the end-of-text token (transformers'
  rule on `eos_token_id`, see `polymodal.encoders.text`), bias-free `visual_projection` /
  `text_projection` into `projection_dim`, scalar `logit_scale`.
- SigLIP: ViT with MAP head, bidirectional text tower pooled at the last position and passed
  through the text `head` linear, no projections, `logit_scale` and `logit_bias` of shape (1,).
The vision tower reuses `hf_vit`'s name map. Config keys and defaults follow transformers'
`CLIPTextConfig` / `SiglipTextConfig`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from polymodal.encoders.text import TextEncoderConfig
from polymodal.interop.converters import Converter, build_config
from polymodal.interop.hf_vit import (
    CLIP_ENCODER_LAYER_NAMES,
    hf_config_from_vit,
    vit_config_from_hf,
    vit_layout,
    vit_state_from_hf,
    vit_state_to_hf,
)
from polymodal.interop.namemap import NameMap, shapes_of, state_from_foreign
from polymodal.interop.safetensors_io import HFWeights
from polymodal.models.contrastive import ContrastiveConfig

CONTRASTIVE_MODEL_TYPES = ("clip", "siglip")
CONTRASTIVE_ARCHITECTURES = ("CLIPModel", "SiglipModel")
VISION, TEXT = "vision_model.", "text_model."

_TEXT_DEFAULTS = {  # transformers' CLIPTextConfig / SiglipTextConfig defaults, for keys a config.json omits
    "clip": dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 eos_token_id=49407),
    "siglip": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                   layer_norm_eps=1e-6, eos_token_id=49407),
}
_ACT_FROM_HF = {"quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}
_ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
CLIP_LOGIT_SCALE_INIT = 2.6592  # transformers' CLIPConfig.logit_scale_init_value, log(1 / 0.07)
# TextEncoderConfig fields whose text_config key differs (for error messages).
_TEXT_KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
              "max_positions": "max_position_embeddings", "act": "hidden_act", "norm_eps": "layer_norm_eps"}

# Names relative to the text tower (HF's `text_model.` prefix is handled separately).
HF_TEXT_NAMES = NameMap([
    ("embeddings.token_embedding", "token_embedding"),
    ("embeddings.position_embedding.weight", "position_embedding"),
    *CLIP_ENCODER_LAYER_NAMES,
    ("final_layer_norm", "final_norm"),
    ("head", "head"),
])
# Older checkpoints persist the position-id buffers; they are just arange(num_positions).
_IGNORED_SUFFIXES = ("embeddings.position_ids",)


def contrastive_kind(cfg: dict, source: str) -> str:
    """"clip" or "siglip" for a full-model HF config.json dict."""
    kind = cfg.get("model_type")
    if kind not in CONTRASTIVE_MODEL_TYPES:
        raise ValueError(f"{source}: model_type {kind!r} is not a full contrastive model "
                         f"{list(CONTRASTIVE_MODEL_TYPES)}")
    return kind


def text_config_from_hf(kind: str, text: dict, source: str) -> TextEncoderConfig:
    """Translate an HF CLIP/SigLIP `text_config` dict into a `TextEncoderConfig`."""
    t = {**_TEXT_DEFAULTS[kind], **{k: v for k, v in text.items() if v is not None}}
    act = _ACT_FROM_HF.get(t["hidden_act"])
    if act is None:
        raise ValueError(f"{source}: text_config.hidden_act {t['hidden_act']!r} is not supported "
                         f"({sorted(_ACT_FROM_HF)})")
    common = dict(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], num_layers=t["num_hidden_layers"],
                  num_heads=t["num_attention_heads"], intermediate_size=t["intermediate_size"],
                  max_positions=t["max_position_embeddings"], act=act, norm_eps=t["layer_norm_eps"],
                  eos_token_id=t["eos_token_id"])
    if kind == "clip":
        layout = dict(causal=True, pool="eos", head=False)
    else:
        layout = dict(causal=False, pool="last", head=True,
                      projection_size=t.get("projection_size") or t["hidden_size"])
    return build_config(TextEncoderConfig, {**common, **layout}, f"{source} (text_config)", _TEXT_KEYS)


def _stored_scalar(weights: HFWeights, name: str) -> float | None:
    """The value of a one-element tensor in the folder, or None when absent or not one element
    (the tensor check then names the misfit)."""
    shape = weights.shapes.get(name)
    if shape is None or math.prod(shape) != 1:
        return None
    return float(weights.tensor(name).reshape(()))


def contrastive_config_from_hf(cfg: dict, weights: HFWeights, source: str) -> ContrastiveConfig:
    """A `ContrastiveConfig` for an HF CLIPModel / SiglipModel config.json dict and its weights
    (the trained `logit_scale` / `logit_bias` scalars are read from them).

    The temperature cap (`max_logit_scale`) is raised to the checkpoint's own exp(logit_scale) so
    that a trained temperature above CLIP's usual 100 (SigLIP's is ~117) is kept exactly.
    """
    kind = contrastive_kind(cfg, source)
    vision = vit_config_from_hf(cfg, source)
    text = text_config_from_hf(kind, cfg.get("text_config") or {}, source)
    scale_init = _stored_scalar(weights, "logit_scale")
    if scale_init is None:
        scale_init = cfg.get("logit_scale_init_value", CLIP_LOGIT_SCALE_INIT)
    # min(): a hostile stored scale must not overflow exp().
    max_scale = max(100.0, math.ceil(math.exp(min(float(scale_init), 700.0))))
    common = dict(image_tower="vit", vision=vision, text_tower="transformer", text=text,
                  logit_scale_init=scale_init, max_logit_scale=max_scale)
    if kind == "clip":
        fields = dict(embed_dim=cfg.get("projection_dim", 512), projection=True, loss="clip")
    else:
        bias = _stored_scalar(weights, "logit_bias")
        fields = dict(embed_dim=vision.hidden_size, projection=False, loss="siglip",
                      logit_bias_init=-10.0 if bias is None else bias)
    return build_config(ContrastiveConfig, {**common, **fields}, source, {"embed_dim": "projection_dim"})


def contrastive_layout(config: ContrastiveConfig) -> str:
    """"clip" or "siglip": which HF full model `config` matches; a ValueError naming the fields otherwise."""
    c, t = config, config.text
    if c.image_tower != "vit" or c.text_tower != "transformer" or c.caption_layers:
        raise ValueError("only image_tower='vit' + text_tower='transformer' without a caption decoder has an HF "
                         f"equivalent; got image_tower={c.image_tower!r}, text_tower={c.text_tower!r}, "
                         f"caption_layers={c.caption_layers}")
    vision = vit_layout(c.vision)
    if t.act not in _ACT_TO_HF:
        raise ValueError(f"ContrastiveConfig.text.act {t.act!r} has no HF equivalent (known: {sorted(_ACT_TO_HF)})")
    if vision == "clip" and c.loss == "clip" and c.projection and t.causal and t.pool == "eos" and not t.head:
        return "clip"
    if vision == "siglip" and c.loss == "siglip" and not c.projection and not t.causal and t.pool == "last" and t.head:
        return "siglip"
    raise ValueError(
        "ContrastiveConfig matches neither CLIPModel (clip vision, loss='clip', projection, causal text, pool='eos', "
        "no head) nor SiglipModel (siglip vision, loss='siglip', no projection, bidirectional text, pool='last', "
        f"head): got vision layout {vision!r}, loss={c.loss!r}, projection={c.projection}, text.causal={t.causal}, "
        f"text.pool={t.pool!r}, text.head={t.head}"
    )


def hf_config_from_contrastive(config: ContrastiveConfig, logit_scale: float) -> dict:
    """An HF config.json dict (CLIPModel or SiglipModel) for `config`; `logit_scale` is the trained value."""
    layout = contrastive_layout(config)
    t = config.text
    vision = {k: v for k, v in hf_config_from_vit(config.vision).items() if k != "architectures"}
    text = {
        "model_type": f"{layout}_text_model",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "max_position_embeddings": t.max_positions,
        "hidden_act": _ACT_TO_HF[t.act],
        "layer_norm_eps": t.norm_eps,
        "eos_token_id": t.eos_token_id,
        # Our text tower reads neither; None stops transformers from defaulting to CLIP's
        # 49406/1, which lie outside small vocabularies and make it warn on load.
        "bos_token_id": None,
        "pad_token_id": None,
    }
    out = {"architectures": ["CLIPModel" if layout == "clip" else "SiglipModel"], "model_type": layout,
           "text_config": text, "vision_config": vision}
    if layout == "clip":
        out.update(projection_dim=config.embed_dim, logit_scale_init_value=logit_scale)
    else:
        text["projection_size"] = t.projection_size or t.hidden_size
    return out


def contrastive_state_to_hf(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Rename a `ContrastiveModel` state dict to HF CLIPModel / SiglipModel names."""
    vision = {n[len(VISION):]: t for n, t in state.items() if n.startswith(VISION)}
    out = vit_state_to_hf(vision, prefix=VISION)
    for name, tensor in state.items():
        if name.startswith(TEXT):
            hf_name = HF_TEXT_NAMES.to_foreign(name[len(TEXT):])
            if hf_name is None:
                raise KeyError(f"ContrastiveModel tensor {name!r} has no HF name")
            out[TEXT + hf_name] = tensor
    if layout == "clip":
        out["visual_projection.weight"] = state["visual_projection.weight"]
        out["text_projection.weight"] = state["text_projection.weight"]
        out["logit_scale"] = state["logit_scale"].reshape(())
    else:
        out["logit_scale"] = state["logit_scale"].reshape(1)
        out["logit_bias"] = state["logit_bias"].reshape(1)
    return out


def contrastive_state_from_hf(tensors: dict[str, torch.Tensor], model: nn.Module,
                              source: str) -> dict[str, torch.Tensor]:
    """HF CLIPModel / SiglipModel tensors -> a `ContrastiveModel` state dict, checked in HF names first.

    CLIP has no logit bias: the model keeps its own (unused by the "clip" loss). Raises
    `CheckpointMismatchError` naming the HF tensors that are missing, unexpected or mis-shaped.
    """
    own = model.state_dict()
    expected = shapes_of(contrastive_state_to_hf(own, contrastive_layout(model.config)))
    vision = {n: t for n, t in tensors.items() if n.startswith(VISION) and not n.endswith(_IGNORED_SUFFIXES)}

    def rename(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if name.startswith(VISION):  # renamed below, as one tower
            return {}
        if name.startswith(TEXT):
            return {TEXT + HF_TEXT_NAMES.to_ours(name[len(TEXT):]): tensor}
        if name in ("logit_scale", "logit_bias"):  # HF: () for CLIP, (1,) for SigLIP; ours: ()
            return {name: tensor.reshape(())}
        return {name: tensor}  # visual_projection / text_projection keep their names

    state = state_from_foreign(tensors, expected, source, rename, ignore=lambda n: n.endswith(_IGNORED_SUFFIXES))
    state.update({VISION + n: t for n, t in vit_state_from_hf(vision, model.vision_model, source).items()})
    state.setdefault("logit_bias", own["logit_bias"])
    return state


HF_CLIP_CONVERTER = Converter(
    name="CLIP / SigLIP full model (both towers)",
    family="clip",
    architectures=CONTRASTIVE_ARCHITECTURES,
    model_types=CONTRASTIVE_MODEL_TYPES,
    config_from=contrastive_config_from_hf,
    state_from=contrastive_state_from_hf,
    config_to=lambda model, tokenizer: hf_config_from_contrastive(model.config, float(model.logit_scale.detach())),
    state_to=lambda state, config: contrastive_state_to_hf(state, contrastive_layout(config)),
)
