"""Hugging Face CLIP / SigLIP vision towers <-> `ViTConfig` and `VisionTransformer` weights.

Accepts `CLIPVisionModel` / `SiglipVisionModel` folders and full `CLIPModel` / `SiglipModel`
folders (the vision tower is taken, the text tower ignored). Config keys and defaults follow
transformers' `CLIPVisionConfig` / `SiglipVisionConfig`; weight names follow their modules,
including CLIP's `pre_layrnorm` (sic) and SigLIP's MAP head, an `nn.MultiheadAttention` whose
q/k/v projections are packed into one `in_proj_weight` / `in_proj_bias` (rows q, then k, then v).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from polymodal.checkpoint import CheckpointMismatchError
from polymodal.encoders.vit import ViTConfig
from polymodal.interop.converters import Converter, build_config
from polymodal.interop.namemap import NameMap, shapes_of, state_from_foreign

VIT_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model", "clip", "siglip")
VIT_ARCHITECTURES = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "SiglipVisionModel")
# Exported towers use the hub's classic `vision_model.` prefix, which every transformers
# version loads into CLIPVisionModel / SiglipVisionModel.
VISION_PREFIX = "vision_model."

_DEFAULTS = {  # transformers' CLIPVisionConfig / SiglipVisionConfig defaults, for keys a config.json omits
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                   layer_norm_eps=1e-6, vision_use_head=True),
}
_ACT_FROM_HF = {"quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}
_ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
# ViTConfig fields whose config.json key differs (for error messages).
_KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "act": "hidden_act",
         "norm_eps": "layer_norm_eps"}

# Names relative to the vision tower (HF's `vision_model.` prefix is handled separately).
# transformers' CLIP/SigLIP encoder layer -> our TransformerBlock (shared by the vision and text towers).
CLIP_ENCODER_LAYER_NAMES = [
    ("encoder.layers.{}.layer_norm1", "encoder.layers.{}.attn_norm"),
    ("encoder.layers.{}.layer_norm2", "encoder.layers.{}.mlp_norm"),
    ("encoder.layers.{}.self_attn.q_proj", "encoder.layers.{}.attn.q_proj"),
    ("encoder.layers.{}.self_attn.k_proj", "encoder.layers.{}.attn.k_proj"),
    ("encoder.layers.{}.self_attn.v_proj", "encoder.layers.{}.attn.v_proj"),
    ("encoder.layers.{}.self_attn.out_proj", "encoder.layers.{}.attn.o_proj"),
    ("encoder.layers.{}.mlp", "encoder.layers.{}.mlp"),
]

HF_VIT_NAMES = NameMap([
    ("embeddings.class_embedding", "class_embedding"),
    ("embeddings.patch_embedding", "patch_embed.proj"),
    ("embeddings.position_embedding.weight", "position_embedding"),
    ("pre_layrnorm", "pre_norm"),
    ("post_layernorm", "post_norm"),
    *CLIP_ENCODER_LAYER_NAMES,
    ("head.probe", "head.probe"),
    ("head.attention.out_proj", "head.attn.o_proj"),
    ("head.layernorm", "head.norm"),
    ("head.mlp", "head.mlp"),
])
_PACKED = {"head.attention.in_proj_weight": "weight", "head.attention.in_proj_bias": "bias"}
_PATCH_WEIGHT = "embeddings.patch_embedding.weight"
# Older checkpoints persist the position-id buffer; it is just arange(num_positions).
_IGNORED_SUFFIXES = ("embeddings.position_ids",)


def vision_kind(cfg: dict, source: str) -> tuple[str, dict]:
    """("clip" | "siglip", the vision config dict) of an HF config.json dict, tower or full model."""
    model_type = cfg.get("model_type")
    if model_type in ("clip", "siglip"):
        vision = cfg.get("vision_config") or {}
        return model_type, vision
    if model_type in ("clip_vision_model", "siglip_vision_model"):
        return model_type.split("_")[0], cfg
    raise ValueError(f"{source}: model_type {model_type!r} is not a supported vision model {list(VIT_MODEL_TYPES)}")


def vit_config_from_hf(cfg: dict, source: str = "config.json") -> ViTConfig:
    """Translate an HF CLIP/SigLIP (vision) config.json dict into a `ViTConfig`."""
    kind, vision = vision_kind(cfg, source)
    v = {**_DEFAULTS[kind], **{k: val for k, val in vision.items() if val is not None}}
    act = _ACT_FROM_HF.get(v["hidden_act"])
    if act is None:
        raise ValueError(f"{source}: vision hidden_act {v['hidden_act']!r} is not supported ({sorted(_ACT_FROM_HF)})")
    common = dict(image_size=v["image_size"], patch_size=v["patch_size"], num_channels=v["num_channels"],
                  hidden_size=v["hidden_size"], num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
                  intermediate_size=v["intermediate_size"], act=act, norm_eps=v["layer_norm_eps"])
    if kind == "clip":
        layout = dict(class_token=True, pre_norm=True, post_norm="pooled", pool="cls", patch_bias=False)
    else:
        layout = dict(class_token=False, pre_norm=False, post_norm="all",
                      pool="map" if v.get("vision_use_head", True) else "none", patch_bias=True)
    return build_config(ViTConfig, {**common, **layout}, source, _KEYS)


def vit_layout(config: ViTConfig) -> str:
    """"clip" or "siglip": which HF vision tower `config` matches; a ValueError naming the fields otherwise."""
    c = config
    if c.class_token and c.pre_norm and c.post_norm == "pooled" and c.pool == "cls" and not c.patch_bias:
        layout = "clip"
    elif not c.class_token and not c.pre_norm and c.post_norm == "all" and c.pool in ("map", "none") and c.patch_bias:
        layout = "siglip"
    else:
        raise ValueError(
            "ViTConfig matches neither CLIP (class_token, pre_norm, post_norm='pooled', pool='cls', no patch_bias) nor "
            "SigLIP (no class_token/pre_norm, post_norm='all', pool='map'|'none', patch_bias): "
            f"got class_token={c.class_token}, pre_norm={c.pre_norm}, post_norm={c.post_norm!r}, pool={c.pool!r}, "
            f"patch_bias={c.patch_bias}"
        )
    if c.act not in _ACT_TO_HF:
        raise ValueError(f"ViTConfig.act {c.act!r} has no HF equivalent (known: {sorted(_ACT_TO_HF)})")
    return layout


def hf_config_from_vit(config: ViTConfig) -> dict:
    """An HF config.json dict (CLIPVisionModel or SiglipVisionModel) for `config`."""
    layout = vit_layout(config)
    c = config
    out = {
        "architectures": ["CLIPVisionModel" if layout == "clip" else "SiglipVisionModel"],
        "model_type": f"{layout}_vision_model",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_channels": c.num_channels,
        "image_size": c.image_size,
        "patch_size": c.patch_size,
        "hidden_act": _ACT_TO_HF[c.act],
        "layer_norm_eps": c.norm_eps,
    }
    if layout == "siglip":
        out["vision_use_head"] = c.pool == "map"
    return out


def _vision_prefix(tensors: dict[str, torch.Tensor], source: str) -> str:
    """The prefix of the vision tower's tensors ("vision_model." in hub checkpoints, "" in some saves)."""
    candidates = [n[: -len(_PATCH_WEIGHT)] for n in tensors if n.endswith(_PATCH_WEIGHT)]
    if not candidates:
        raise CheckpointMismatchError(f"{source}: no vision tower found (no tensor named '*{_PATCH_WEIGHT}')")
    return min(candidates, key=len)


def vit_state_from_hf(tensors: dict[str, torch.Tensor], model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """HF vision-tower tensors -> a VisionTransformer state dict for `model`, checked in HF names first.

    Tensors outside the tower's prefix (a full model's text tower and projections) are ignored.
    Raises `CheckpointMismatchError` naming the HF tensors that are missing, unexpected or mis-shaped.
    """
    prefix = _vision_prefix(tensors, source)

    def rename(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        name = name[len(prefix):]
        if name in _PACKED:  # SigLIP's MAP head: one (3D, ...) in_proj -> q, k, v
            return {f"head.attn.{proj}_proj.{_PACKED[name]}": part
                    for proj, part in zip("qkv", tensor.chunk(3, dim=0), strict=True)}
        return {HF_VIT_NAMES.to_ours(name): tensor}

    expected = shapes_of(vit_state_to_hf(model.state_dict(), prefix))
    return state_from_foreign(tensors, expected, source, rename,
                              ignore=lambda n: not n.startswith(prefix) or n.endswith(_IGNORED_SUFFIXES))


def vit_state_to_hf(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Rename a VisionTransformer state dict to HF names (packing the MAP head's q/k/v), with `prefix`."""
    out = {}
    packed: dict[str, dict[str, torch.Tensor]] = {}  # {"weight"|"bias": {"q_proj": tensor, ...}}
    for name, tensor in state.items():
        parts = name.split(".")
        if parts[:2] == ["head", "attn"] and parts[2] in ("q_proj", "k_proj", "v_proj"):
            packed.setdefault(parts[3], {})[parts[2]] = tensor
            continue
        hf_name = HF_VIT_NAMES.to_foreign(name)
        if hf_name is None:
            raise KeyError(f"VisionTransformer tensor {name!r} has no HF name")
        out[prefix + hf_name] = tensor
    for hf_name, kind in _PACKED.items():
        if kind in packed:
            out[prefix + hf_name] = torch.cat([packed[kind][p] for p in ("q_proj", "k_proj", "v_proj")])  # (3D, ...)
    return out


HF_VIT_CONVERTER = Converter(
    name="CLIP / SigLIP vision tower",
    family="vit",
    architectures=VIT_ARCHITECTURES,
    model_types=("clip_vision_model", "siglip_vision_model"),
    config_from=lambda cfg, weights, source: vit_config_from_hf(cfg, source),
    state_from=vit_state_from_hf,
    config_to=lambda model, tokenizer: hf_config_from_vit(model.config),
    state_to=lambda state, config: vit_state_to_hf(state, prefix=VISION_PREFIX),
)
