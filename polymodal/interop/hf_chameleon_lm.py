"""The language model of a transformers `ChameleonForConditionalGeneration` folder -> `DecoderLM`.

Chameleon is one decoder over text ids and VQ image codes: a Llama layout (RMSNorm, SwiGLU,
RoPE, grouped-query attention) plus QK-norm — each query and key head is layer-normalised over
head_dim, with a per-head affine, after the projection and before RoPE (our
`qk_norm="head_layernorm"`). Names, defaults and formulas follow transformers' `ChameleonConfig`
and `modeling_chameleon` (5.x; 4.x configs with top-level `rope_theta`/`rope_scaling` are read too).

Imported here: the LM config (`chameleon_decoder_config`), the LM weights (`chameleon_lm_state`:
embeddings, layers, final norm, LM head; the `model.vqmodel.*` image tokenizer is skipped, it is
converted elsewhere) and the map between VQ codes and LM token ids (`chameleon_image_vocabulary`).

Refused, each with a one-line error naming the config key:
- `swin_norm: true` (the 30B model): its blocks normalise the attention and MLP outputs
  (x + norm(attn(x)), x + norm(mlp(x))) instead of their inputs; `DecoderLM` is pre-norm only,
  and a post-norm flag would be silently dropped by the Llama export paths;
- `attention_bias: true`: Chameleon then biases o_proj too, which `DecoderLM` has no slot for
  (its `attention_bias` covers q/k/v only);
- a `hidden_act` other than silu, and RoPE scaling types other than default/linear/llama3.
No registry wiring here: the unified model family's converter calls these functions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from polymodal.backbones.decoder import DecoderConfig, DecoderLM
from polymodal.errors import ConfigError
from polymodal.interop.converters import build_config
from polymodal.interop.hf_lm import HF_DECODER_KEYS, HF_LM_NAMES, llama_fields
from polymodal.interop.namemap import NameMap, renamer, shapes_of, state_from_foreign

# The Llama names plus the per-head q/k norms (weight and bias of shape (heads, head_dim)).
CHAMELEON_LM_NAMES = NameMap(HF_LM_NAMES.pairs + [
    ("model.layers.{}.self_attn.q_norm", "layers.layers.{}.attn.q_norm"),
    ("model.layers.{}.self_attn.k_norm", "layers.layers.{}.attn.k_norm"),
])
_VQ_PREFIX = "model.vqmodel."  # the image tokenizer's weights, not the LM's

# ChameleonConfig's defaults: transformers may leave keys equal to them out of a config.json.
_DEFAULTS = dict(vocab_size=65536, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, rms_norm_eps=1e-5, max_position_embeddings=4096, bos_token_id=1,
                 eos_token_id=2)

# Vocabulary names of the image-code tokens and of the image markers (transformers'
# `ChameleonImageVocabularyMapping` and `ChameleonProcessor`; Meta's reference `VocabInfo`
# reads the same names as boi_id / eoi_id).
_CODE_PREFIX, _IMAGE, _BOI, _EOI = "IMGIMG", "<image>", "<racm3:break>", "<eoss>"


def chameleon_decoder_config(hf_config: dict, source: str = "config.json") -> DecoderConfig:
    """A `DecoderConfig` (qk_norm="head_layernorm") for the LM of a ChameleonConfig dict.

    Raises `ConfigError` for the settings the module docstring lists as refused, and
    `CheckpointError` (naming the config.json key) for values out of `DecoderConfig`'s bounds.
    """
    cfg = {**_DEFAULTS, **hf_config}
    model_type = cfg.get("model_type", "chameleon")
    if model_type != "chameleon":
        raise ConfigError(f"{source}: model_type {model_type!r} is not a Chameleon config")
    if cfg.get("swin_norm", False):
        raise ConfigError(f"{source}: swin_norm=true (post-norm blocks of Chameleon-30B) is not supported")
    if cfg.get("attention_bias", False):
        raise ConfigError(f"{source}: attention_bias=true (Chameleon biases o_proj too) is not supported")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (Chameleon's SwiGLU uses 'silu')")
    return build_config(DecoderConfig, dict(
        **llama_fields(cfg, source),  # cfg holds ChameleonConfig's defaults for every key left out
        head_dim=None,  # Chameleon always uses hidden_size / num_attention_heads
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm="head_layernorm",
    ), source, HF_DECODER_KEYS)


def chameleon_lm_state(hf_state: Mapping[str, torch.Tensor], config: DecoderConfig,
                       source: str = "Chameleon checkpoint") -> dict[str, torch.Tensor]:
    """The `DecoderLM(config)` state dict from a ChameleonForConditionalGeneration state.

    hf_state: {transformers name: tensor} (real, or meta stand-ins for a dry run); the
    `model.vqmodel.*` tensors are ignored, and so is a stored `lm_head.weight` of a tied model
    (the result then maps `lm_head.weight` to the embedding, so a strict `load_state_dict` works).
    Raises `CheckpointMismatchError` naming `source` and the missing, unexpected or mis-shaped
    tensors, in transformers' names, before renaming anything.
    """
    with torch.device("meta"):
        probe = DecoderLM(config)
    expected = {}
    for name, shape in shapes_of(probe.state_dict()).items():
        if not (config.tie_word_embeddings and name == "lm_head.weight"):
            expected[CHAMELEON_LM_NAMES.to_foreign(name)] = shape

    def ignore(name: str) -> bool:
        return name.startswith(_VQ_PREFIX) or (config.tie_word_embeddings and name == "lm_head.weight")

    state = state_from_foreign(hf_state, expected, source, renamer(CHAMELEON_LM_NAMES), ignore)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


@dataclass(frozen=True)
class ChameleonImageVocabulary:
    """Where Chameleon's image codes live in its LM vocabulary.

    code_to_token[c]: the LM token id of VQ code c (c = 0 .. num_codes - 1);
    image_token_id: the `<image>` placeholder a prompt holds before the codes are spliced in;
    boi_token_id / eoi_token_id: the `<racm3:break>` / `<eoss>` tokens that open and close an
    image's codes (what `ChameleonProcessor` puts around the placeholders).
    """

    code_to_token: tuple[int, ...]
    image_token_id: int
    boi_token_id: int
    eoi_token_id: int


def _code_of(name: str) -> int:
    """The VQ code of an image-token name: `IMGIMG` + the code's decimal digits written as letters
    A..J (= 0..9) + one final letter (`Z`); transformers' rule keeps any other character as is."""
    digits = "".join(str(ord(ch) - ord("A")) if "A" <= ch <= "J" else ch for ch in name[len(_CODE_PREFIX):-1])
    if not (digits.isascii() and digits.isdigit()):
        raise ConfigError(f"vocabulary_map: image token {name!r} does not spell a code as IMGIMG<A..J digits>Z")
    return int(digits)


def chameleon_image_vocabulary(vocabulary_map: dict[str, int]) -> ChameleonImageVocabulary:
    """The VQ-code <-> token-id map and image marker ids from a ChameleonConfig `vocabulary_map`
    ({token name: id}). Raises `ConfigError` when a marker is missing, a name does not spell a
    code, or the codes are not exactly 0 .. N-1 each once."""
    markers = {}
    for role, name in (("image", _IMAGE), ("begin-of-image", _BOI), ("end-of-image", _EOI)):
        if not isinstance(vocabulary_map.get(name), int):
            raise ConfigError(f"vocabulary_map has no {role} token {name!r}")
        markers[name] = vocabulary_map[name]
    tokens: dict[int, int] = {}
    for name, token in vocabulary_map.items():
        if name.startswith(_CODE_PREFIX):
            code = _code_of(name)
            if code in tokens:
                raise ConfigError(f"vocabulary_map: image code {code} has two tokens ({tokens[code]} and {token})")
            tokens[code] = token
    gaps = sorted(set(range(len(tokens))) - set(tokens))
    if not tokens or gaps:
        raise ConfigError(f"vocabulary_map: image codes must be 0..N-1 each once; found {len(tokens)} "
                          f"codes, missing {gaps[:5]}")
    return ChameleonImageVocabulary(code_to_token=tuple(tokens[c] for c in range(len(tokens))),
                                    image_token_id=markers[_IMAGE], boi_token_id=markers[_BOI],
                                    eoi_token_id=markers[_EOI])
