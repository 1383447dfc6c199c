"""Tell which kind of checkpoint a path holds: a polymodal folder, an HF folder or a GGUF file."""
from __future__ import annotations

import json
from pathlib import Path

GGUF_MAGIC = b"GGUF"


def detect_format(path: str | Path) -> str:
    """"polymodal", "hf" or "gguf" for a checkpoint path; a ValueError/FileNotFoundError naming it otherwise.

    A polymodal checkpoint is a folder whose config.json has "format": "polymodal" (or a folder an
    interrupted save left aside as `.name.old-*`); an HF folder has a config.json with a
    `model_type` or `architectures`; a GGUF file starts with the bytes "GGUF".
    """
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == GGUF_MAGIC:
                return "gguf"
        raise ValueError(f"{path} is a file but not a GGUF file (no 'GGUF' magic); checkpoints are folders or .gguf")
    if not path.exists():
        from polymodal.checkpoint import NotACheckpointError, resolve_checkpoint_folder

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
    if "model_type" in meta or "architectures" in meta:
        return "hf"
    raise ValueError(f"{config} has neither \"format\": \"polymodal\" nor an HF 'model_type'/'architectures'")


def read_hf_config(folder: str | Path) -> dict:
    """The parsed config.json of an HF folder (errors name the file)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder: it has no config.json")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return cfg
