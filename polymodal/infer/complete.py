"""`polymodal complete`: stream a plain-text (or chat-templated) completion to stdout."""
from __future__ import annotations

import sys

from polymodal.infer.generate import stream_text


def complete(model_path: str, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, chat: bool = False, stop=(), out=None) -> str:
    """Load `model_path`, complete `prompt`, stream the text to `out` (default stdout); returns the completion."""
    out = out or sys.stdout
    from polymodal.api import load

    model, tokenizer = load(model_path)
    if tokenizer is None:
        raise ValueError(f"{model_path} has no tokenizer; `complete` needs one to read the prompt")
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
    else:
        ids = tokenizer.encode(prompt, add_special_tokens=True)
    pieces = []
    for piece in stream_text(model, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k, top_p=top_p, seed=seed, stop_strings=tuple(stop)):
        pieces.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    return "".join(pieces)
