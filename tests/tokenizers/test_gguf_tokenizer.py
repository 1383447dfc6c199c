"""TextTokenizer.from_gguf against transformers' GGUF loader, on the real SmolLM2-135M-Instruct file."""

from __future__ import annotations

import json

import gguf
import pytest
from transformers import AutoTokenizer

from polymodal.assets import smollm2_gguf_path
from polymodal.tokenizers.text import IncrementalDecoder, TextTokenizer

STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café — 東京タワー, Привет мир",
    "emoji 👍🏽 👨‍👩‍👧 🚀🙂",
    "a   b\t\tc\n\n\n  d  ",
    "digits 1234567890 and 3.14159",
    "def f(x):\n    return x ** 2  # square",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "",
]

CONVERSATIONS = [
    [
        {"role": "user", "content": "Name a red shape."},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": "And a blue one? 🙂"},
    ],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
    ],
]


@pytest.fixture(scope="module")
def pair():
    """(ours, transformers reference) for the same GGUF file."""
    path = smollm2_gguf_path()
    ours = TextTokenizer.from_gguf(path)
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return ours, ref


def test_gguf_ids_and_decode_match_transformers(pair):
    ours, ref = pair
    assert ours.vocab_size == len(ref) == 49152
    for text in STRINGS:
        for add in (False, True):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == ref.encode(text, add_special_tokens=add), text
        assert ours.decode(ids) == ref.decode(ids) == text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_gguf_special_tokens_match_transformers(pair):
    ours, ref = pair
    assert (ours.bos_token, ours.eos_token) == (ref.bos_token, ref.eos_token)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        ref.bos_token_id,
        ref.eos_token_id,
        ref.pad_token_id,
    )
    assert ours.eos_token == "<|im_end|>" and ours.eos_token_id == 2


def test_gguf_chat_template_matches_transformers(pair):
    ours, ref = pair
    assert ours.chat_template == ref.chat_template and "<|im_start|>" in ours.chat_template
    for messages in CONVERSATIONS:
        for prompt in (True, False):
            text = ours.apply_chat_template(messages, add_generation_prompt=prompt)
            assert text == ref.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
            ids = ours.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True)
            assert ids == ref.apply_chat_template(
                messages, add_generation_prompt=prompt, tokenize=True, return_dict=False
            )
    assert ours.apply_chat_template(CONVERSATIONS[1]).endswith("<|im_start|>assistant\n")


def test_gguf_streaming_decode(pair):
    ours, _ = pair
    ids = ours.apply_chat_template(CONVERSATIONS[0], tokenize=True) + ours.encode(
        "Sure: 東京 🚀 ok<|im_end|>"
    )
    decoder = IncrementalDecoder(ours)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == ours.decode(ids, skip_special_tokens=True)


def _write_gguf(path, model: str, tokens: list[str], merges: list[str], add_bos: bool, add_eos: bool) -> None:
    """A GGUF holding only tokenizer metadata; token 0 is the control token used as BOS and EOS."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] + [1] * (len(tokens) - 1))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_written_from_trained_tokenizer_round_trips(tmp_path):
    texts = ["a red circle and a blue square", "the green triangle is left of the circle"] * 10
    trained = TextTokenizer.train_bpe(texts, vocab_size=300, special_tokens=["<|endoftext|>"])
    model = json.loads(trained.backend.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [" ".join(pair) for pair in model["merges"]]
    _write_gguf(tmp_path / "tiny.gguf", "gpt2", tokens, merges, add_bos=True, add_eos=True)
    loaded = TextTokenizer.from_gguf(gguf.GGUFReader(tmp_path / "tiny.gguf"))
    for text in [*texts[:2], "unseen words ünïcode 🚀", "<|endoftext|>circle"]:
        assert loaded.encode(text) == trained.encode(text)
        assert loaded.encode(text, add_special_tokens=True) == [0, *trained.encode(text), 0]
    assert loaded.bos_token == loaded.eos_token == "<|endoftext|>"


def test_gguf_other_tokenizer_models_raise(tmp_path):
    _write_gguf(tmp_path / "spm.gguf", "llama", ["<s>", "▁a"], [], add_bos=True, add_eos=False)
    with pytest.raises(ValueError, match="tokenizer.ggml.model is 'llama'"):
        TextTokenizer.from_gguf(tmp_path / "spm.gguf")
