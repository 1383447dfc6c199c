"""polymodal checkpoints: a folder with `model.safetensors`, `config.json` and optional tokenizer.

Layout of a checkpoint folder:
    config.json         {"format": "polymodal", "version": 1, "family": <registry name>,
                         "config": <the family config as a dict>, "extra": {...} (optional)}
    model.safetensors   the model's state dict; tensors that share storage (tied weights such as
                        lm_head.weight = embed_tokens.weight) are stored once, and the safetensors
                        metadata entry "aliases" (JSON {alias: stored name}) restores them on load
    tokenizer.json ...  written by the tokenizer's own `save(folder)`, when one is given

Saving is atomic: everything is written into a temporary sibling folder and fsynced, then
swapped in by renames (old folder aside, new one in, old one removed). If the process dies at any
point, the previous checkpoint stays loadable: either the folder is untouched, or (between the
two renames) it survives as the `.<name>.old-*` sibling, which `load_checkpoint` and the next
`save_checkpoint` recover.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from polymodal.atomic import atomic_folder
from polymodal.config import config_from_mapping
from polymodal.models.registry import config_to_dict, get_family

FORMAT = "polymodal"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"


class CheckpointMismatchError(ValueError):
    """A state dict that does not fit a module: missing/unexpected keys or shape mismatches."""


class NotACheckpointError(FileNotFoundError):
    """A folder that is not a polymodal checkpoint (names the folder and what is missing)."""


def save_checkpoint(
    model: nn.Module,
    folder: str | Path,
    tokenizer: Any = None,
    extra: dict | None = None,
    *,
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Atomically write `model` (+ `tokenizer`) as a polymodal checkpoint folder; return its path.

    `model` must have a registered `family` name and its config dataclass as `model.config`.
    `extra` is JSON-ready metadata stored in config.json under "extra". `extra_files(tmp_folder)`
    may write more files into the checkpoint before the swap (the trainer writes its state there),
    so they are replaced atomically together with the weights.
    """
    folder = Path(folder)
    family = getattr(model, "family", None)
    config = getattr(model, "config", None)
    if not isinstance(family, str) or config is None:
        raise TypeError(
            f"save_checkpoint({folder}): {type(model).__name__} needs a `family` name and a `config` "
            "dataclass attribute (see polymodal.models.registry)"
        )
    with atomic_folder(folder, _is_complete) as tmp:
        tensors, aliases = _dedupe_shared(model.state_dict())
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "aliases": json.dumps(aliases)})
        meta = {"format": FORMAT, "version": VERSION, "family": family, "config": config_to_dict(config)}
        if extra is not None:
            meta["extra"] = extra
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(tmp)
        if extra_files is not None:
            extra_files(tmp)
    return folder


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Rebuild the model saved in `folder` through the registry; return `(model, tokenizer | None)`.

    The model comes back in eval mode on `device`; `dtype` casts its floating-point tensors.
    The tokenizer is a `TextTokenizer` when the folder holds a `tokenizer.json`.
    """
    folder = resolve_checkpoint_folder(folder)
    meta = read_checkpoint_meta(folder)
    family = get_family(meta["family"])
    config = config_from_mapping(family.config_cls, meta["config"], source=str(folder / CONFIG_FILE))
    model = family.build(config)
    load_state_dict_checked(model, read_weights(folder), source=str(folder / WEIGHTS_FILE))
    model.to(device=device, dtype=dtype)
    model.eval()
    tokenizer = None
    if (folder / TOKENIZER_FILE).exists():
        from polymodal.tokenizers.text import TextTokenizer  # lazy: tokenizers are optional here

        tokenizer = TextTokenizer.from_pretrained(folder)
    return model, tokenizer


def read_checkpoint_meta(folder: str | Path) -> dict:
    """The parsed config.json of a checkpoint folder, validated (format, version, family, config)."""
    folder = resolve_checkpoint_folder(folder)
    path = folder / CONFIG_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise NotACheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise NotACheckpointError(f"{path} is not a polymodal config.json (its 'format' is not {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise NotACheckpointError(f"{path}: unsupported polymodal checkpoint version {meta.get('version')!r}")
    missing = [key for key in ("family", "config") if key not in meta]
    if missing:
        raise NotACheckpointError(f"{path} lacks the keys {missing}")
    return meta


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The full state dict stored in a checkpoint folder, with tied-weight aliases restored."""
    path = resolve_checkpoint_folder(folder) / WEIGHTS_FILE
    with safe_open(str(path), framework="pt", device="cpu") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for alias, stored in aliases.items():
        tensors[alias] = tensors[stored]
    return tensors


def resolve_checkpoint_folder(folder: str | Path) -> Path:
    """`folder` if it is a complete checkpoint, else the copy a swap interrupted mid-way left aside.

    Raises `NotACheckpointError` naming the folder and the files it lacks.
    """
    folder = Path(folder)
    if _is_complete(folder):
        return folder
    if not folder.exists():
        for old in sorted(folder.parent.glob(f".{folder.name}.old-*")):
            if _is_complete(old):
                return old
        raise NotACheckpointError(f"checkpoint folder {folder} does not exist")
    if not folder.is_dir():
        raise NotACheckpointError(f"checkpoint path {folder} is a file, not a polymodal checkpoint folder")
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    raise NotACheckpointError(f"{folder} is not a polymodal checkpoint: it lacks {', '.join(missing)}")


def load_state_dict_checked(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load `state_dict` into `module` strictly, or raise `CheckpointMismatchError` listing problems.

    The message names `source` and lists missing keys, unexpected keys and shape mismatches with
    both shapes. A key the module ties to another (same Parameter object under two names) is not
    missing when its partner is present: the shared tensor is filled from the partner.
    """
    own = module.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, tensor in own.items():
        groups.setdefault(id(tensor), []).append(name)
    state_dict = dict(state_dict)
    for names in groups.values():
        present = [n for n in names if n in state_dict]
        for name in names:
            if name not in state_dict and present:
                state_dict[name] = state_dict[present[0]]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f"state dict from {source} does not fit {type(module).__name__}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
        raise CheckpointMismatchError("\n".join(lines))
    module.load_state_dict(state_dict, strict=True)


def _dedupe_shared(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a state dict into tensors to store (each storage once) and {alias: stored name}.

    Exact aliases (same storage, offset, shape and strides) become alias entries; tensors that
    overlap a storage only partly are copied, since safetensors refuses shared memory.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        view = (*storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if tensor.numel() and view in seen:
            aliases[name] = seen[view]
            continue
        if tensor.numel():
            seen[view] = name
        if storage in storages or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        else:
            storages.add(storage)
        tensors[name] = tensor.cpu()
    return tensors, aliases


def _is_complete(folder: Path) -> bool:
    """Whether `folder` holds both required checkpoint files."""
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()






