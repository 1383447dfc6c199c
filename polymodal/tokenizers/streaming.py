"""Incremental detokenization for streaming generation.

Decoding one token at a time is wrong in two ways: a byte-level token may hold only part of a
multi-byte UTF-8 character (decoding it alone gives U+FFFD), and some decoders (sentencepiece's
leading-space rule, WordPiece's `##`) give a token's text only in context. So the decoder keeps
a small window: it decodes `ids[prefix:]` and `ids[prefix:read]` and emits the difference, and
holds text back while it ends in U+FFFD (an unfinished character).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from polymodal.tokenizers.text import TextTokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces whose concatenation equals the full decode.

    `push(id)` returns the text completed by that token ("" while a character is unfinished);
    `flush()` returns what is still held back once generation ends.
    """

    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window that gives the emitted text its shape
        self._read = 0  # ids before this index have had their text emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the newly completed text (possibly "")."""
        self._ids.append(int(token_id))
        emitted = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(emitted) or text.endswith(_REPLACEMENT):
            return ""
        # The window slides forward so each push decodes a few tokens, not the whole stream;
        # ids before the new window start are never needed again.
        self._ids = self._ids[self._read :]
        self._prefix, self._read = 0, len(self._ids)
        return text[len(emitted) :]

    def flush(self) -> str:
        """Return the held-back text (an unfinished character decodes as U+FFFD) and reset."""
        emitted = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._ids, self._prefix, self._read = [], 0, 0
        return text[len(emitted) :]
