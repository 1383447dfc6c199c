"""The public entry point `polymodal.load`: one call for every checkpoint kind we read."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # torch is imported lazily so `import polymodal` and `polymodal --help` stay fast
    import torch
    import torch.nn as nn


class Loaded(NamedTuple):
    """What `load` returns; unpacks as `model, tokenizer = polymodal.load(path)`."""

    model: "nn.Module"
    tokenizer: object | None


def load(path: str | Path, device: "str | torch.device" = "cpu", dtype: "torch.dtype | None" = None) -> Loaded:
    """Load a model (and its tokenizer, when the checkpoint has one) from `path`.

    path: a polymodal checkpoint folder, a Hugging Face folder (config.json + safetensors,
    single-file or sharded) or a GGUF file. The model is returned in eval mode on `device`;
    `dtype` casts floating-point weights (default: as stored for polymodal checkpoints, float32
    for imported ones).
    """
    import torch

    from polymodal.interop import detect_format, import_gguf, import_hf

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    kind = detect_format(path)
    if kind == "polymodal":
        from polymodal.checkpoint import load_checkpoint

        model, tokenizer = load_checkpoint(path, device=device, dtype=dtype)
    elif kind == "gguf":
        model, tokenizer = import_gguf(path, dtype=dtype or torch.float32)
    else:
        model, tokenizer = import_hf(path, dtype=dtype or torch.float32)
    return Loaded(model.to(device).eval(), tokenizer)


def load_verbose(path: str | Path, device: "str | torch.device" = "cpu", dtype: "torch.dtype | None" = None,
                 stream=None) -> Loaded:
    """`load`, telling `stream` (default stderr) what is loading and, after, what it loaded
    (family, parameter count, seconds): a GGUF or a large HF folder takes many seconds."""
    import sys
    import time

    stream = stream or sys.stderr
    print(f"loading {path} ...", file=stream, flush=True)
    started = time.perf_counter()
    loaded = load(path, device=device, dtype=dtype)
    family = getattr(loaded.model, "family", type(loaded.model).__name__)
    print(f"loaded {family} model ({parameter_count(loaded.model)}) in {time.perf_counter() - started:.1f} s",
          file=stream, flush=True)
    return loaded


def parameter_count(model: "nn.Module") -> str:
    """The model's parameter count for people: "135.0M parameters", or the exact count below 100k."""
    count = sum(p.numel() for p in model.parameters())
    return f"{count / 1e6:.1f}M parameters" if count >= 100_000 else f"{count:,} parameters"
