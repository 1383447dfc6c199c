"""Hugging Face Llama / Mistral / Qwen2 (and SmolLM, a Llama) <-> `DecoderConfig` and `DecoderLM` weights.

Config keys and weight names follow transformers' `LlamaConfig` / `MistralConfig` / `Qwen2Config`
and `*ForCausalLM` modules. Both config generations are read: transformers 4 (`rope_theta` +
`rope_scaling`) and 5 (`rope_parameters` holding `rope_theta` and the scaling fields).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from polymodal.backbones.decoder import DecoderConfig
from polymodal.interop.converters import Converter, build_config
from polymodal.interop.namemap import NameMap, renamer, shapes_of, state_from_foreign

LM_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# DecoderConfig fields whose config.json key differs (for error messages).
HF_DECODER_KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads"}

# HF module paths <-> DecoderLM's (see polymodal.backbones.decoder and polymodal.nn.transformer).
HF_LM_NAMES = NameMap([
    ("model.embed_tokens", "embed_tokens"),
    ("model.norm", "norm"),
    ("lm_head", "lm_head"),
    ("model.layers.{}.input_layernorm", "layers.layers.{}.attn_norm"),
    ("model.layers.{}.post_attention_layernorm", "layers.layers.{}.mlp_norm"),
    ("model.layers.{}.self_attn.q_proj", "layers.layers.{}.attn.q_proj"),
    ("model.layers.{}.self_attn.k_proj", "layers.layers.{}.attn.k_proj"),
    ("model.layers.{}.self_attn.v_proj", "layers.layers.{}.attn.v_proj"),
    ("model.layers.{}.self_attn.o_proj", "layers.layers.{}.attn.o_proj"),
    ("model.layers.{}.mlp", "layers.layers.{}.mlp"),
])

# Older checkpoints persist RoPE's inverse frequencies; we recompute them from the config.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_SUPPORTED_ROPE = ("default", "linear", "llama3")


def rope_from_hf(cfg: dict, source: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from either config generation."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta, scaling = params["rope_theta"], {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta, scaling = cfg.get("rope_theta", 10000.0), cfg.get("rope_scaling")
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in _SUPPORTED_ROPE:
        raise ValueError(f"{source}: rope scaling type {kind!r} is not supported (supported: {list(_SUPPORTED_ROPE)})")
    if kind == "default":
        return float(theta), None
    return float(theta), {"rope_type": kind, **{k: v for k, v in scaling.items() if k not in ("type", "rope_type")}}


def _check_sliding_window(cfg: dict, model_type: str, source: str) -> None:
    """Reject a sliding window that would actually restrict attention (we only do full attention)."""
    window = cfg.get("sliding_window")
    if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
        return
    max_pos = cfg.get("max_position_embeddings", 2048)
    if window is not None and window < max_pos:
        raise ValueError(
            f"{source}: sliding_window={window} < max_position_embeddings={max_pos} is not supported "
            "(polymodal decoders use full causal attention); set sliding_window to null"
        )


def decoder_config_from_hf(cfg: dict, source: str = "config.json") -> DecoderConfig:
    """Translate an HF Llama/Mistral/Qwen2 config.json dict into a `DecoderConfig`."""
    model_type = cfg.get("model_type")
    if model_type not in LM_MODEL_TYPES:
        raise ValueError(f"{source}: model_type {model_type!r} is not a supported LM ({sorted(LM_MODEL_TYPES)})")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act {act!r} is not supported (SwiGLU decoders use 'silu')")
    if model_type == "llama" and cfg.get("attention_bias", False):
        raise ValueError(f"{source}: Llama attention_bias=true (a biased o_proj) is not supported")
    _check_sliding_window(cfg, model_type, source)
    return build_config(DecoderConfig, dict(
        **llama_fields(cfg, source),
        head_dim=cfg.get("head_dim") or None,
        attention_bias=model_type == "qwen2",
        mlp_bias=bool(cfg.get("mlp_bias", False)) if model_type == "llama" else False,
    ), source, HF_DECODER_KEYS)


def llama_fields(cfg: dict, source: str) -> dict:
    """The `DecoderConfig` fields every Llama-layout HF config names the same way (sizes, norm eps,
    RoPE, positions, tied head, special ids), with Llama's defaults for keys left out."""
    theta, scaling = rope_from_hf(cfg, source)
    heads = cfg["num_attention_heads"]
    return dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
    )


def hf_config_from_decoder(config: DecoderConfig) -> dict:
    """An HF config.json dict for `config`: LlamaForCausalLM, or Qwen2ForCausalLM when attention_bias."""
    c = config
    if c.qk_norm is not None:
        raise ValueError(f"DecoderConfig.qk_norm={c.qk_norm!r} (Chameleon's per-head q/k norms) has no Llama / Qwen2 "
                         "equivalent; this model cannot be exported to those layouts")
    if c.attention_bias and c.mlp_bias:
        raise ValueError("DecoderConfig: attention_bias with mlp_bias has no HF architecture (Qwen2 has no mlp_bias)")
    qwen2 = c.attention_bias
    out = {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        # transformers 5 folds these legacy keys into `rope_parameters`; 4.x reads them directly.
        "rope_theta": c.rope_theta,
        "rope_scaling": dict(c.rope_scaling) if c.rope_scaling else None,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
    }
    if qwen2:
        out.update(use_sliding_window=False, sliding_window=None)
    else:
        out.update(attention_bias=False, mlp_bias=c.mlp_bias)
    return out


def fill_token_roles(cfg: dict, tokenizer) -> dict:
    """Fill the bos/eos/pad token ids a config dict leaves open from `tokenizer` (for HF's generate())."""
    if tokenizer is not None:
        for role in ("bos", "eos", "pad"):
            if cfg[f"{role}_token_id"] is None:
                cfg[f"{role}_token_id"] = getattr(tokenizer, f"{role}_token_id")
    return cfg


def lm_state_from_hf(tensors: dict[str, torch.Tensor], model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """HF LM tensors -> a DecoderLM state dict for `model`, checked in HF names first.

    A tied model ignores a stored `lm_head.weight` (the embedding is used). Raises
    `CheckpointMismatchError` naming the HF tensors that are missing, unexpected or mis-shaped.
    """
    config = model.config

    def ignore(name: str) -> bool:
        return name.endswith(_IGNORED_SUFFIXES) or (config.tie_word_embeddings and name == "lm_head.weight")

    expected = shapes_of(lm_state_to_hf(model.state_dict(), config))
    return state_from_foreign(tensors, expected, source, renamer(HF_LM_NAMES), ignore)


def lm_state_to_hf(state: dict[str, torch.Tensor], config: DecoderConfig) -> dict[str, torch.Tensor]:
    """Rename a DecoderLM state dict to HF names; a tied model stores the embedding once."""
    out = {}
    for name, tensor in state.items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        hf_name = HF_LM_NAMES.to_foreign(name)
        if hf_name is None:
            raise KeyError(f"DecoderLM tensor {name!r} has no HF name")
        out[hf_name] = tensor
    return out


HF_LM_CONVERTER = Converter(
    name="Llama / Mistral / Qwen2 causal LM",
    family="lm",
    architectures=tuple(LM_MODEL_TYPES.values()),
    model_types=tuple(LM_MODEL_TYPES),
    config_from=lambda cfg, weights, source: decoder_config_from_hf(cfg, source),
    state_from=lm_state_from_hf,
    config_to=lambda model, tokenizer: fill_token_roles(hf_config_from_decoder(model.config), tokenizer),
    state_to=lm_state_to_hf,
)
