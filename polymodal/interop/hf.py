"""Import and export Hugging Face model folders (config.json + safetensors + tokenizer).

Which folders are read, and which models written, is decided by the families' converters in the
registry (`polymodal.interop.converters`): this module names no family and no model class.

Import validates before it allocates: config.json becomes the family config (whose dataclass
checks its bounds), the model is built on the `meta` device, and the converter's tensor check
runs against stand-ins read from the safetensors headers; only a folder that fits is loaded. A
hostile or damaged folder therefore fails fast with a `CheckpointError` naming the file.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from polymodal.atomic import atomic_folder
from polymodal.checkpoint import check_state_dict_shapes, load_state_dict_checked
from polymodal.errors import UnsupportedTaskError
from polymodal.interop.converters import converter_for, exporter_for, translate_config
from polymodal.interop.formats import read_hf_config
from polymodal.interop.namemap import shapes_of
from polymodal.interop.safetensors_io import DIFFUSERS_STEM, HFWeights, write_hf_weights
from polymodal.models.registry import get_family
from polymodal.tokenizers.text import TOKENIZER_FILE, TextTokenizer

CONFIG_FILE = "config.json"


def import_hf(folder: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, TextTokenizer | None]:
    """Load an HF model folder as (model of the family its converter names, in eval mode;
    tokenizer or None).

    The converter is picked by what config.json declares (`converter_for`). Weights are read from
    model.safetensors or the shards of model.safetensors.index.json and cast to `dtype`; the
    tokenizer is loaded when the folder has a tokenizer.json. Raises `CheckpointError` naming the
    file for an unsupported declaration, a config out of bounds, or a damaged weights, index or
    tokenizer file, and `CheckpointMismatchError` naming tensors that are missing, unexpected or
    mis-shaped, all before any weight is loaded.
    """
    folder = Path(folder)
    source = str(folder / CONFIG_FILE)
    cfg = read_hf_config(folder)
    converter = converter_for(cfg, source)
    weights = HFWeights(folder)
    config = translate_config(converter, cfg, weights, source)
    family = get_family(converter.family)
    weights_source = str(weights.source)
    with torch.device("meta"):  # shapes only: no memory, whatever the config says
        probe = family.build(config)
        state = converter.state_from(weights.meta(), probe, weights_source)
    check_state_dict_shapes(probe, shapes_of(state), weights_source)
    tokenizer = _read_tokenizer(folder)
    model = family.build(config)
    load_state_dict_checked(model, converter.state_from(weights.load(), model, weights_source), weights_source)
    model.to(dtype=dtype).eval()
    return model, tokenizer


def _read_tokenizer(folder: Path) -> TextTokenizer | None:
    """The folder's tokenizer, or None without a tokenizer.json; `CheckpointError` naming the file when corrupt."""
    return TextTokenizer.from_pretrained(folder) if (folder / TOKENIZER_FILE).is_file() else None


def export_hf(model: nn.Module, folder: str | Path, tokenizer: TextTokenizer | None = None,
              max_shard_bytes: int | None = None) -> Path:
    """Write `model` as an HF folder that transformers' (or diffusers') `from_pretrained` loads;
    return the folder.

    The model's family's exporting converter (`exporter_for`) writes config.json and the weights:
    model.safetensors, or shards plus an index above `max_shard_bytes` (diffusers' file names
    when the config declares a `_class_name`). The folder is replaced as a whole and atomically
    (see `atomic_folder`). Raises `UnsupportedTaskError` naming the model and what can be exported
    when no converter writes it or its config has no equivalent in the written architecture.
    """
    converter = exporter_for(model)
    try:
        cfg = converter.config_to(model, tokenizer)
    except ValueError as err:
        raise UnsupportedTaskError(f"export_hf: {type(model).__name__} cannot be written as {converter.name}: "
                                   f"{err}") from None
    tensors = converter.state_to(model.state_dict(), model.config)
    cfg["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    stem = DIFFUSERS_STEM if "_class_name" in cfg else "model"
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        write_hf_weights(tensors, tmp, max_shard_bytes, stem=stem)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return folder
