"""Tell which kind of checkpoint a path holds: a polymodal folder, an HF folder or a GGUF file."""
from __future__ import annotations

import json
from pathlib import Path

from polymodal.errors import CheckpointError, NotACheckpointError

GGUF_MAGIC = b"GGUF"
MAX_CONFIG_BYTES = 16 << 20  # a config.json is kilobytes; refuse to parse anything absurd
# What an outside folder's config.json declares about its model: transformers' keys, diffusers' key.
DECLARATION_KEYS = ("architectures", "model_type", "_class_name")


def detect_format(path: str | Path) -> str:
    """"polymodal", "hf" or "gguf" for a checkpoint path; a ValueError/FileNotFoundError naming it otherwise.

    A polymodal checkpoint is a folder whose config.json has "format": "polymodal" (or a folder an
    interrupted save left aside as `.name.old-*`); an HF folder has a config.json with a
    `model_type` or `architectures` (transformers) or a `_class_name` (diffusers); a GGUF file
    starts with the bytes "GGUF".
    """
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == GGUF_MAGIC:
                return "gguf"
        raise ValueError(f"{path} is a file but not a GGUF file (no 'GGUF' magic); checkpoints are folders or .gguf")
    if not path.exists():
        from polymodal.checkpoint import resolve_checkpoint_folder

        try:
            resolve_checkpoint_folder(path)
        except NotACheckpointError:
            raise FileNotFoundError(f"checkpoint path {path} does not exist") from None
        return "polymodal"
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{path} has no config.json: not a polymodal or Hugging Face checkpoint folder")
    meta = read_hf_config(path)
    if meta.get("format") == "polymodal":
        return "polymodal"
    if any(key in meta for key in DECLARATION_KEYS):
        return "hf"
    raise ValueError(f"{config} has neither \"format\": \"polymodal\" nor any of {list(DECLARATION_KEYS)}")


def read_hf_config(folder: str | Path) -> dict:
    """The parsed config.json of an HF folder; `NotACheckpointError` when absent, `CheckpointError`
    naming the file when it is not a JSON object of sane size."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise NotACheckpointError(f"{folder} is not a Hugging Face model folder: it has no config.json")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path} is {path.stat().st_size} bytes, not a config file")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return cfg
