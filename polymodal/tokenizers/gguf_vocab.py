"""Rebuild a Hugging Face `tokenizers.Tokenizer` from the tokenizer metadata of a GGUF file.

A GGUF file carries no `tokenizer.json`; llama.cpp stores the vocabulary as metadata instead
(key names from the GGUF spec, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):
`tokenizer.ggml.model` (the algorithm; "gpt2" means byte-level BPE), `tokenizer.ggml.pre` (which
pre-tokenizer split the merges were learned with), `tokenizer.ggml.tokens`, `.token_type`,
`.merges`, the special ids `.bos_token_id` / `.eos_token_id` / `.unknown_token_id` /
`.padding_token_id`, the flags `.add_bos_token` / `.add_eos_token` and `tokenizer.chat_template`.

Only byte-level BPE ("gpt2": GPT-2, SmolLM, Qwen2, Llama-3, ...) is supported; sentencepiece
("llama"), unigram ("t5") and other models raise a ValueError naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFReader
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# llama.cpp token types (enum llama_token_type): 1 normal, 3 control, 4 user-defined.
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# Split patterns of the pre-tokenizers named by `tokenizer.ggml.pre`, as in the tokenizer.json of
# Qwen2 and Llama-3 (they differ only in how many digits one piece may hold).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = ("default", "gpt-2", "gpt2")
_DIGITS_THEN_GPT2_PRE = ("smollm", "starcoder", "refact", "codeshell")
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3")
_QWEN2_PRE = ("qwen2", "deepseek-r1-qwen")


@dataclass
class GGUFTokenizerParts:
    """What a GGUF file says about its tokenizer: the rebuilt backend plus the roles of tokens."""

    tokenizer: Tokenizer
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    chat_template: str | None


def _byte_level_pre_tokenizer(pre: str | None, source: str) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """The pre-tokenizer for `tokenizer.ggml.pre`, and whether BPE skips merges for in-vocab pieces."""
    if pre is None or pre in _GPT2_PRE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    if pre in _DIGITS_THEN_GPT2_PRE:
        # These vocabularies were trained with every digit split off first (SmolLM's tokenizer.json).
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        ), False
    split = _LLAMA3_SPLIT if pre in _LLAMA3_PRE else _QWEN2_SPLIT if pre in _QWEN2_PRE else None
    if split is None:
        supported = sorted(_GPT2_PRE + _DIGITS_THEN_GPT2_PRE + _LLAMA3_PRE + _QWEN2_PRE)
        raise ValueError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported; supported: {supported}")
    sequence = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # Llama-3's tokenizer.json sets `ignore_merges`: a piece already in the vocabulary is one token.
    return sequence, pre in _LLAMA3_PRE


def _read_fields(reader: GGUFReader) -> dict[str, Any]:
    """The `tokenizer.*` metadata of `reader` as plain Python values."""
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}


def _respell_byte_level(token: str, alphabet: set[str], byte_to_char: dict[int, str]) -> str:
    """`token` in the byte-level alphabet; some converters store plain text for a normal token."""
    if set(token) <= alphabet:
        return token
    return "".join(byte_to_char[b] for b in token.encode("utf-8"))


def _byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the alphabet byte-level BPE spells in)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tokenizer_parts_from_gguf(path_or_reader: str | Path | GGUFReader) -> GGUFTokenizerParts:
    """Read a GGUF file's tokenizer metadata and rebuild the byte-level BPE tokenizer it describes."""
    if isinstance(path_or_reader, GGUFReader):
        reader, source = path_or_reader, "GGUF reader"
    else:
        path = Path(path_or_reader)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        reader, source = GGUFReader(path, "r"), str(path)
    meta = _read_fields(reader)

    model_type = meta.get("tokenizer.ggml.model")
    if model_type != "gpt2":
        raise ValueError(
            f"{source}: tokenizer.ggml.model is {model_type!r}; only 'gpt2' (byte-level BPE) is supported"
        )
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if key not in meta:
            raise ValueError(f"{source}: metadata field {key} is missing")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(
            f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
        )

    byte_to_char = _byte_to_char()
    alphabet = set(byte_to_char.values())
    # Control and user-defined tokens keep their raw text: they are matched whole in the input.
    spelled = [
        t
        if kind in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
        else _respell_byte_level(t, alphabet, byte_to_char)
        for t, kind in zip(tokens, types, strict=True)
    ]
    vocab = {token: index for index, token in enumerate(spelled)}
    merges = []
    for line in meta["tokenizer.ggml.merges"]:
        pair = line.split(" ")
        if len(pair) != 2:
            raise ValueError(
                f"{source}: tokenizer.ggml.merges entry {line!r} is not two tokens separated by a space"
            )
        merges.append((pair[0], pair[1]))

    pre_tokenizer, ignore_merges = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"), source)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(spelled, types, strict=True)
            if k == _TOKEN_TYPE_CONTROL
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(spelled, types, strict=True)
            if k == _TOKEN_TYPE_USER_DEFINED
        ]
    )

    def token_of(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        if index is None:
            return None
        if not 0 <= int(index) < len(spelled):
            raise ValueError(
                f"{source}: tokenizer.ggml.{key} = {index} is outside the vocabulary of {len(spelled)}"
            )
        return spelled[int(index)]

    wrap = [
        (token_of(f"{role}_token_id"), int(meta[f"tokenizer.ggml.{role}_token_id"]))
        if meta.get(f"tokenizer.ggml.add_{role}_token")
        and meta.get(f"tokenizer.ggml.{role}_token_id") is not None
        else None
        for role in ("bos", "eos")
    ]
    tokenizer.post_processor = _post_processor(*wrap)
    return GGUFTokenizerParts(
        tokenizer=tokenizer,
        bos_token=token_of("bos_token_id"),
        eos_token=token_of("eos_token_id"),
        pad_token=token_of("padding_token_id"),
        unk_token=token_of("unknown_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
    )


def _post_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> processors.PostProcessor:
    """Byte-level offsets, plus the `(token, id)` BOS/EOS around the text when the file asks for them."""
    byte_level = processors.ByteLevel(trim_offsets=False)
    if bos is None and eos is None:
        return byte_level
    head = f"{bos[0]}:0 " if bos else ""
    tail = f" {eos[0]}:0" if eos else ""
    template = processors.TemplateProcessing(
        single=f"{head}$A:0{tail}",
        pair=f"{head}$A:0{tail} {head}$B:1{tail}",
        special_tokens=[pair for pair in (bos, eos) if pair is not None],
    )
    return processors.Sequence([byte_level, template])
