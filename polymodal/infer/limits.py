"""What a generation request may ask: the sampling arguments' ranges and the model's context window.

Every generating entry point (`generate`, `stream_text`, the chat API, the command line) checks
through these functions, so one rule gives one message wherever a request comes from:
- sampling arguments out of range raise `UsageError` naming the argument and its value (the
  command line reuses `SAMPLING_RULES` for argparse's own one-line errors);
- a prompt longer than the model's context (`max_position_embeddings`) raises `UsageError`
  naming both lengths, unless truncation is asked for: then its oldest tokens are dropped so the
  prompt and the reply fit (a `ContextWarning` says so);
- a reply that would run past the context stops there, with one warning per call.
Lengths count tokens as the model sees them: prompt length + reply length <= context.
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence

from polymodal.errors import UsageError


class ContextWarning(UserWarning):
    """A prompt was truncated, or a reply stopped early, to fit the model's context."""


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# argument -> (the rule in words, its check). NaN fails every comparison, so it is refused too.
SAMPLING_RULES: dict[str, tuple[str, Callable[[object], bool]]] = {
    "max_new_tokens": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "temperature": ("a finite number >= 0 (0 = greedy)", lambda v: _is_number(v) and math.isfinite(v) and v >= 0),
    "top_k": ("an integer >= 0 (0 = no top-k cut)", lambda v: _is_int(v) and v >= 0),
    "top_p": ("a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1),
    "seed": ("an integer or None", lambda v: v is None or _is_int(v)),
}


def sampling_problem(argument: str, value) -> str | None:
    """The rule `value` breaks for sampling `argument` ("must be ..."), or None when it is valid."""
    rule, valid = SAMPLING_RULES[argument]
    return None if valid(value) else f"must be {rule}"


def check_sampling(**values) -> None:
    """Raise `UsageError` naming the first sampling argument out of range, e.g.
    `check_sampling(temperature=-1)` -> "temperature must be a finite number >= 0 (0 = greedy), got -1".

    Accepts any of max_new_tokens, temperature, top_k, top_p, seed.
    """
    for argument, value in values.items():
        if argument not in SAMPLING_RULES:
            raise UsageError(f"check_sampling: unknown sampling argument {argument!r}; known: {list(SAMPLING_RULES)}")
        problem = sampling_problem(argument, value)
        if problem:
            raise UsageError(f"{argument} {problem}, got {value!r}")


def context_length(model) -> int | None:
    """The model's context in tokens: its config's max_position_embeddings (a MultimodalLM keeps
    its LM's settings in config.lm); None when the model does not say."""
    config = getattr(model, "config", None)
    return getattr(getattr(config, "lm", config), "max_position_embeddings", None)


def truncation_start(length: int, context: int | None, max_new_tokens: int, truncate: bool) -> int:
    """Index of the first prompt token to keep (0: keep them all) for a prompt of `length` tokens.

    Without `truncate`, a prompt longer than `context` raises `UsageError` naming both lengths.
    With it, the prompt keeps its last max(1, context - max_new_tokens) tokens: room for the
    whole reply, and always at least one token to continue from.
    """
    if context is None:
        return 0
    if not truncate:
        if length > context:
            raise UsageError(f"the prompt is {length} tokens, longer than the model's context of {context} tokens "
                             "(max_position_embeddings); shorten it, or truncate (truncate=True, --truncate) to "
                             "keep its last tokens")
        return 0
    return max(0, length - max(1, context - max_new_tokens))


def warn_truncated(length: int, kept: int, context: int, max_new_tokens: int) -> None:
    """Say (with `warnings.warn`) that a prompt of `length` tokens was cut to its last `kept`."""
    warnings.warn(f"the prompt of {length} tokens was truncated to its last {kept} tokens to fit the model's "
                  f"context of {context} tokens with room for max_new_tokens={max_new_tokens}", ContextWarning,
                  stacklevel=2)


def fit_prompts(prompts: Sequence[Sequence[int]], context: int | None, max_new_tokens: int,
                truncate: bool) -> list[list[int]]:
    """Prompts (ragged token lists) checked against the context and, with `truncate`, cut to their
    last tokens (see `truncation_start`); one warning names the longest prompt that was cut."""
    fitted, cut = [], None
    for prompt in prompts:
        start = truncation_start(len(prompt), context, max_new_tokens, truncate)
        fitted.append(list(prompt[start:]))
        if start and (cut is None or len(prompt) > cut[0]):
            cut = (len(prompt), len(prompt) - start)
    if cut is not None:
        warn_truncated(*cut, context, max_new_tokens)
    return fitted


def reply_limits(lengths: Sequence[int], context: int | None, max_new_tokens: int) -> list[int]:
    """The most new tokens each prompt (of `lengths` tokens) may get: max_new_tokens, or fewer
    where the reply would run past the context (one warning for the call names the longest prompt)."""
    if context is None:
        return [max_new_tokens] * len(lengths)
    limits = [max(0, min(max_new_tokens, context - n)) for n in lengths]
    if any(limit < max_new_tokens for limit in limits):
        longest = max(lengths)
        warnings.warn(f"the prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                      f"context of {context} tokens; generation stops at the context (after at most "
                      f"{max(0, context - longest)} new tokens)", ContextWarning, stacklevel=2)
    return limits
