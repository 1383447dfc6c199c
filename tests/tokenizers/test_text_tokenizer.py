"""TextTokenizer against the transformers oracle, on tiny tokenizers trained in the test."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from polymodal.tokenizers.chat import CHATML_TEMPLATE
from polymodal.tokenizers.text import MODALITY_TOKENS, IncrementalDecoder, TextTokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# A template that reads the role variables and uses whitespace control, so `trim_blocks`,
# `lstrip_blocks` and the special-token variables all have to match transformers.
TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
Be brief.<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] | trim }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A red circle sits left of a blue square; two green triangles are below.",
    "naïve café — déjà vu, 東京タワー, Привет мир, Ωμέγα",
    "emoji: 👍🏽 🙂 👨‍👩‍👧 🚀 and more 🙂🙂",
    "    indented code:\n\tdef f(x):\n\t\treturn x * 2  # twice\n\n",
    "numbers 0 1 2 3 42 1234567 3.14159 -17",
] * 20

STRINGS = [
    "Hello world",
    "The lazy dog jumped.",
    "naïve café 東京 Привет",
    "emoji 👍🏽 👨‍👩‍👧 🚀🙂 end",
    "a   b\t\tc\n\n\n  d  ",
    "   leading and trailing   ",
    "unseen symbols ¿ ∑ ∫ ≠ ☃",
    "<|im_start|>user\nhi<|im_end|>",
    "digits 98765 and 3.5",
    "",
]

CONVERSATIONS = [
    [
        {"role": "user", "content": "What is in the image?"},
        {"role": "assistant", "content": "A red circle. "},
        {"role": "user", "content": "  And below it? 🙂"},
    ],
    [
        {"role": "system", "content": "You count shapes."},
        {"role": "user", "content": "How many?"},
        {"role": "assistant", "content": "Three."},
    ],
]


def _metaspace_tokenizer() -> Tokenizer:
    """A sentencepiece-like BPE (NFC, Metaspace, byte fallback): decoding depends on context."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", *SPECIALS, *byte_tokens], show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def byte_level() -> TextTokenizer:
    return TextTokenizer.train_bpe(
        CORPUS, vocab_size=400, special_tokens=SPECIALS, chat_template=TEMPLATE, bos_token="<|endoftext|>"
    )


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def hf_folder(request, tmp_path_factory, byte_level):
    """A folder written by transformers itself (chat template in chat_template.jinja)."""
    backend = byte_level.backend if request.param == "byte_level" else _metaspace_tokenizer()
    folder = tmp_path_factory.mktemp(request.param)
    ref = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(backend.to_str()),
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        chat_template=TEMPLATE,
    )
    ref.save_pretrained(folder)
    return folder


def assert_matches_oracle(ours: TextTokenizer, ref) -> None:
    """Ids, decoding, roles and chat rendering of `ours` equal those of the transformers `ref`."""
    assert ours.vocab_size == len(ref)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        ref.bos_token_id,
        ref.eos_token_id,
        ref.pad_token_id,
    )
    for text in STRINGS:
        for add in (False, True):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == ref.encode(text, add_special_tokens=add), text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.encode_batch(STRINGS) == [ref.encode(t, add_special_tokens=False) for t in STRINGS]
    for messages in CONVERSATIONS:
        for prompt in (True, False):
            text = ours.apply_chat_template(messages, add_generation_prompt=prompt)
            assert text == ref.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
            ids = ours.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True)
            assert ids == ref.apply_chat_template(
                messages, add_generation_prompt=prompt, tokenize=True, return_dict=False
            )


def test_from_pretrained_matches_transformers(hf_folder):
    ref = AutoTokenizer.from_pretrained(hf_folder)
    ours = TextTokenizer.from_pretrained(hf_folder)
    assert ours.chat_template == TEMPLATE
    assert (ours.bos_token, ours.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert_matches_oracle(ours, ref)
    # A bare tokenizer.json gives the same ids, just no roles or template.
    bare = TextTokenizer.from_pretrained(hf_folder / "tokenizer.json")
    assert bare.encode(STRINGS[3]) == ours.encode(STRINGS[3]) and bare.chat_template is None


def test_save_round_trip_loads_in_transformers(hf_folder, tmp_path):
    ours = TextTokenizer.from_pretrained(hf_folder)
    ours.pad_token = "<|endoftext|>"
    ours.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == TEMPLATE and config["pad_token"] == "<|endoftext|>"
    ref = AutoTokenizer.from_pretrained(tmp_path)
    assert ref.pad_token == "<|endoftext|>"
    assert_matches_oracle(ours, ref)
    assert_matches_oracle(TextTokenizer.from_pretrained(tmp_path), ref)


def test_modality_tokens_keep_base_ids(byte_level, tmp_path):
    tok = TextTokenizer.from_pretrained(_saved(byte_level, tmp_path / "base"))
    base_vocab = tok.backend.get_vocab(with_added_tokens=True)
    base_ids = {text: tok.encode(text) for text in STRINGS}
    size = tok.vocab_size

    ids = tok.add_special_tokens(MODALITY_TOKENS)
    assert ids == list(range(size, size + len(MODALITY_TOKENS)))
    assert tok.vocab_size == size + len(MODALITY_TOKENS)
    assert tok.add_special_tokens(MODALITY_TOKENS) == ids  # idempotent
    assert tok.add_special_tokens(["<|im_end|>"]) == [base_vocab["<|im_end|>"]]  # existing id reused
    assert tok.vocab_size == size + len(MODALITY_TOKENS)
    after = tok.backend.get_vocab(with_added_tokens=True)
    assert all(after[token] == index for token, index in base_vocab.items())
    assert all(tok.encode(text) == expected for text, expected in base_ids.items())

    image = tok.token_to_id("<image>")
    assert tok.encode("<image>") == [image] and tok.id_to_token(image) == "<image>"
    mixed = tok.encode("look:<image><image> a red<image>circle")
    assert mixed.count(image) == 3
    assert tok.decode(mixed) == "look:<image><image> a red<image>circle"
    assert tok.decode(mixed, skip_special_tokens=True) == "look: a redcircle"

    ref = AutoTokenizer.from_pretrained(_saved(tok, tmp_path / "with_modality"))
    assert ref.encode("look:<image><image> a red<image>circle", add_special_tokens=False) == mixed
    assert ref.convert_tokens_to_ids(MODALITY_TOKENS) == ids


def _saved(tok: TextTokenizer, folder):
    tok.save(folder)
    return folder


def test_train_bpe_deterministic_and_round_trips():
    first = TextTokenizer.train_bpe(CORPUS, vocab_size=350, special_tokens=SPECIALS)
    second = TextTokenizer.train_bpe(iter(CORPUS), vocab_size=350, special_tokens=SPECIALS)
    assert first.backend.to_str() == second.backend.to_str()
    assert first.vocab_size == 350
    assert [first.token_to_id(t) for t in SPECIALS] == [0, 1, 2]
    assert first.eos_token == "<|im_end|>" and first.bos_token is None
    for text in STRINGS:
        ids = first.encode(text)
        assert first.decode(ids) == text
    # The learned merges compress the training text: far fewer tokens than bytes.
    sample = CORPUS[0]
    assert len(first.encode(sample)) < 0.75 * len(sample.encode("utf-8"))
    with pytest.raises(ValueError, match="vocab_size"):
        TextTokenizer.train_bpe(CORPUS, vocab_size=100)


def test_default_chat_template_is_chatml(byte_level):
    tok = TextTokenizer(byte_level.backend, eos_token="<|im_end|>")
    assert tok.chat_template is None
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape?"}]},
        {"role": "assistant", "content": "A circle."},
    ]
    expected = "<|im_start|>user\n<image>What shape?<|im_end|>\n<|im_start|>assistant\nA circle.<|im_end|>\n"
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == expected
    assert tok.apply_chat_template(messages) == expected + "<|im_start|>assistant\n"
    ref = PreTrainedTokenizerFast(tokenizer_object=byte_level.backend, chat_template=CHATML_TEMPLATE)
    assert tok.apply_chat_template(messages, tokenize=True) == ref.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_decoder_equals_full_decode(hf_folder, skip):
    tok = TextTokenizer.from_pretrained(hf_folder)
    tok.add_special_tokens(MODALITY_TOKENS)
    for text in [*STRINGS, "<|im_start|>assistant\nA 🚀 at 東京<image> x<|im_end|>"]:
        ids = tok.encode(text)
        decoder = IncrementalDecoder(tok, skip_special_tokens=skip)
        pieces = [decoder.push(i) for i in ids]
        pieces.append(decoder.flush())
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip), text
        assert not any("\ufffd" in piece for piece in pieces)  # partial characters are held back


def test_incremental_decoder_holds_back_partial_character(byte_level):
    ids = byte_level.encode("☃")  # unseen in training: three single-byte tokens
    assert len(ids) == 3
    decoder = IncrementalDecoder(byte_level)
    assert [decoder.push(i) for i in ids] == ["", "", "☃"]
    decoder.push(ids[0])  # a character cut off by the end of generation still comes out on flush
    assert decoder.flush() == "\ufffd"
