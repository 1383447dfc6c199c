"""polymodal checkpoints: a folder with `model.safetensors`, `config.json` and optional tokenizer.

Layout of a checkpoint folder:
    config.json         {"format": "polymodal", "version": 1, "family": <registry name>,
                         "config": <the family config as a dict>, "extra": {...} (optional),
                         "parts": [<part name>, ...] (only for a family with parts)}
    model.safetensors   the model's state dict; tensors that share storage (tied weights such as
                        lm_head.weight = embed_tokens.weight) are stored once, and the safetensors
                        metadata entry "aliases" (JSON {alias: stored name}) restores them on load
    <part>/             for a family with parts (`Family.parts`: a VAE + denoiser, an LM + image
                        tokenizer): each part is a checkpoint folder of its own family, holding
                        its config and weights; the composite's config.json and model.safetensors
                        then hold everything but the parts. Loading puts them back together.
    tokenizer.json ...  written by the tokenizer's own `save(folder)`, when one is given

Loading validates before it allocates: the config goes through its dataclass checks (bounds,
heads dividing widths), then the model is built on the `meta` device (no memory) and every
parameter shape is compared with the shapes in the safetensors headers; only a checkpoint that
fits is built for real. A hostile or damaged folder therefore fails fast with an error naming
the file, never by filling memory.

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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from polymodal.atomic import atomic_folder
from polymodal.config import config_from_mapping
from polymodal.errors import CheckpointError, NotACheckpointError
from polymodal.models.registry import config_to_dict, get_family

FORMAT = "polymodal"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
MAX_CONFIG_BYTES = 16 << 20  # a config.json is kilobytes; refuse to parse anything absurd


class CheckpointMismatchError(CheckpointError):
    """A state dict that does not fit a module: missing/unexpected keys or shape mismatches."""


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
    with atomic_folder(folder, _is_complete) as tmp:
        _write_model(model, tmp, extra)
        if tokenizer is not None:
            tokenizer.save(tmp)
        if extra_files is not None:
            extra_files(tmp)
    return folder


def _write_model(model: nn.Module, folder: Path, extra: dict | None) -> None:
    """config.json + model.safetensors of `model` into `folder`, each part into a subfolder."""
    family = getattr(model, "family", None)
    config = getattr(model, "config", None)
    if not isinstance(family, str) or config is None:
        raise TypeError(
            f"save_checkpoint({folder}): {type(model).__name__} needs a `family` name and a `config` "
            "dataclass attribute (see polymodal.models.registry)"
        )
    parts = get_family(family).parts
    state = model.state_dict()
    config_dict = config_to_dict(config)
    for part in parts:
        (folder / part).mkdir()
        _write_model(getattr(model, part), folder / part, None)
        state = {k: v for k, v in state.items() if not k.startswith(part + ".")}
        config_dict.pop(part)  # the part's own config.json holds it
    tensors, aliases = _dedupe_shared(state)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "aliases": json.dumps(aliases)})
    meta = {"format": FORMAT, "version": VERSION, "family": family, "config": config_dict}
    if parts:
        meta["parts"] = list(parts)
    if extra is not None:
        meta["extra"] = extra
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Rebuild the model saved in `folder` through the registry; return `(model, tokenizer | None)`.

    The model comes back in eval mode on `device`; `dtype` casts its floating-point tensors.
    The tokenizer is a `TextTokenizer` when the folder holds a `tokenizer.json`.
    Raises `CheckpointError` (naming the file) for a config out of bounds or weights that do not
    fit it, before any weight tensor is allocated.
    """
    folder = resolve_checkpoint_folder(folder)
    family, config = read_checkpoint_config(folder)
    with torch.device("meta"):  # shapes only: no memory, whatever the config says
        probe = family.build(config)
    check_state_dict_shapes(probe, stored_shapes(folder), source=str(folder / WEIGHTS_FILE))
    model = family.build(config)
    load_state_dict_checked(model, read_weights(folder), source=str(folder / WEIGHTS_FILE))
    model.to(device=device, dtype=dtype)
    model.eval()
    tokenizer = None
    if (folder / TOKENIZER_FILE).exists():
        from polymodal.tokenizers.text import TextTokenizer  # lazy: tokenizers are optional here

        tokenizer = TextTokenizer.from_pretrained(folder)  # a corrupt file raises CheckpointError naming it
    return model, tokenizer


def read_checkpoint_config(folder: str | Path):
    """(family, validated config) of a checkpoint folder, with each part's config put back in.

    Raises `CheckpointError` naming the config.json whose values are out of bounds."""
    folder = Path(folder)
    meta = read_checkpoint_meta(folder)
    family = get_family(meta["family"])
    data = dict(meta["config"])
    for part in meta.get("parts", []):
        if part not in family.parts:
            raise CheckpointError(f"{folder / CONFIG_FILE} lists a part {part!r} that family {family.name!r} "
                                  f"does not have (its parts: {list(family.parts)})")
        data[part] = config_to_dict(read_checkpoint_config(folder / part)[1])
    try:
        return family, config_from_mapping(family.config_cls, data, source=str(folder / CONFIG_FILE))
    except ValueError as err:  # ConfigError, or a bound checked in the dataclass
        raise CheckpointError(str(err)) from None


def read_checkpoint_meta(folder: str | Path) -> dict:
    """The parsed config.json of a checkpoint folder, validated (format, version, family, config)."""
    folder = resolve_checkpoint_folder(folder)
    path = folder / CONFIG_FILE
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path} is {path.stat().st_size} bytes, not a config file")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise NotACheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise NotACheckpointError(f"{path} is not a polymodal config.json (its 'format' is not {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise NotACheckpointError(f"{path}: unsupported polymodal checkpoint version {meta.get('version')!r}")
    missing = [key for key in ("family", "config") if key not in meta]
    if missing:
        raise NotACheckpointError(f"{path} lacks the keys {missing}")
    if not isinstance(meta["config"], dict) or not isinstance(meta.get("parts", []), list):
        raise CheckpointError(f"{path}: 'config' must be an object and 'parts' a list")
    return meta


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The full state dict stored in a checkpoint folder (parts included, under their prefixes),
    with tied-weight aliases restored. Raises `CheckpointError` naming a truncated/corrupt file."""
    folder = resolve_checkpoint_folder(folder)
    path = folder / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
            aliases = _aliases(f.metadata(), set(tensors), path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is truncated or corrupt ({err})") from None
    for alias, stored in aliases.items():
        tensors[alias] = tensors[stored]
    for part in read_checkpoint_meta(folder).get("parts", []):
        tensors.update({f"{part}.{name}": t for name, t in read_weights(folder / part).items()})
    return tensors


def stored_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every tensor a checkpoint folder stores (parts and aliases included),
    read from the safetensors headers alone: nothing is loaded."""
    folder = resolve_checkpoint_folder(folder)
    path = folder / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
            aliases = _aliases(f.metadata(), set(shapes), path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is truncated or corrupt ({err})") from None
    shapes.update({alias: shapes[stored] for alias, stored in aliases.items()})
    for part in read_checkpoint_meta(folder).get("parts", []):
        shapes.update({f"{part}.{name}": shape for name, shape in stored_shapes(folder / part).items()})
    return shapes


def _aliases(metadata: dict | None, stored: set[str], path: Path) -> dict[str, str]:
    """The {alias: stored name} map of a weights file's metadata, checked against what it stores."""
    aliases = json.loads((metadata or {}).get("aliases", "{}"))
    if not isinstance(aliases, dict) or not all(isinstance(v, str) and v in stored for v in aliases.values()):
        raise CheckpointError(f"{path}: its 'aliases' metadata names tensors the file does not hold")
    return aliases


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


def check_state_dict_shapes(module: nn.Module, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise `CheckpointMismatchError` unless tensors of these `shapes` fill `module` exactly
    (every name present once, with its shape; tied names may be stored once)."""
    problems = _mismatches(module, shapes)
    if problems:
        raise CheckpointMismatchError(_report(problems, module, source))


def load_state_dict_checked(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load `state_dict` into `module` strictly, or raise `CheckpointMismatchError` listing problems.

    The message names `source` and lists missing keys, unexpected keys and shape mismatches with
    both shapes. A key the module ties to another (same Parameter object under two names) is not
    missing when its partner is present: the shared tensor is filled from the partner.
    """
    problems = _mismatches(module, {name: tuple(t.shape) for name, t in state_dict.items()})
    if problems:
        raise CheckpointMismatchError(_report(problems, module, source))
    state_dict = dict(state_dict)
    for names in _tied_groups(module):
        present = [n for n in names if n in state_dict]
        for name in names:
            if name not in state_dict:
                state_dict[name] = state_dict[present[0]]
    module.load_state_dict(state_dict, strict=True)


def _tied_groups(module: nn.Module) -> list[list[str]]:
    """Names of the module's state that share one tensor object, grouped (singletons included)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def _mismatches(module: nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, list[str]]:
    """{"missing keys" | "unexpected keys" | "shape mismatches": [...]} of `shapes` against the
    module's state (only the non-empty kinds)."""
    own = {name: tuple(t.shape) for name, t in module.state_dict(keep_vars=True).items()}
    filled = set()
    for names in _tied_groups(module):
        if any(n in shapes for n in names):
            filled.update(names)
    problems = {
        "missing keys": [k for k in own if k not in filled],
        "unexpected keys": [k for k in shapes if k not in own],
        "shape mismatches": [f"{k}: checkpoint {tuple(shapes[k])} vs model {own[k]}"
                             for k in own if k in shapes and tuple(shapes[k]) != own[k]],
    }
    return {title: items for title, items in problems.items() if items}


def _report(problems: dict[str, list[str]], module: nn.Module, source: str) -> str:
    lines = [f"state dict from {source} does not fit {type(module).__name__}:"]
    lines += [f"  {title} ({len(items)}): " + ", ".join(items) for title, items in problems.items()]
    return "\n".join(lines)


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
