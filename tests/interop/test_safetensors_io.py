"""HF weight folders (single file, sharded with an index, atomic replacement) and format detection."""
from __future__ import annotations

import json

import pytest
import torch

from polymodal.backbones.decoder import DecoderLM
from polymodal.checkpoint import save_checkpoint
from polymodal.interop import detect_format
from polymodal.atomic import atomic_folder
from polymodal.interop.safetensors_io import INDEX_FILE, WEIGHTS_FILE, read_hf_weights, write_hf_weights
from polymodal.models.lm import lm_tiny


def _tensors() -> dict[str, torch.Tensor]:
    return {f"layer{i}.weight": torch.full((10, 10), float(i)) for i in range(5)} | {"bias": torch.arange(3.0)}


def test_single_file_round_trip(tmp_path):
    write_hf_weights(_tensors(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_FILE]
    back = read_hf_weights(tmp_path)
    assert back.keys() == _tensors().keys() and all(torch.equal(back[k], v) for k, v in _tensors().items())


def test_sharded_round_trip_writes_an_index(tmp_path):
    write_hf_weights(_tensors(), tmp_path, max_shard_bytes=900)  # each 10x10 float32 is 400 bytes
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_size"] == 5 * 400 + 12
    back = read_hf_weights(tmp_path)
    assert all(torch.equal(back[k], v) for k, v in _tensors().items())


def test_index_naming_an_absent_shard_is_reported(tmp_path):
    write_hf_weights(_tensors(), tmp_path, max_shard_bytes=900)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        read_hf_weights(tmp_path)


def test_folder_without_weights_is_reported(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin files are not read"):
        read_hf_weights(tmp_path)


def test_atomic_folder_keeps_old_contents_on_failure(tmp_path):
    target = tmp_path / "out"
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "a.txt").write_text("new")
            raise RuntimeError("interrupted")
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_detect_format(tmp_path):
    save_checkpoint(DecoderLM(lm_tiny()), tmp_path / "ours")
    assert detect_format(tmp_path / "ours") == "polymodal"
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert detect_format(tmp_path / "hf") == "hf"
    (tmp_path / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    assert detect_format(tmp_path / "m.gguf") == "gguf"
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt"):
        detect_format(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        detect_format(tmp_path / "nowhere")
