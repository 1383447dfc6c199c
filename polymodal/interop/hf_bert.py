"""Hugging Face `BertModel` folders <-> `BertConfig` and `BertEncoder` weights.

Config keys and defaults follow transformers' `BertConfig`; weight names follow `BertModel`
(`embeddings.*`, `encoder.layer.{i}.attention.self.{query,key,value}`, `...attention.output.dense`,
`...intermediate.dense`, `...output.dense`, the two `LayerNorm`s, optional `pooler.dense`).
Checkpoints saved from a task model (e.g. `BertForMaskedLM`) prefix the encoder with `bert.`;
the prefix is found from the word-embedding tensor and the task head's tensors are left out.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from polymodal.checkpoint import CheckpointMismatchError
from polymodal.encoders.bert import BertConfig
from polymodal.interop.converters import Converter, build_config
from polymodal.interop.namemap import NameMap, renamer, shapes_of, state_from_foreign

BERT_MODEL_TYPES = ("bert",)
BERT_ARCHITECTURES = ("BertModel",)
_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2,
                 layer_norm_eps=1e-12, pad_token_id=0, position_embedding_type="absolute")
_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
# BertConfig fields whose config.json key differs (for error messages).
_KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "act": "hidden_act",
         "norm_eps": "layer_norm_eps"}

HF_BERT_NAMES = NameMap([
    ("embeddings.word_embeddings", "word_embeddings"),
    ("embeddings.position_embeddings", "position_embeddings"),
    ("embeddings.token_type_embeddings", "token_type_embeddings"),
    ("embeddings.LayerNorm", "embed_norm"),
    ("encoder.layer.{}.attention.self.query", "layers.{}.attn.q_proj"),
    ("encoder.layer.{}.attention.self.key", "layers.{}.attn.k_proj"),
    ("encoder.layer.{}.attention.self.value", "layers.{}.attn.v_proj"),
    ("encoder.layer.{}.attention.output.dense", "layers.{}.attn.o_proj"),
    ("encoder.layer.{}.attention.output.LayerNorm", "layers.{}.attn_norm"),
    ("encoder.layer.{}.intermediate.dense", "layers.{}.mlp.fc1"),
    ("encoder.layer.{}.output.dense", "layers.{}.mlp.fc2"),
    ("encoder.layer.{}.output.LayerNorm", "layers.{}.mlp_norm"),
    ("pooler.dense", "pooler"),
])
_WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"
_POOLER = "pooler.dense.weight"
# Persistent buffers of some transformers versions: arange(max_positions) and zeros(max_positions).
_IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")


def bert_prefix(tensors: Mapping[str, object], source: str) -> str:
    """The prefix of the encoder's tensors ("" for BertModel saves, "bert." for task models), from the names alone."""
    candidates = [n[: -len(_WORD_EMBEDDINGS)] for n in tensors if n.endswith(_WORD_EMBEDDINGS)]
    if not candidates:
        raise CheckpointMismatchError(f"{source}: no BERT encoder found (no tensor named '*{_WORD_EMBEDDINGS}')")
    return min(candidates, key=len)


def bert_config_from_hf(cfg: dict, source: str = "config.json", cls_pooler: bool = True) -> BertConfig:
    """Translate an HF BERT config.json dict into a `BertConfig`; `cls_pooler`: the weights hold `pooler.dense`."""
    v = {**_DEFAULTS, **{k: val for k, val in cfg.items() if val is not None}}
    act = _ACT_FROM_HF.get(v["hidden_act"])
    if act is None:
        raise ValueError(f"{source}: hidden_act {v['hidden_act']!r} is not supported ({sorted(_ACT_FROM_HF)})")
    if v["position_embedding_type"] != "absolute":
        raise ValueError(f"{source}: position_embedding_type {v['position_embedding_type']!r} is not supported "
                         "(only 'absolute')")
    fields = dict(vocab_size=v["vocab_size"], hidden_size=v["hidden_size"], num_layers=v["num_hidden_layers"],
                  num_heads=v["num_attention_heads"], intermediate_size=v["intermediate_size"],
                  max_position_embeddings=v["max_position_embeddings"], type_vocab_size=v["type_vocab_size"],
                  act=act, norm_eps=v["layer_norm_eps"], pad_token_id=v["pad_token_id"], cls_pooler=cls_pooler)
    return build_config(BertConfig, fields, source, _KEYS)


def has_cls_pooler(tensors: Mapping[str, object], source: str) -> bool:
    """Whether HF BERT tensor names (a tensor dict or a {name: shape} index) include the tanh pooler
    (`pooler.dense`)."""
    return bert_prefix(tensors, source) + _POOLER in tensors


def hf_config_from_bert(config: BertConfig) -> dict:
    """An HF config.json dict (`BertModel`) for `config`."""
    if config.act not in _ACT_TO_HF:
        raise ValueError(f"BertConfig.act {config.act!r} has no HF equivalent (known: {sorted(_ACT_TO_HF)})")
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": _ACT_TO_HF[config.act],
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": config.norm_eps,
        "pad_token_id": config.pad_token_id,
        "position_embedding_type": "absolute",
    }


def bert_state_from_hf(tensors: dict[str, torch.Tensor], model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """HF BERT tensors -> a `BertEncoder` state dict for `model`, checked in HF names first.

    Raises `CheckpointMismatchError` naming the HF tensors that are missing, unexpected or mis-shaped.
    """
    prefix = bert_prefix(tensors, source)
    expected = shapes_of(bert_state_to_hf(model.state_dict(), prefix))
    # A task model's head (e.g. `cls.predictions.*`) sits outside the prefix and is not ours.
    return state_from_foreign(tensors, expected, source, renamer(HF_BERT_NAMES, prefix),
                              ignore=lambda n: not n.startswith(prefix) or n.endswith(_IGNORED_SUFFIXES))


def bert_state_to_hf(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Rename a `BertEncoder` state dict to HF `BertModel` names, with `prefix`."""
    out = {}
    for name, tensor in state.items():
        hf_name = HF_BERT_NAMES.to_foreign(name)
        if hf_name is None:
            raise KeyError(f"BertEncoder tensor {name!r} has no HF name")
        out[prefix + hf_name] = tensor
    return out


HF_BERT_CONVERTER = Converter(
    name="BERT encoder",
    family="bert",
    architectures=BERT_ARCHITECTURES,
    model_types=BERT_MODEL_TYPES,
    config_from=lambda cfg, weights, source: bert_config_from_hf(
        cfg, source, cls_pooler=has_cls_pooler(weights.shapes, str(weights.source))),
    state_from=bert_state_from_hf,
    config_to=lambda model, tokenizer: hf_config_from_bert(model.config),
    state_to=lambda state, config: bert_state_to_hf(state),
)
