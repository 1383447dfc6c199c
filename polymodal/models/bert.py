"""The `bert` family: a BERT-style bidirectional text encoder (BERT, MiniLM sentence embedders)."""
from __future__ import annotations

import torch

from polymodal.encoders.bert import BertConfig, BertEncoder
from polymodal.models.registry import Family, register


def bert_tiny() -> BertConfig:
    """A 2-layer 64-wide BERT for unit tests."""
    return BertConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                      max_position_embeddings=32)


def minilm_l6() -> BertConfig:
    """all-MiniLM-L6-v2 sizes (sentence-transformers/all-MiniLM-L6-v2 config.json)."""
    return BertConfig(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536)


def _example_batch(model: BertEncoder) -> dict:
    ids = torch.randint(1, model.config.vocab_size, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# A tower that other families compose (LiT's text tower); on its own it has no objective.
BERT = register(Family("bert", BertConfig, BertEncoder, bert_tiny, _example_batch, objective=None,
                       converters=("polymodal.interop.hf_bert:HF_BERT_CONVERTER",)))
