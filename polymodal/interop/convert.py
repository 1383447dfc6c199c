"""`polymodal convert SRC OUT`: any checkpoint we read -> a polymodal folder or an HF folder.

Never loses what it did not write: OUT must be new, empty, or an earlier `convert` output (then
only with `overwrite`, and replaced as a whole); OUT may not be SRC, lie inside it or contain it;
a file at OUT is refused. The written folder carries a manifest, so a later `--overwrite` knows it
may replace it. GGUF weights are dequantized; the message says which dtype was written and how
large the result is.
"""
from __future__ import annotations

from pathlib import Path

import torch

from polymodal.errors import DestinationExistsError, UsageError
from polymodal.outputs import MANIFEST_FILE, Manifest, read_manifest

WRITER = "convert"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_destination(src: Path, out: Path, overwrite: bool) -> None:
    """Refuse an OUT that would destroy files polymodal did not write, or the source itself."""
    source, target = src.resolve(), out.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise UsageError(f"convert: OUT {out} overlaps the source {src}; write the result to a separate folder")
    if out.exists() and not out.is_dir():
        raise DestinationExistsError(f"convert: OUT {out} is a file; give a folder path")
    if not out.is_dir() or not any(out.iterdir()):
        return
    previous = read_manifest(out)
    if previous is None or previous.writer != WRITER:
        raise DestinationExistsError(f"convert: OUT {out} holds files polymodal did not write; convert replaces a "
                                     "whole folder, so choose a new or empty one")
    if not overwrite:
        raise DestinationExistsError(f"convert: OUT {out} holds an earlier convert output; pass --overwrite to "
                                     "replace it, or choose another folder")


def convert(src: str | Path, out: str | Path, to: str = "polymodal", dtype: str | None = None,
            overwrite: bool = False, stream=None) -> Path:
    """Load `src` (polymodal folder, HF folder or GGUF file) and write it to `out` as `to`
    ("polymodal" or "hf"), cast to `dtype` when given; print what was written. Returns `out`."""
    import sys

    from polymodal.api import load_verbose
    from polymodal.checkpoint import save_checkpoint
    from polymodal.interop import detect_format, export_hf

    src, out, stream = Path(src), Path(out), stream or sys.stderr
    if to not in ("polymodal", "hf"):
        raise UsageError(f"convert: --to must be polymodal or hf, got {to!r}")
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"convert: --dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not src.exists():
        raise FileNotFoundError(f"convert: no checkpoint at {src}")
    check_destination(src, out, overwrite)
    kind = detect_format(src)
    model, tokenizer = load_verbose(src, dtype=DTYPES.get(dtype), stream=stream)
    if to == "hf":
        export_hf(model, out, tokenizer=tokenizer)
    else:
        save_checkpoint(model, out, tokenizer=tokenizer)
    Manifest(out, WRITER, [p.relative_to(out).as_posix() for p in out.rglob("*")
                           if p.is_file() and p.name != MANIFEST_FILE]).save()
    written = next(model.parameters()).dtype
    size = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    note = ""
    if kind == "gguf" and dtype is None:
        note = " (GGUF weights are dequantized: pass --dtype bfloat16 for half the size)"
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {to} checkpoint of {type(model).__name__} ({params / 1e6:.1f}M parameters, "
          f"{str(written).removeprefix('torch.')}, {size / 1e6:.1f} MB) to {out}{note}", file=stream)
    return out
