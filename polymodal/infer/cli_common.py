"""What the generating commands (`polymodal complete`, `polymodal chat`) share on the command line.

stdout carries the answer and nothing else, so a reply can be piped; everything about the run
goes to stderr: what is loading and how long it took (a GGUF takes seconds to minutes), and
warnings, one line each ("polymodal chat: warning: ...") rather than Python's file:line form.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from polymodal.errors import UsageError
from polymodal.infer.limits import ContextWarning


def load_for_task(path: str | Path, task: str, log: TextIO):
    """Load the model at `path` for `task` ("complete", "chat"), saying on `log` what loads and how long it took.

    Returns (model, tokenizer). Raises `UnsupportedTaskError` when the model cannot do `task`
    (checked before anything is tokenized) and `UsageError` naming `path` when it has no tokenizer.
    """
    from polymodal.api import load_verbose
    from polymodal.models.registry import require_task

    model, tokenizer = load_verbose(path, stream=log)
    require_task(model, task)
    if tokenizer is None:
        raise UsageError(f"{path} has no tokenizer; `polymodal {task}` needs one to read the prompt (save the "
                         "checkpoint with its tokenizer, or give an HF folder with tokenizer.json)")
    return model, tokenizer


@contextlib.contextmanager
def warnings_as_lines(command: str, err: TextIO) -> Iterator[None]:
    """Within the block, print each warning as one line "polymodal COMMAND: warning: MESSAGE" on
    `err`; every `ContextWarning` is shown (each says something about the current request)."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"polymodal {command}: warning: {message}", file=err, flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("always", ContextWarning)
        warnings.showwarning = show
        yield
