"""One choice's text as its tokens arrive: incremental detokenization plus stop sequences.

Text is released to a stream only when no stop sequence can still begin in it: a tail that is
a prefix of a stop sequence is held back until the next token decides. Once a stop sequence
appears the text is cut before it and the choice is over, so streamed deltas always join to
exactly the non-streamed text.
"""
from __future__ import annotations

from collections.abc import Sequence

from polymodal.infer.generate import cut_at_stop, partial_stop_len
from polymodal.tokenizers.streaming import IncrementalDecoder


class ReplyText:
    """Assembles one choice. `push(token)` -> (text now safe to send, whether a stop sequence ended
    the choice); `finish()` -> the rest, once the choice ends for another reason (eos, length)."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = tuple(stops)
        self.raw = ""
        self.sent = 0

    @property
    def text(self) -> str:
        """The choice's text so far (cut before a stop sequence)."""
        return cut_at_stop(self.raw, self.stops)

    def push(self, token: int) -> tuple[str, bool]:
        """Add one generated token id."""
        self.raw += self.decoder.push(token)
        return self._release(final=False)

    def finish(self) -> str:
        """Flush the decoder and release everything that is left (a stop sequence may still cut it)."""
        self.raw += self.decoder.flush()
        return self._release(final=True)[0]

    def _release(self, final: bool) -> tuple[str, bool]:
        visible = self.text
        stopped = len(visible) < len(self.raw)
        ready = len(visible) if stopped or final else len(visible) - partial_stop_len(visible, self.stops)
        delta = visible[self.sent:ready] if ready > self.sent else ""
        self.sent = max(self.sent, ready)
        return delta, stopped
