"""Read and write the weights of a Hugging Face model folder (safetensors, single file or sharded).

Layout (as written by transformers' `save_pretrained`; diffusers names its files
`diffusion_pytorch_model.*` instead of `model.*`):
    model.safetensors                      all tensors in one file, or
    model.safetensors.index.json           {"metadata": {"total_size": bytes},
                                            "weight_map": {tensor name: shard file name}}
    model-00001-of-0000N.safetensors ...   the shards the index names
Pickled `pytorch_model.bin` files are never read.

`HFWeights` indexes a folder from the safetensors headers alone (names, shapes, which file holds
each tensor), so a folder is checked against its model before any weight is loaded; a
truncated or corrupt file or index fails there with a `CheckpointError` naming the file.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from polymodal.errors import CheckpointError, NotACheckpointError

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DIFFUSERS_STEM = "diffusion_pytorch_model"
MAX_INDEX_BYTES = 256 << 20  # a large model's index is megabytes; refuse to parse anything absurd


class HFWeights:
    """The safetensors weights of an HF folder, indexed from the file headers (nothing loaded).

    shapes: {tensor name: shape}; source: the file that describes them (the single weights file,
    or the index of a sharded folder), for error messages. `tensor(name)` reads one tensor,
    `load()` all of them, `meta()` stands in for them with shape-only tensors on the meta device.
    Raises `NotACheckpointError` for a folder without weights or an index naming an absent
    shard, `CheckpointError` naming the file for a truncated/corrupt file or index.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index_path = next((p for p in _candidates(self.folder, ".safetensors.index.json") if p.is_file()), None)
        if index_path is not None:
            self.source = index_path
            weight_map = _read_index(index_path)
        else:
            single = next((p for p in _candidates(self.folder, ".safetensors") if p.is_file()), None)
            if single is None:
                raise NotACheckpointError(f"{self.folder} has neither {WEIGHTS_FILE} nor {INDEX_FILE} (pickled "
                                          "pytorch_model.bin files are not read)")
            self.source = single
            weight_map = None
        self._files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        if weight_map is None:
            self._index_file(self.source, None)
            return
        by_file: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_file.setdefault(shard, []).append(name)
        for shard, names in sorted(by_file.items()):
            path = self.folder / shard
            if not path.is_file():
                raise NotACheckpointError(f"{index_path} names shard {shard!r}, which is not in {self.folder}")
            self._index_file(path, names)

    def _index_file(self, path: Path, names: list[str] | None) -> None:
        """Record the shapes of `names` (all tensors when None) from the header of `path`."""
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                stored = set(f.keys())
                absent = sorted(set(names) - stored) if names is not None else []
                if absent:
                    raise CheckpointError(f"{path} lacks tensors its index assigns to it: {absent}")
                for name in stored if names is None else names:
                    self.shapes[name] = tuple(f.get_slice(name).get_shape())
                    self._files[name] = path
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path} is truncated or corrupt ({err})") from None

    def meta(self) -> dict[str, torch.Tensor]:
        """{name: an empty meta-device tensor of the stored shape}: stands in for the weights when a
        model built on the meta device is checked against the folder."""
        return {name: torch.empty(shape, device="meta") for name, shape in self.shapes.items()}

    def tensor(self, name: str) -> torch.Tensor:
        """One stored tensor, read from its file (a KeyError names the folder when absent)."""
        if name not in self._files:
            raise KeyError(f"{self.source} holds no tensor {name!r}")
        return self._read(self._files[name], [name])[name]

    def load(self) -> dict[str, torch.Tensor]:
        """Every stored tensor, {name: tensor} in its stored dtype."""
        by_file: dict[Path, list[str]] = {}
        for name, path in self._files.items():
            by_file.setdefault(path, []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for path, names in by_file.items():
            tensors.update(self._read(path, names))
        return tensors

    @staticmethod
    def _read(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {name: f.get_tensor(name) for name in names}
        except (SafetensorError, OSError) as err:  # the file changed or broke since its header was read
            raise CheckpointError(f"{path} is truncated or corrupt ({err})") from None


def _candidates(folder: Path, suffix: str) -> list[Path]:
    """transformers' file name first, then diffusers'."""
    return [folder / f"{stem}{suffix}" for stem in ("model", DIFFUSERS_STEM)]


def _read_index(path: Path) -> dict[str, str]:
    """The `weight_map` of a safetensors index: tensor name -> shard file name inside the folder."""
    if path.stat().st_size > MAX_INDEX_BYTES:
        raise CheckpointError(f"{path} is {path.stat().st_size} bytes, not a safetensors index")
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: not a safetensors index with a 'weight_map' ({type(err).__name__}: "
                              f"{err})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: 'weight_map' must map tensor names to shard files")
    for name, shard in weight_map.items():
        # A shard is a plain file name next to the index: never a path that leaves the folder.
        if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in (".", ".."):
            raise CheckpointError(f"{path}: 'weight_map' entry {name!r} names {shard!r}, not a shard file in "
                                  "this folder")
    return weight_map


def read_hf_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder, {name: tensor} in their stored dtype, single-file or sharded."""
    return HFWeights(folder).load()


def write_hf_weights(tensors: dict[str, torch.Tensor], folder: str | Path, max_shard_bytes: int | None = None,
                     stem: str = "model") -> None:
    """Write `tensors` into an existing `folder` as `{stem}.safetensors`, or as shards plus an index
    when they exceed `max_shard_bytes` (tensors are packed in name order; a larger tensor gets a
    shard of its own). Tensors must not share memory (safetensors refuses aliases)."""
    folder = Path(folder)
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    metadata = {"format": "pt"}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, str(folder / f"{stem}.safetensors"), metadata=metadata)
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
        shard = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(folder / shard), metadata=metadata)
        weight_map.update({n: shard for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
