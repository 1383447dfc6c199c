"""The text tokenizer: a Hugging Face `tokenizers` backend plus special-token roles and a chat template.

`TextTokenizer` loads a Hugging Face tokenizer folder, a bare `tokenizer.json` or the tokenizer
metadata of a GGUF file, trains small byte-level BPE vocabularies for tests and the shapes world,
and saves folders that `transformers.AutoTokenizer` loads with identical ids. Multimodal models
register their placeholders (`MODALITY_TOKENS`) with `add_special_tokens`, which appends new ids
after the vocabulary so a pretrained embedding table keeps every row.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from polymodal.errors import CheckpointError

from polymodal.tokenizers.chat import CHATML_TEMPLATE, render_chat_template
from polymodal.tokenizers.streaming import IncrementalDecoder

__all__ = ["MODALITY_TOKENS", "TextTokenizer", "IncrementalDecoder"]

MODALITY_TOKENS = [
    "<image>",
    "<|image_start|>",
    "<|image_end|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|video_start|>",
    "<|video_end|>",
]

_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"


def _token_content(value: Any, field: str, source: Path) -> str | None:
    """A special token as written in tokenizer_config.json: a string, an AddedToken dict or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{source}: field {field!r} must be a string or an object with 'content', got {value!r}")


def _config_template(value: Any, source: Path) -> str | None:
    """`chat_template` from a config: a string, or a list of named templates (the 'default' one)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
    raise ValueError(f"{source}: field 'chat_template' must be a string or a list with a 'default' entry")


class TextTokenizer:
    """Text <-> token ids, special-token roles and chat-template rendering.

    Ids are plain Python ints; `encode` gives a `list[int]` of length T, `encode_batch` a list of
    such lists (ragged, no padding). `vocab_size` counts added tokens, so an embedding table of
    `vocab_size` rows covers every id this tokenizer can produce.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
    ):
        # Some tokenizer.json files (e.g. sentence-transformers') switch on padding/truncation;
        # our contract is ragged ids with nothing added, as transformers' encode() returns.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tok = tokenizer
        self._roles: dict[str, str | None] = {}
        for role, token in zip(_ROLES, (bos_token, eos_token, pad_token, unk_token), strict=True):
            self._set_role(role, token)
        self.chat_template = chat_template

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_pretrained(cls, path: str | Path) -> TextTokenizer:
        """Load a Hugging Face tokenizer folder (tokenizer.json, optional tokenizer_config.json,
        special_tokens_map.json and chat_template.jinja) or a bare tokenizer.json file."""
        path = Path(path)
        if path.is_file():
            return cls(Tokenizer.from_file(str(path)))
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer path not found: {path}")
        tokenizer_file = path / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{path}: no {TOKENIZER_FILE} (only fast tokenizers are supported)")
        config: dict[str, Any] = {}
        # special_tokens_map.json is the legacy place for roles; tokenizer_config.json wins.
        for name in ("special_tokens_map.json", CONFIG_FILE):
            if (path / name).is_file():
                try:
                    loaded = json.loads((path / name).read_text(encoding="utf-8"))
                except (ValueError, RecursionError) as err:  # JSONDecodeError and bad UTF-8 are ValueErrors
                    raise CheckpointError(f"{path / name} is not valid JSON ({err})") from None
                if not isinstance(loaded, dict):
                    raise CheckpointError(f"{path / name} must hold a JSON object")
                config.update(loaded)
        source = path / CONFIG_FILE
        template = _config_template(config.get("chat_template"), source)
        if (path / TEMPLATE_FILE).is_file():  # transformers 5 writes the template here; it takes precedence
            template = (path / TEMPLATE_FILE).read_text(encoding="utf-8")
        roles = {role: _token_content(config.get(role), role, source) for role in _ROLES}
        try:
            backend = Tokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # the tokenizers library raises bare Exceptions for a corrupt file
            raise CheckpointError(f"{tokenizer_file} cannot be read as a tokenizer ({err})") from None
        return cls(backend, chat_template=template, **roles)

    @classmethod
    def from_gguf(cls, path_or_reader) -> TextTokenizer:
        """Rebuild the tokenizer stored in a GGUF file's metadata (byte-level BPE, "gpt2" model type).

        Accepts a path or a `gguf.GGUFReader`; other tokenizer models raise a ValueError.
        """
        from polymodal.tokenizers.gguf_vocab import tokenizer_parts_from_gguf

        parts = tokenizer_parts_from_gguf(path_or_reader)
        return cls(
            parts.tokenizer,
            bos_token=parts.bos_token,
            eos_token=parts.eos_token,
            pad_token=parts.pad_token,
            unk_token=parts.unk_token,
            chat_template=parts.chat_template,
        )

    @classmethod
    def train_bpe(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        special_tokens: Sequence[str] = (),
        min_frequency: int = 2,
        chat_template: str | None = None,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ) -> TextTokenizer:
        """Train a byte-level BPE tokenizer (GPT-2 style split, all 256 bytes in the base alphabet).

        `special_tokens` get ids 0..len-1. The result is deterministic for the same inputs. When
        `eos_token` is not given it defaults to "<|im_end|>" or else "<|endoftext|>" if either is
        among `special_tokens`, the ChatML / GPT-2 conventions.
        """
        special_tokens = list(special_tokens)
        smallest = 256 + len(special_tokens)
        if vocab_size < smallest:
            raise ValueError(
                f"vocab_size={vocab_size} is below 256 bytes + {len(special_tokens)} special tokens"
            )
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=special_tokens,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer)
        if eos_token is None:
            eos_token = next((t for t in ("<|im_end|>", "<|endoftext|>") if t in special_tokens), None)
        return cls(
            tokenizer,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            chat_template=chat_template,
        )

    # ---------------------------------------------------------------- saving

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json into `folder` (created if missing).

        The config names the roles, the chat template and the added tokens in the layout
        `transformers.AutoTokenizer` reads (`PreTrainedTokenizerFast`, no space clean-up).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / TOKENIZER_FILE))
        added = self._tok.get_added_tokens_decoder()
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
            "added_tokens_decoder": {
                str(index): {
                    "content": token.content,
                    "lstrip": token.lstrip,
                    "rstrip": token.rstrip,
                    "normalized": token.normalized,
                    "single_word": token.single_word,
                    "special": token.special,
                }
                for index, token in sorted(added.items())
            },
        }
        config.update({role: token for role, token in self._roles.items() if token is not None})
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (folder / CONFIG_FILE).write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )

    # ---------------------------------------------------------------- encoding

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`, a list of length T. `add_special_tokens` adds BOS/EOS when the
        tokenizer's post-processor defines them (e.g. a GGUF with add_bos_token)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """`encode` for each text (encoded in parallel by the backend); ragged, no padding."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of a sequence of ids (list, 1-D tensor or array)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **template_vars: Any,
    ) -> str | list[int]:
        """Render `messages` with the tokenizer's chat template (ChatML when it has none).

        Returns the prompt string, or its ids when `tokenize` (encoded without BOS/EOS, as the
        template writes any it wants). Extra keyword arguments become template variables.
        """
        text = render_chat_template(
            self.chat_template if self.chat_template is not None else CHATML_TEMPLATE,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self._roles,
            **template_vars,
        )
        return self.encode(text) if tokenize else text

    # ---------------------------------------------------------------- vocabulary

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Register `tokens` as special (never split, matched whole) and return their ids.

        New tokens get ids after the current vocabulary; tokens already known keep their id, so
        calling this again changes nothing.
        """
        if isinstance(tokens, str):
            raise TypeError("add_special_tokens takes a sequence of strings, not one string")
        new = [AddedToken(t, special=True, normalized=False) for t in tokens if not self._is_special(t)]
        if new:
            self._tok.add_special_tokens(new)
        return [self._tok.token_to_id(t) for t in tokens]

    def _is_special(self, token: str) -> bool:
        index = self._tok.token_to_id(token)
        added = self._tok.get_added_tokens_decoder().get(index) if index is not None else None
        return added is not None and added.special and added.content == token

    def token_to_id(self, token: str) -> int | None:
        """Id of `token` (vocabulary or added), or None."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of `token_id` (in the model's spelling, e.g. 'Ġthe'), or None."""
        return self._tok.id_to_token(int(token_id))

    @property
    def backend(self) -> Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _set_role(self, role: str, token: str | None) -> None:
        # Like transformers, a role token is always a special token: appended when missing, and
        # marked special (same id) when it is a plain vocabulary entry, so it is never split and
        # `skip_special_tokens` drops it.
        if token is not None:
            self.add_special_tokens([token])
        self._roles[role] = token

    def _role_id(self, role: str) -> int | None:
        token = self._roles[role]
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        """Beginning-of-sequence token string, or None."""
        return self._roles["bos_token"]

    @bos_token.setter
    def bos_token(self, token: str | None) -> None:
        self._set_role("bos_token", token)

    @property
    def eos_token(self) -> str | None:
        """End-of-sequence (end-of-turn) token string, or None."""
        return self._roles["eos_token"]

    @eos_token.setter
    def eos_token(self, token: str | None) -> None:
        self._set_role("eos_token", token)

    @property
    def pad_token(self) -> str | None:
        """Padding token string, or None."""
        return self._roles["pad_token"]

    @pad_token.setter
    def pad_token(self, token: str | None) -> None:
        self._set_role("pad_token", token)

    @property
    def unk_token(self) -> str | None:
        """Unknown token string, or None (byte-level vocabularies need none)."""
        return self._roles["unk_token"]

    @property
    def bos_token_id(self) -> int | None:
        """Id of `bos_token`, or None."""
        return self._role_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """Id of `eos_token`, or None."""
        return self._role_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        """Id of `pad_token`, or None."""
        return self._role_id("pad_token")

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})"
