"""Import Hugging Face `Blip2ForConditionalGeneration` / `InstructBlipForConditionalGeneration` as `MultimodalLM`.

Parts (config keys and weight names as in transformers' Blip2Config / InstructBlipConfig):
- `vision_model` (Blip2VisionModel): a ViT with class token, biased patch conv, no pre-norm,
  one packed `qkv` projection whose bias is (q_bias, k part, v_bias), `projection` as output
  projection, exact GELU. It maps onto our `ViTConfig(class_token=True, pre_norm=False,
  post_norm="none", pool="none", patch_bias=True)`; its `post_layernorm`, which HF applies to
  every token before the Q-Former (`image_embeds = vision_outputs[0]`), becomes the Q-Former
  projector's `vision_norm` (LAVIS's `ln_vision`), so the features are taken from the last
  layer with the class token (`vision_feature_layer=-1`, `drop_class_token=False`).
- `query_tokens`, `qformer` (BERT-style, `qformer.layernorm` on the embeddings; InstructBLIP
  adds `qformer.embeddings.{word,position}_embeddings` and a text feed-forward) and
  `language_projection` -> `QFormerProjector` (see `polymodal.projectors.qformer`).
- `language_model`: a causal LM (`language_model.model.*`, `language_model.lm_head.weight`).
  Only Llama-style LMs (llama, mistral, qwen2) are supported; the released BLIP-2 checkpoints
  use OPT or Flan-T5, which polymodal's decoder does not implement (OPT has learned absolute
  positions, LayerNorm and ReLU; T5 is an encoder-decoder).

Image placement follows transformers 5.x: the prompt holds `num_query_tokens` copies of
`image_token_index` per image, replaced in order by the projected queries (older transformers
prepended the queries to the text instead; such configs have no `image_token_index` and are refused).
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from polymodal.checkpoint import CheckpointMismatchError
from polymodal.interop.converters import Converter, build_config
from polymodal.interop.hf_blip import blip_vision_config, packed_qkv_source, split_packed_qkv
from polymodal.interop.hf_lm import decoder_config_from_hf, lm_state_from_hf
from polymodal.interop.namemap import NameMap, state_from_foreign
from polymodal.models.mmllm import MMLLMConfig
from polymodal.projectors import ProjectorConfig

BLIP2_MODEL_TYPES = ("blip-2", "instructblip")
BLIP2_ARCHITECTURES = ("Blip2ForConditionalGeneration", "InstructBlipForConditionalGeneration")

_VISION_DEFAULTS = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                        image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True)
_QFORMER_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512,
                         layer_norm_eps=1e-12, cross_attention_frequency=2, encoder_hidden_size=1408)
_ACTS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh"}
# Our config fields whose config.json key differs (for error messages).
_QFORMER_KEYS = {"num_queries": "num_query_tokens", "num_layers": "num_hidden_layers",
                 "num_heads": "num_attention_heads", "cross_attention_every": "cross_attention_frequency",
                 "text_vocab_size": "vocab_size", "max_text_positions": "max_position_embeddings"}

_Q = "qformer.encoder.layer.{}."
_L = "projector.layers.{}."
# HF names <-> ours, outside the packed vision qkv and the reshaped (1, N, D) parameters.
BLIP2_NAMES = NameMap([
    ("vision_model.embeddings.patch_embedding", "vision.patch_embed.proj"),
    ("vision_model.encoder.layers.{}.layer_norm1", "vision.encoder.layers.{}.attn_norm"),
    ("vision_model.encoder.layers.{}.layer_norm2", "vision.encoder.layers.{}.mlp_norm"),
    ("vision_model.encoder.layers.{}.self_attn.projection", "vision.encoder.layers.{}.attn.o_proj"),
    ("vision_model.encoder.layers.{}.mlp", "vision.encoder.layers.{}.mlp"),
    ("vision_model.post_layernorm", "projector.vision_norm"),
    ("qformer.layernorm", "projector.embed_norm"),  # BLIP-2
    ("qformer.embeddings.layernorm", "projector.embed_norm"),  # InstructBLIP
    ("qformer.embeddings.word_embeddings", "projector.text_embed"),
    ("qformer.embeddings.position_embeddings", "projector.text_pos"),
    (_Q + "attention.attention.query", _L + "self_attn.q_proj"),
    (_Q + "attention.attention.key", _L + "self_attn.k_proj"),
    (_Q + "attention.attention.value", _L + "self_attn.v_proj"),
    (_Q + "attention.output.dense", _L + "self_attn.o_proj"),
    (_Q + "attention.output.LayerNorm", _L + "self_norm"),
    (_Q + "crossattention.attention.query", _L + "cross_attn.q_proj"),
    (_Q + "crossattention.attention.key", _L + "cross_attn.k_proj"),
    (_Q + "crossattention.attention.value", _L + "cross_attn.v_proj"),
    (_Q + "crossattention.output.dense", _L + "cross_attn.o_proj"),
    (_Q + "crossattention.output.LayerNorm", _L + "cross_norm"),
    (_Q + "intermediate_query.dense", _L + "query_mlp.fc1"),
    (_Q + "output_query.dense", _L + "query_mlp.fc2"),
    (_Q + "output_query.LayerNorm", _L + "query_norm"),
    (_Q + "intermediate.dense", _L + "text_mlp.fc1"),
    (_Q + "output.dense", _L + "text_mlp.fc2"),
    (_Q + "output.LayerNorm", _L + "text_norm"),
    ("language_projection", "projector.language_projection"),
])
# HF (1, N, D) parameters stored by us as (N, D) or (D,).
_RESHAPED = {
    "vision_model.embeddings.class_embedding": "vision.class_embedding",
    "vision_model.embeddings.position_embedding": "vision.position_embedding",
    "query_tokens": "projector.query_tokens",
}
_RESHAPED_OURS = {ours: hf for hf, ours in _RESHAPED.items()}
_LM_PREFIX = "language_model."
_TEXT_FFN = re.compile(r"^qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")


def _sub(cfg: dict, key: str, defaults: dict) -> dict:
    return {**defaults, **{k: v for k, v in (cfg.get(key) or {}).items() if v is not None}}


def blip2_config_from_hf(cfg: dict, source: str = "config.json") -> MMLLMConfig:
    """Translate an HF Blip2Config / InstructBlipConfig dict into an `MMLLMConfig` with a Q-Former projector."""
    if not cfg.get("use_decoder_only_language_model", True):
        raise ValueError(f"{source}: BLIP-2 with an encoder-decoder language model (T5) is not supported")
    text_cfg = cfg.get("text_config") or {}
    if text_cfg.get("model_type", "opt") not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"{source}: text_config.model_type {text_cfg.get('model_type', 'opt')!r} is not supported; "
                         "BLIP-2 imports need a Llama-style LM (llama, mistral, qwen2)")
    image_token = cfg.get("image_token_id", cfg.get("image_token_index"))
    if image_token is None:
        raise ValueError(f"{source}: no image_token_index; re-save the folder with transformers >= 4.47 so the prompt "
                         "carries image placeholder tokens (queries are no longer prepended)")
    v = _sub(cfg, "vision_config", _VISION_DEFAULTS)
    q = _sub(cfg, "qformer_config", _QFORMER_DEFAULTS)
    if v["hidden_act"] not in _ACTS or q["hidden_act"] != "gelu":
        raise ValueError(f"{source}: vision hidden_act {v['hidden_act']!r} / qformer hidden_act {q['hidden_act']!r} "
                         f"not supported (vision: {sorted(_ACTS)}; qformer: 'gelu')")
    if q["encoder_hidden_size"] != v["hidden_size"]:
        raise ValueError(f"{source}: qformer_config.encoder_hidden_size {q['encoder_hidden_size']} != "
                         f"vision_config.hidden_size {v['hidden_size']}")
    vision = blip_vision_config(v, source, post_norm="none", pool="none")
    projector = build_config(ProjectorConfig, dict(
        kind="qformer", num_queries=cfg.get("num_query_tokens", 32), num_layers=q["num_hidden_layers"],
        num_heads=q["num_attention_heads"], hidden_size=q["hidden_size"], intermediate_size=q["intermediate_size"],
        layer_norm_eps=q["layer_norm_eps"], cross_attention_every=q["cross_attention_frequency"],
        instruction_aware=cfg.get("model_type") == "instructblip", text_vocab_size=q["vocab_size"],
        max_text_positions=q["max_position_embeddings"], vision_norm_eps=v["layer_norm_eps"],
    ), f"{source} (qformer_config)", _QFORMER_KEYS)
    lm = decoder_config_from_hf(text_cfg, f"{source} (text_config)")
    fields = dict(vision=vision, lm=lm, projector=projector, vision_feature_layer=-1, drop_class_token=False,
                  image_token_id=image_token)
    return build_config(MMLLMConfig, fields, source, {"image_token_id": "image_token_index"})


def _expected_hf_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The non-LM tensors (HF name -> shape) a folder must hold for `model`."""
    out = {}
    instruction_aware = model.projector.text_embed is not None
    for name, tensor in model.state_dict().items():
        if name.startswith("lm."):
            continue
        packed = packed_qkv_source(name, tensor, "vision")
        if packed is not None:
            out[packed[0]] = packed[1]
            continue
        reshaped = _RESHAPED_OURS.get(name)
        if reshaped is not None:
            out[reshaped] = (1, *tensor.shape) if tensor.dim() == 2 else (1, 1, *tensor.shape)
            continue
        hf = BLIP2_NAMES.to_foreign(name)
        if hf is None:
            raise KeyError(f"MultimodalLM tensor {name!r} has no BLIP-2 name")
        if instruction_aware and hf.startswith("qformer.layernorm."):
            hf = "qformer.embeddings." + hf[len("qformer."):]  # InstructBLIP normalises inside its embeddings
        out[hf] = tuple(tensor.shape)
    return out


def blip2_state_from_hf(tensors: dict[str, torch.Tensor], model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """BLIP-2 / InstructBLIP tensors -> a `MultimodalLM` state dict, checked in HF names first.

    Ignored: the position-id buffer some saves persist, and (for BLIP-2, which never feeds text to
    its Q-Former when generating) the Q-Former's text feed-forward `intermediate` / `output`.
    Raises `CheckpointMismatchError` naming missing, unexpected or mis-shaped tensors.
    """
    text_ffn = model.projector.text_embed is not None
    lm = {k[len(_LM_PREFIX):]: t for k, t in tensors.items() if k.startswith(_LM_PREFIX)}
    vision_qkv_bias = any(k.endswith("self_attn.qkv.bias") for k in tensors)
    expected = _expected_hf_shapes(model)
    if not vision_qkv_bias:  # qkv_bias=false: our always-biased projections get zero biases
        expected = {k: s for k, s in expected.items() if not k.endswith("self_attn.qkv.bias")}
    ours_state = model.state_dict()

    def ignore(name: str) -> bool:  # the LM is checked on its own, below
        unused_ffn = not text_ffn and _TEXT_FFN.match(name) is not None
        return name.startswith(_LM_PREFIX) or name.endswith("position_ids") or unused_ffn

    def rename(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if name in _RESHAPED:  # (1, N, D) -> (N, D) or (D,)
            return {_RESHAPED[name]: tensor.reshape(ours_state[_RESHAPED[name]].shape)}
        return split_packed_qkv(name, tensor, "vision") or {BLIP2_NAMES.to_ours(name): tensor}

    state = state_from_foreign(tensors, expected, source, rename, ignore)
    if not vision_qkv_bias:
        for name, tensor in ours_state.items():
            if name.startswith("vision.encoder.") and name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                state[name] = torch.zeros_like(tensor)
    if not lm:
        raise CheckpointMismatchError(f"tensors in {source}: no language model (no '{_LM_PREFIX}*' tensors)")
    state.update({f"lm.{k}": t for k, t in lm_state_from_hf(lm, model.lm, source).items()})
    return state


HF_BLIP2_CONVERTER = Converter(
    name="BLIP-2 / InstructBLIP (import only)",
    family="mmllm",
    architectures=BLIP2_ARCHITECTURES,
    model_types=BLIP2_MODEL_TYPES,
    config_from=lambda cfg, weights, source: blip2_config_from_hf(cfg, source),
    state_from=blip2_state_from_hf,
)
