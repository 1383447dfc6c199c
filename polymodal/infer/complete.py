"""`polymodal complete`: stream a plain-text (or chat-templated) completion to stdout.

The completion is the only thing on stdout; loading progress and warnings go to stderr
(`polymodal.infer.cli_common`).
"""
from __future__ import annotations

import sys

from polymodal.infer.cli_common import load_for_task, warnings_as_lines
from polymodal.infer.generate import stream_text
from polymodal.infer.limits import check_sampling


def complete(model_path: str, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, chat: bool = False, stop=(), truncate: bool = False,
             out=None, err=None) -> str:
    """Load `model_path`, complete `prompt`, stream the text to `out` (default stdout); returns the completion.

    chat: wrap the prompt in the model's chat template. truncate: keep the last tokens of a
    prompt longer than the model's context instead of raising `UsageError`. Loading progress and
    warnings go to `err` (default stderr). Raises `UnsupportedTaskError` for a model that cannot
    complete text (e.g. CLIP), `UsageError` for a checkpoint without tokenizer or a bad argument.
    """
    out, err = out or sys.stdout, err or sys.stderr
    # Before the load, which takes minutes for a large GGUF.
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    with warnings_as_lines("complete", err):
        model, tokenizer = load_for_task(model_path, "complete", err)
        if chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True)
        else:
            ids = tokenizer.encode(prompt, add_special_tokens=True)
        pieces = []
        for piece in stream_text(model, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, seed=seed, stop_strings=tuple(stop), truncate=truncate):
            pieces.append(piece)
            out.write(piece)
            out.flush()
    out.write("\n")
    return "".join(pieces)
