"""Hostile or damaged outside checkpoints fail fast with one `CheckpointError` naming the file
(and the key), before any weight is loaded: configs out of bounds, truncated or garbage
safetensors, broken indexes, corrupt tokenizers and malformed GGUF files."""
from __future__ import annotations

import json
import re
import signal
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import polymodal
from polymodal.checkpoint import CheckpointMismatchError
from polymodal.errors import CheckpointError, NotACheckpointError
from polymodal.interop.converters import registered_converters
from polymodal.interop.safetensors_io import HFWeights

LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=96, hidden_size=64,
             intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, eos_token_id=2)
# (config.json, the key that is out of bounds, where its message says it lives)
HOSTILE = {
    "llama layers": ({**LLAMA, "num_hidden_layers": 10**9}, "num_hidden_layers", "config.json"),
    "llama width": ({**LLAMA, "hidden_size": 10**12}, "hidden_size", "config.json"),
    "llama vocab": ({**LLAMA, "vocab_size": -1}, "vocab_size", "config.json"),
    "llama type": ({**LLAMA, "num_hidden_layers": "many"}, "num_hidden_layers", "config.json"),
    "vision tower": ({"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", **VISION,
                      "num_hidden_layers": 10**9}, "num_hidden_layers", "config.json"),
    "clip text": ({"architectures": ["CLIPModel"], "model_type": "clip", "vision_config": VISION,
                   "text_config": {**TEXT, "max_position_embeddings": 10**12}}, "max_position_embeddings",
                  "config.json (text_config)"),
    "bert heads": ({"architectures": ["BertModel"], "model_type": "bert", **TEXT, "num_attention_heads": 10**9},
                   "num_attention_heads", "config.json"),
    "llava lm": ({"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "vision_config": VISION,
                  "text_config": {**LLAMA, "num_hidden_layers": 10**9}}, "num_hidden_layers",
                 "config.json (text_config)"),
    "blip-2 q-former": ({"architectures": ["Blip2ForConditionalGeneration"], "model_type": "blip-2",
                         "image_token_index": 95, "vision_config": VISION, "text_config": LLAMA,
                         "qformer_config": {"num_hidden_layers": 10**9, "encoder_hidden_size": 32}},
                        "num_hidden_layers", "config.json (qformer_config)"),
}


@contextmanager
def deadline(seconds: float):
    """Fail (instead of filling memory for minutes) when the block runs past `seconds`."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny Llama folder saved by transformers, with its weights sharded (to damage one shard)."""
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in LLAMA.items() if k not in ("architectures", "model_type")}))\
        .save_pretrained(folder, max_shard_size="40KB")
    return folder


def _copy(src, dst):
    dst.mkdir(exist_ok=True)
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_config_fails_fast_naming_the_file_and_key(case, tmp_path):
    cfg, key, where = HOSTILE[case]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    # Weights the config never gets to (BERT's converter looks for its embedding table by name).
    save_file({"embeddings.word_embeddings.weight": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    registered_converters()  # import the families and converters outside the timed part
    started = time.perf_counter()
    with deadline(5.0), pytest.raises(CheckpointError) as err:
        polymodal.load(tmp_path)
    assert time.perf_counter() - started < 1.0
    message = str(err.value)
    assert f"{tmp_path}/{where}" in message and key in message and "\n" not in message


def test_a_config_that_is_not_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]')
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'config.json'} is not valid JSON"):
        polymodal.load(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_weights_are_named(llama_folder, tmp_path, damage):
    folder = _copy(llama_folder, tmp_path / "copy")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x08" + bytes(range(200)))
    with pytest.raises(CheckpointError, match=rf"{shard} is truncated or corrupt"):
        polymodal.load(folder)


def test_a_truncated_single_weights_file_is_named(tmp_path):
    save_file({"model.embed_tokens.weight": torch.zeros(96, 64)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes()[:-100])
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'model.safetensors'} is truncated or corrupt"):
        polymodal.load(tmp_path)


@pytest.mark.parametrize("index, message", [
    ("{not json", "not a safetensors index with a 'weight_map'"),
    (json.dumps({"metadata": {}}), "not a safetensors index with a 'weight_map'"),
    (json.dumps({"weight_map": ["model-00001-of-00002.safetensors"]}), "'weight_map' must map tensor names"),
    (json.dumps({"weight_map": {"lm_head.weight": "../outside.safetensors"}}),
     "'weight_map' entry 'lm_head.weight' names '../outside.safetensors', not a shard file in this folder"),
])
def test_a_broken_index_is_named(llama_folder, tmp_path, index, message):
    folder = _copy(llama_folder, tmp_path / "copy")
    (folder / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=re.escape(f"{folder / 'model.safetensors.index.json'}: {message}")):
        polymodal.load(folder)


def test_an_index_naming_absent_shards_or_tensors_is_named(llama_folder, tmp_path):
    folder = _copy(llama_folder, tmp_path / "copy")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "model-00009-of-00009.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(NotACheckpointError, match="names shard 'model-00009-of-00009.safetensors'"):
        polymodal.load(folder)
    shard = sorted(folder.glob("model-*.safetensors"))[0].name
    index["weight_map"]["lm_head.weight"] = shard  # stored in another shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{shard} lacks tensors its index assigns to it: \['lm_head.weight'\]"):
        polymodal.load(folder)


def test_a_corrupt_tokenizer_is_named(llama_folder, tmp_path):
    folder = _copy(llama_folder, tmp_path / "copy")
    (folder / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 7')
    with pytest.raises(CheckpointError, match=rf"{folder / 'tokenizer.json'} cannot be read as a tokenizer"):
        polymodal.load(folder)


def test_a_misfit_folder_is_refused_from_the_headers_before_any_weight_is_read(llama_folder, tmp_path, monkeypatch):
    folder = _copy(llama_folder, tmp_path / "copy")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 4096}))

    def refuse(self):
        raise AssertionError("weights were loaded before the folder was checked")

    monkeypatch.setattr(HFWeights, "load", refuse)
    with pytest.raises(CheckpointMismatchError, match=r"down_proj.weight: file \(64, 96\) vs expected \(64, 4096\)"):
        polymodal.load(folder)


def test_the_weights_index_reads_shapes_from_the_headers(llama_folder):
    weights = HFWeights(llama_folder)
    assert weights.source == llama_folder / "model.safetensors.index.json"
    assert weights.shapes["model.layers.1.mlp.up_proj.weight"] == (96, 64)
    meta = weights.meta()
    assert meta["lm_head.weight"].is_meta and meta["lm_head.weight"].shape == (96, 64)
    assert torch.equal(weights.tensor("model.norm.weight"), weights.load()["model.norm.weight"])


# ------------------------------------------------------------------------------------------- GGUF

def _write_gguf(path, arch: str = "llama", skip: str | None = None, **values) -> None:
    """A tiny GGUF: the metadata a llama/qwen2 import reads (less `skip`; `values` replace some, a
    string is written as a string), a ten-token vocabulary, one tensor."""
    writer = GGUFWriter(str(path), arch)
    for key, add, value in (("block_count", writer.add_block_count, 1),
                            ("context_length", writer.add_context_length, 64),
                            ("embedding_length", writer.add_embedding_length, 8),
                            ("feed_forward_length", writer.add_feed_forward_length, 16),
                            ("attention.head_count", writer.add_head_count, 2),
                            ("attention.layer_norm_rms_epsilon", writer.add_layer_norm_rms_eps, 1e-5)):
        value = values.get(key.replace(".", "_"), value)
        if key == skip:
            continue
        if isinstance(value, str):
            writer.add_string(f"{arch}.{key}", value)
        else:
            add(value)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([chr(ord("a") + i) for i in range(10)])
    writer.add_token_types([1] * 10)
    writer.add_tensor("token_embd.weight", np.zeros((10, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("damage", ["truncated", "magic only", "garbage after the magic", "bad version"])
def test_a_damaged_gguf_is_named(tmp_path, damage):
    _write_gguf(tmp_path / "ok.gguf")
    data = (tmp_path / "ok.gguf").read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "magic only": b"GGUF",
               "garbage after the magic": b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 4,
               "bad version": b"GGUF\x63\x00\x00\x00" + data[8:]}[damage]
    path = tmp_path / "damaged.gguf"
    path.write_bytes(damaged)
    with pytest.raises(CheckpointError, match=rf"{path} is not a readable GGUF file, it may be truncated or corrupt"):
        polymodal.load(path)


@pytest.mark.parametrize("kwargs, message", [
    (dict(arch="gpt2"), "general.architecture 'gpt2' is not supported"),
    (dict(skip="block_count"), "required metadata key 'llama.block_count' is missing"),
    (dict(skip="attention.head_count"), "required metadata key 'llama.attention.head_count' is missing"),
    (dict(block_count=10**9),
     r"DecoderConfig.num_layers must be in \[1, 1024\], got 1000000000 \(from key 'llama.block_count'\)"),
    (dict(attention_head_count=0), "metadata key 'llama.attention.head_count' must be positive, got 0"),
    (dict(embedding_length="wide"), "metadata key 'llama.embedding_length' holds 'wide', not a number"),
])
def test_unsupported_or_incomplete_gguf_metadata_is_named(tmp_path, kwargs, message):
    path = tmp_path / "model.gguf"
    _write_gguf(path, **kwargs)
    with deadline(5.0), pytest.raises(CheckpointError, match=rf"{path}: {message}"):
        polymodal.load(path)


def test_gguf_tensors_that_do_not_fit_are_named_before_dequantizing(tmp_path):
    _write_gguf(tmp_path / "model.gguf")  # one tensor: every block is missing
    with pytest.raises(CheckpointMismatchError, match=r"missing \(10\): blk\.0\.attn_k\.weight"):
        polymodal.load(tmp_path / "model.gguf")
