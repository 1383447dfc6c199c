"""Read and write the weights of a Hugging Face model folder (safetensors, single file or sharded).

Layout (as written by `transformers.PreTrainedModel.save_pretrained`):
    model.safetensors                      all tensors in one file, or
    model.safetensors.index.json           {"metadata": {"total_size": bytes},
                                            "weight_map": {tensor name: shard file name}}
    model-00001-of-0000N.safetensors ...   the shards the index names
Pickled `pytorch_model.bin` files are never read.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_hf_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder, {name: tensor} in their stored dtype, single-file or sharded."""
    folder = Path(folder)
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index_path}: not a safetensors index with a 'weight_map' ({err})") from err
        by_file: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_file.setdefault(shard, []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for shard, names in sorted(by_file.items()):
            path = folder / shard
            if not path.is_file():
                raise FileNotFoundError(f"{index_path} names shard {shard!r}, which is not in {folder}")
            with safe_open(str(path), framework="pt", device="cpu") as f:
                stored = set(f.keys())
                absent = [n for n in names if n not in stored]
                if absent:
                    raise ValueError(f"{path} lacks tensors its index assigns to it: {absent}")
                tensors.update({n: f.get_tensor(n) for n in names})
        return tensors
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has neither {WEIGHTS_FILE} nor {INDEX_FILE} (pickled pytorch_model.bin files are not read)"
        )
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def write_hf_weights(tensors: dict[str, torch.Tensor], folder: str | Path, max_shard_bytes: int | None = None) -> None:
    """Write `tensors` into an existing `folder` as model.safetensors, or as shards plus an index
    when they exceed `max_shard_bytes` (tensors are packed in name order; a larger tensor gets a
    shard of its own). Tensors must not share memory (safetensors refuses aliases)."""
    folder = Path(folder)
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    metadata = {"format": "pt"}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata=metadata)
        return
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        shard = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(folder / shard), metadata=metadata)
        weight_map.update({n: shard for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")



