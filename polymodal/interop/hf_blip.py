"""Import Hugging Face `BlipForImageTextRetrieval` / `BlipForConditionalGeneration` folders as `BlipModel`.

Config keys and weight names as in transformers' BlipConfig and modeling_blip / modeling_blip_text:
- `vision_model` (BlipVisionModel): a ViT with class token, biased patch conv, no pre-norm, one
  packed `qkv` projection (rows q, k, v), `projection` as output projection, and
  `post_layernorm` on every output token -> our `ViTConfig(pre_norm=False, post_norm="all",
  pool="cls", patch_bias=True)`; ITC reads the normed class token, as the retrieval model does.
- the BERT-style text transformer: `text_encoder.*` (retrieval) or `text_decoder.bert.*`
  (captioning), each layer `attention` (self), `crossattention`, `intermediate` / `output`
  (feed-forward), post-LN -> `text_model`, whose self-attention is `encoder_attn` for the
  retrieval folder and `decoder_attn` for the captioning folder. One folder holds one side, so the
  imported model has that side only (`BlipConfig.retrieval` / `captioning`).
- `vision_proj`, `text_proj`, `itm_head` (retrieval); `text_decoder.cls.predictions.*`, whose
  output matrix is tied to the word embeddings (captioning) -> `lm_head`.
- The retrieval folder has no temperature: `logit_scale` gets `BlipConfig.logit_scale_init`.

transformers' retrieval model feeds ITM the ids as given, so imported models keep the first token
(`enc_token_id` None); captions start with `bos_token_id` and end with `sep_token_id`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from polymodal.encoders.vit import ViTConfig
from polymodal.interop.converters import Converter, build_config
from polymodal.interop.namemap import NameMap, state_from_foreign
from polymodal.models.blip import BlipConfig, MEDConfig

BLIP_ARCHITECTURES = ("BlipForImageTextRetrieval", "BlipForConditionalGeneration")
BLIP_MODEL_TYPES = ("blip",)

_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        image_size=384, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-5)
_TEXT_DEFAULTS = dict(vocab_size=30524, hidden_size=768, num_hidden_layers=12, num_attention_heads=8,
                      intermediate_size=3072, max_position_embeddings=512, hidden_act="gelu", layer_norm_eps=1e-12,
                      pad_token_id=0, bos_token_id=30522, sep_token_id=102, is_decoder=True, tie_word_embeddings=True)
_ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu"}
# Our config fields whose config.json key differs (for error messages).
_KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "norm_eps": "layer_norm_eps",
         "max_positions": "max_position_embeddings", "eos_token_id": "sep_token_id", "act": "hidden_act",
         "embed_dim": "image_text_hidden_size"}

_V = "vision_model.encoder.layers.{}."
_VISION_NAMES = [
    ("vision_model.embeddings.patch_embedding", "vision_model.patch_embed.proj"),
    (_V + "layer_norm1", _V + "attn_norm"),
    (_V + "layer_norm2", _V + "mlp_norm"),
    (_V + "self_attn.projection", _V + "attn.o_proj"),
    (_V + "mlp", _V + "mlp"),
    ("vision_model.post_layernorm", "vision_model.post_norm"),
]
_HEAD_NAMES = [("vision_proj", "vision_proj"), ("text_proj", "text_proj"), ("itm_head", "itm_head")]
_LM_HEAD_NAMES = [
    ("text_decoder.cls.predictions.transform.dense", "lm_head.dense"),
    ("text_decoder.cls.predictions.transform.LayerNorm", "lm_head.norm"),
    ("text_decoder.cls.predictions.bias", "lm_head.bias"),
]
# HF (1, N, D) parameters stored by us as (N, D) or (D,).
_RESHAPED = {"vision_model.embeddings.class_embedding": "vision_model.class_embedding",
             "vision_model.embeddings.position_embedding": "vision_model.position_embedding"}
_RESHAPED_OURS = {ours: hf for hf, ours in _RESHAPED.items()}
_QKV = "vision_model.encoder.layers.{}.self_attn.qkv"
# The tied output matrix (and its bias copy) some saves persist, and position-id buffers.
_IGNORED = ("text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias")


def _text_names(prefix: str, self_attn: str) -> list[tuple[str, str]]:
    """HF <-> our names of one MED side: `prefix` "text_encoder." or "text_decoder.bert.", its
    self-attention ours `self_attn` ("encoder_attn" | "decoder_attn")."""
    hf, ours = prefix + "encoder.layer.{}.", "text_model.layers.{}."
    pairs = [(prefix + "embeddings.word_embeddings", "text_model.word_embeddings"),
             (prefix + "embeddings.position_embeddings", "text_model.position_embeddings"),
             (prefix + "embeddings.LayerNorm", "text_model.embed_norm"),
             (hf + "intermediate.dense", ours + "mlp.fc1"),
             (hf + "output.dense", ours + "mlp.fc2"),
             (hf + "output.LayerNorm", ours + "mlp_norm")]
    for theirs, mine in (("attention", self_attn), ("crossattention", "cross_attn")):
        pairs += [(hf + f"{theirs}.self.query", ours + f"{mine}.attn.q_proj"),
                  (hf + f"{theirs}.self.key", ours + f"{mine}.attn.k_proj"),
                  (hf + f"{theirs}.self.value", ours + f"{mine}.attn.v_proj"),
                  (hf + f"{theirs}.output.dense", ours + f"{mine}.attn.o_proj"),
                  (hf + f"{theirs}.output.LayerNorm", ours + f"{mine}.norm")]
    return pairs


RETRIEVAL_NAMES = NameMap(_VISION_NAMES + _text_names("text_encoder.", "encoder_attn") + _HEAD_NAMES)
CAPTIONING_NAMES = NameMap(_VISION_NAMES + _text_names("text_decoder.bert.", "decoder_attn") + _LM_HEAD_NAMES)


def _sub(cfg: dict, key: str, defaults: dict) -> dict:
    return {**defaults, **{k: v for k, v in (cfg.get(key) or {}).items() if v is not None}}


def _sides(cfg: dict, names, source: str) -> tuple[bool, bool]:
    """(retrieval, captioning) of a folder: by its `architectures`, else by which tensors it holds."""
    architectures = cfg.get("architectures") or []
    if architectures:
        if len(architectures) != 1:
            raise ValueError(f"{source}: a BLIP folder declares one architecture, got {architectures}")
        return architectures[0] == "BlipForImageTextRetrieval", architectures[0] == "BlipForConditionalGeneration"
    retrieval = any(name.startswith("text_encoder.") for name in names)
    captioning = any(name.startswith("text_decoder.") for name in names)
    if retrieval == captioning:
        raise ValueError(f"{source}: cannot tell the BLIP head (no 'architectures'; expected text_encoder.* "
                         "tensors for retrieval or text_decoder.* for captioning, not both or neither)")
    return retrieval, captioning


def packed_qkv_source(name: str, tensor: torch.Tensor, tower: str) -> tuple[str, tuple[int, ...]] | None:
    """For one of our q/k/v projection tensors of the BLIP ViT under `tower`
    ("<tower>.encoder.layers.L.attn.{q,k,v}_proj.{weight,bias}"): the packed transformers tensor
    it comes from and that tensor's shape (3D, ...); None for any other tensor."""
    parts = name.split(".")
    if parts[:2] == [tower, "encoder"] and parts[4] == "attn" and parts[5] in ("q_proj", "k_proj", "v_proj"):
        return f"{_QKV.format(parts[3])}.{parts[6]}", (3 * tensor.shape[0], *tensor.shape[1:])
    return None


def split_packed_qkv(name: str, tensor: torch.Tensor, tower: str) -> dict[str, torch.Tensor] | None:
    """A packed transformers ViT `self_attn.qkv` tensor (3D, ...) as our q, k, v projections
    under `tower`; None for any other name."""
    if ".self_attn.qkv." not in name:
        return None
    layer, kind = name.split(".")[3], name.rsplit(".", 1)[1]
    return {f"{tower}.encoder.layers.{layer}.attn.{proj}_proj.{kind}": part
            for proj, part in zip("qkv", tensor.chunk(3, dim=0), strict=True)}


def blip_vision_config(v: dict, source: str, *, post_norm: str, pool: str) -> ViTConfig:
    """Our `ViTConfig` of a transformers BLIP or BLIP-2 `vision_config` dict `v`: BLIP's ViT (a
    class token, no pre-norm, a biased patch embedding). BLIP normalises every output token and
    pools the class token (post_norm="all", pool="cls"); BLIP-2's Q-Former reads the last
    layer's tokens as they are ("none", "none"). `source` names the file in errors."""
    if v["hidden_act"] not in _ACTS:
        raise ValueError(f"{source}: vision_config.hidden_act {v['hidden_act']!r} is not supported; "
                         f"supported: {sorted(_ACTS)}")
    return build_config(ViTConfig, dict(
        image_size=v["image_size"], patch_size=v["patch_size"], hidden_size=v["hidden_size"],
        num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"], intermediate_size=v["intermediate_size"],
        act=_ACTS[v["hidden_act"]], norm_eps=v["layer_norm_eps"], class_token=True, pre_norm=False,
        post_norm=post_norm, pool=pool, patch_bias=True,
    ), f"{source} (vision_config)", _KEYS)


def blip_config_from_hf(cfg: dict, names, source: str = "config.json") -> BlipConfig:
    """Translate an HF BlipConfig dict (and the folder's tensor `names`) into a `BlipConfig`."""
    retrieval, captioning = _sides(cfg, names, source)
    v = _sub(cfg, "vision_config", _VISION_DEFAULTS)
    t = _sub(cfg, "text_config", _TEXT_DEFAULTS)
    if t["hidden_act"] not in _ACTS:  # the vision tower's is checked by `blip_vision_config`
        raise ValueError(f"{source}: text_config.hidden_act {t['hidden_act']!r} is not supported; "
                         f"supported: {sorted(_ACTS)}")
    if not t["is_decoder"]:
        raise ValueError(f"{source}: text_config.is_decoder false builds no cross-attention; BLIP needs it")
    if captioning and not (t["tie_word_embeddings"] and cfg.get("tie_word_embeddings", True)):
        raise ValueError(f"{source}: tie_word_embeddings false (an untied caption head) is not supported")
    vision = blip_vision_config(v, source, post_norm="all", pool="cls")
    text = build_config(MEDConfig, dict(
        vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], num_layers=t["num_hidden_layers"],
        num_heads=t["num_attention_heads"], intermediate_size=t["intermediate_size"],
        max_positions=t["max_position_embeddings"], act=_ACTS[t["hidden_act"]], norm_eps=t["layer_norm_eps"],
        pad_token_id=t["pad_token_id"], bos_token_id=t["bos_token_id"], eos_token_id=t["sep_token_id"],
    ), f"{source} (text_config)", _KEYS)
    return build_config(BlipConfig, dict(image_tower="vit", vision=vision, text=text,
                                         embed_dim=cfg.get("image_text_hidden_size", 256), retrieval=retrieval,
                                         captioning=captioning), source, _KEYS)


def _names_for(model: nn.Module) -> NameMap:
    return RETRIEVAL_NAMES if model.config.retrieval else CAPTIONING_NAMES


def _expected_hf_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The tensors (HF name -> shape) a folder must hold for `model`."""
    names, out = _names_for(model), {}
    for name, tensor in model.state_dict().items():
        if name == "logit_scale":
            continue
        packed = packed_qkv_source(name, tensor, "vision_model")
        if packed is not None:
            out[packed[0]] = packed[1]
        elif name in _RESHAPED_OURS:
            out[_RESHAPED_OURS[name]] = (1, *tensor.shape) if tensor.dim() == 2 else (1, 1, *tensor.shape)
        else:
            hf = names.to_foreign(name)
            if hf is None:
                raise KeyError(f"BlipModel tensor {name!r} has no transformers name")
            out[hf] = tuple(tensor.shape)
    return out


def blip_state_from_hf(tensors: dict[str, torch.Tensor], model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """BLIP tensors -> a `BlipModel` state dict, checked in HF names first (`CheckpointMismatchError`
    names missing, unexpected or mis-shaped tensors)."""
    names, ours = _names_for(model), model.state_dict()

    def ignore(name: str) -> bool:
        return name.endswith("position_ids") or name in _IGNORED

    def rename(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if name in _RESHAPED:
            return {_RESHAPED[name]: tensor.reshape(ours[_RESHAPED[name]].shape)}
        return split_packed_qkv(name, tensor, "vision_model") or {names.to_ours(name): tensor}

    state = state_from_foreign(tensors, _expected_hf_shapes(model), source, rename, ignore)
    if model.config.retrieval:
        state["logit_scale"] = torch.full_like(ours["logit_scale"], model.config.logit_scale_init, device="cpu")
    return state


HF_BLIP_CONVERTER = Converter(
    name="BLIP retrieval / captioning (import only)",
    family="blip",
    architectures=BLIP_ARCHITECTURES,
    model_types=BLIP_MODEL_TYPES,
    config_from=lambda cfg, weights, source: blip_config_from_hf(cfg, weights.shapes, source),
    state_from=blip_state_from_hf,
)
