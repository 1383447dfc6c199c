"""Checkpoint interop: import/export Hugging Face folders, import GGUF files, detect formats.

    import_hf(folder, dtype) -> (DecoderLM | VisionTransformer | ContrastiveModel | BertEncoder | MultimodalLM,
                                TextTokenizer | None)
    export_hf(model, folder, tokenizer=None, max_shard_bytes=None) -> Path
    import_gguf(path, dtype) -> (DecoderLM, TextTokenizer)
    detect_format(path) -> "polymodal" | "hf" | "gguf"
"""
from polymodal.interop.formats import detect_format
from polymodal.interop.gguf_lm import import_gguf
from polymodal.interop.hf import export_hf, import_hf

__all__ = ["detect_format", "export_hf", "import_gguf", "import_hf"]
