"""Tokenizers: text (HF tokenizer.json, BPE training, chat templates, GGUF vocabularies)."""
from polymodal.tokenizers.text import MODALITY_TOKENS, IncrementalDecoder, TextTokenizer

__all__ = ["MODALITY_TOKENS", "IncrementalDecoder", "TextTokenizer"]
