"""Import a llama.cpp GGUF language model (llama or qwen2 architecture) as a `DecoderLM`.

Metadata keys and tensor names follow the GGUF spec (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md)
and llama.cpp's converter: `{arch}.block_count`, `{arch}.embedding_length`, ... and tensors
`token_embd`, `blk.N.attn_q`, ..., `output_norm`, `output` (absent when tied to the embedding).
Quantized tensors are dequantized to float32 with `gguf.quants.dequantize`.

llama.cpp's converter permutes the rows of Llama's Q and K projections so that each rotary pair
is adjacent (its "normal" RoPE); we use HF's rotate-half layout, so those rows are permuted back.
Qwen2 GGUFs keep HF's layout (llama.cpp runs them with NEOX-style RoPE) and are used as stored.

Import validates before it allocates: the metadata becomes a `DecoderConfig` (whose bounds are
checked), the model is built on the `meta` device and the tensor names and shapes of the file are
checked against it; only then are weights dequantized. A truncated or garbled file, an
unsupported architecture or missing metadata raise a `CheckpointError` naming the file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from polymodal.backbones.decoder import DecoderConfig, DecoderLM
from polymodal.checkpoint import load_state_dict_checked
from polymodal.errors import CheckpointError
from polymodal.interop.converters import build_config
from polymodal.interop.namemap import NameMap, check_tensor_names, shapes_of
from polymodal.tokenizers.text import TextTokenizer

GGUF_ARCHITECTURES = ("llama", "qwen2")

GGUF_LM_NAMES = NameMap([
    ("token_embd", "embed_tokens"),
    ("output_norm", "norm"),
    ("output", "lm_head"),
    ("blk.{}.attn_norm", "layers.layers.{}.attn_norm"),
    ("blk.{}.ffn_norm", "layers.layers.{}.mlp_norm"),
    ("blk.{}.attn_q", "layers.layers.{}.attn.q_proj"),
    ("blk.{}.attn_k", "layers.layers.{}.attn.k_proj"),
    ("blk.{}.attn_v", "layers.layers.{}.attn.v_proj"),
    ("blk.{}.attn_output", "layers.layers.{}.attn.o_proj"),
    ("blk.{}.ffn_gate", "layers.layers.{}.mlp.gate_proj"),
    ("blk.{}.ffn_up", "layers.layers.{}.mlp.up_proj"),
    ("blk.{}.ffn_down", "layers.layers.{}.mlp.down_proj"),
])


def _metadata(reader: GGUFReader) -> dict:
    """Every metadata field except the (large) tokenizer arrays, as Python values."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}


def open_gguf(path: str | Path) -> GGUFReader:
    """A reader over a GGUF file; a `CheckpointError` naming the file when it cannot be parsed."""
    try:
        return GGUFReader(path)
    except Exception as err:  # gguf raises ValueError, IndexError, numpy errors ... for a damaged file
        raise CheckpointError(f"{path} is not a readable GGUF file, it may be truncated or corrupt "
                              f"({type(err).__name__}: {err})") from None


def _rope_scaling(meta: dict, arch: str, source: str) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    raise CheckpointError(f"{source}: {arch}.rope.scaling.type {kind!r} is not supported (supported: none, linear)")


def decoder_config_from_gguf(reader: GGUFReader, source: str) -> DecoderConfig:
    """A `DecoderConfig` from the `{arch}.*` and `tokenizer.ggml.*` metadata of a GGUF file.

    Raises `CheckpointError` naming `source` and the metadata key that is missing, malformed or
    out of the config's bounds, or the architecture that is not supported."""
    try:
        return _decoder_config(reader, source)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, ArithmeticError) as err:
        raise CheckpointError(f"{source}: malformed metadata ({type(err).__name__}: {err})") from None


def _decoder_config(reader: GGUFReader, source: str) -> DecoderConfig:
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise CheckpointError(f"{source}: general.architecture {arch!r} is not supported (supported: "
                              f"{GGUF_ARCHITECTURES})")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        # Llama-3.1-style GGUFs store per-frequency RoPE factors as a tensor, not as config fields.
        raise CheckpointError(f"{source}: tensor 'rope_freqs.weight' (llama3 RoPE frequency factors) is not supported")

    def key(name: str, kind: type = int, default=None):
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise CheckpointError(f"{source}: required metadata key '{arch}.{name}' is missing")
        if isinstance(value, (str, bytes, list)):  # int("12") would pass for a number
            raise CheckpointError(f"{source}: metadata key '{arch}.{name}' holds {value!r}, not a number")
        return kind(value)

    hidden, heads = key("embedding_length"), key("attention.head_count")
    if heads < 1:  # checked here, before it divides the width
        raise CheckpointError(f"{source}: metadata key '{arch}.attention.head_count' must be positive, got {heads}")
    head_dim = key("attention.key_length", default=hidden // heads)
    rotary = key("rope.dimension_count", default=head_dim)
    if rotary != head_dim:
        raise CheckpointError(f"{source}: {arch}.rope.dimension_count={rotary} != head dim {head_dim} (partial RoPE)")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else key("vocab_size")

    def token_id(name: str) -> int | None:
        value = reader.fields.get(f"tokenizer.ggml.{name}")
        return None if value is None else int(value.contents())

    fields = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_layers=key("block_count"),
        num_heads=heads,
        num_kv_heads=key("attention.head_count_kv", default=heads),
        head_dim=head_dim if head_dim != hidden // heads else None,
        rms_norm_eps=key("attention.layer_norm_rms_epsilon", float),
        rope_theta=key("rope.freq_base", float, 10000.0),
        rope_scaling=_rope_scaling(meta, arch, source),
        max_position_embeddings=key("context_length"),
        tie_word_embeddings="output.weight" not in names,
        attention_bias=arch == "qwen2",
        bos_token_id=token_id("bos_token_id"),
        eos_token_id=token_id("eos_token_id"),
        pad_token_id=token_id("padding_token_id"),
    )
    keys = {"vocab_size": "tokenizer.ggml.tokens", "hidden_size": f"{arch}.embedding_length",
            "intermediate_size": f"{arch}.feed_forward_length", "num_layers": f"{arch}.block_count",
            "num_heads": f"{arch}.attention.head_count", "num_kv_heads": f"{arch}.attention.head_count_kv",
            "head_dim": f"{arch}.attention.key_length", "max_position_embeddings": f"{arch}.context_length"}
    return build_config(DecoderConfig, fields, source, keys)


def _unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K permutation: per head, interleaved rotary pairs -> rotate-half halves.

    weight (H * D, ...) with rows of head h ordered (0, D/2, 1, D/2+1, ...) -> rows (0, 1, ..., D-1).
    """
    rest = weight.shape[1:]
    return weight.reshape(num_heads, -1, 2, *rest).transpose(1, 2).reshape(weight.shape)


def _torch_shape(tensor) -> tuple[int, ...]:
    """A GGUF tensor's shape in PyTorch order (GGUF lists dims innermost first)."""
    return tuple(int(d) for d in reversed(tensor.shape))


def _tensor_to_torch(tensor) -> torch.Tensor:
    """A GGUF tensor as float32 (dequantized when quantized), in PyTorch's (out, in) order."""
    shape = _torch_shape(tensor)
    if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        data = np.asarray(tensor.data, dtype=np.float32)
    else:
        data = dequantize(tensor.data, tensor.tensor_type)
    data = np.ascontiguousarray(data).reshape(shape)
    # F32 tensors are read-only views of the memory-mapped file; torch needs writable memory.
    return torch.from_numpy(data if data.flags.writeable else data.copy())


def _read_tokenizer(reader: GGUFReader, source: str) -> TextTokenizer:
    """The tokenizer stored in the metadata; a `CheckpointError` naming the file when it is missing or malformed."""
    try:
        return TextTokenizer.from_gguf(reader)
    except Exception as err:  # the tokenizers library raises bare Exceptions for a malformed vocabulary
        raise CheckpointError(f"{source}: its tokenizer metadata (tokenizer.ggml.*) cannot be read "
                              f"({type(err).__name__}: {err})") from None


def import_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[DecoderLM, TextTokenizer]:
    """Load a llama/qwen2 GGUF file as (DecoderLM in eval mode, its TextTokenizer).

    Weights are dequantized to float32 and then cast to `dtype`. Raises `CheckpointError` naming
    the file for a damaged file or unsupported metadata, and `CheckpointMismatchError` naming GGUF
    tensors that are missing, unexpected or mis-shaped for the metadata's config, both before any
    weight is dequantized.
    """
    path = Path(path)
    source = str(path)
    reader = open_gguf(path)
    config = decoder_config_from_gguf(reader, source)
    arch = reader.fields["general.architecture"].contents()
    with torch.device("meta"):  # shapes only: no memory, whatever the metadata says
        probe = DecoderLM(config)
    expected = {GGUF_LM_NAMES.to_foreign(n): shape for n, shape in shapes_of(probe.state_dict()).items()
                if not (config.tie_word_embeddings and n == "lm_head.weight")}
    found = {t.name: t for t in reader.tensors}
    check_tensor_names(expected, {n: _torch_shape(t) for n, t in found.items()}, source)
    tokenizer = _read_tokenizer(reader, source)
    model = DecoderLM(config)
    state = {}
    for gguf_name, tensor in found.items():
        try:
            weight = _tensor_to_torch(tensor)
        except (ValueError, TypeError, NotImplementedError) as err:  # e.g. a quantization gguf cannot dequantize
            raise CheckpointError(f"{source}: tensor {gguf_name!r} ({tensor.tensor_type.name}) cannot be read "
                                  f"({type(err).__name__}: {err})") from None
        if arch == "llama" and gguf_name.endswith(".attn_q.weight"):
            weight = _unpermute_rows(weight, config.num_heads)
        elif arch == "llama" and gguf_name.endswith(".attn_k.weight"):
            weight = _unpermute_rows(weight, config.num_kv_heads)
        state[GGUF_LM_NAMES.to_ours(gguf_name)] = weight
    load_state_dict_checked(model, state, source)
    model.to(dtype=dtype).eval()
    return model, tokenizer
