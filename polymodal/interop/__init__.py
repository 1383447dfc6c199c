"""Checkpoint interop: import/export Hugging Face folders, import GGUF files, detect formats.

    import_hf(folder, dtype) -> (a model of the family whose converter reads the folder, TextTokenizer | None)
    export_hf(model, folder, tokenizer=None, max_shard_bytes=None) -> Path

Which folders each family reads and writes is declared by its converters (`interop.converters`,
listed in the family's registry entry): Llama / Mistral / Qwen2 (`hf_lm`), CLIP / SigLIP vision
towers (`hf_vit`) and full models (`hf_clip`), BERT (`hf_bert`), LLaVA (`hf_llava`), and
BLIP-2 / InstructBLIP (`hf_blip2`, import only).
    import_gguf(path, dtype) -> (DecoderLM, TextTokenizer)
    detect_format(path) -> "polymodal" | "hf" | "gguf"
"""
from polymodal.interop.formats import detect_format
from polymodal.interop.gguf_lm import import_gguf
from polymodal.interop.hf import export_hf, import_hf

__all__ = ["detect_format", "export_hf", "import_gguf", "import_hf"]
