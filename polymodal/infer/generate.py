"""Autoregressive generation: greedy or sampled, KV-cached, batched over ragged prompts, streamed.

Prompts of different lengths are left-padded into one batch; the padding mask keeps pads out of
attention and positions count real tokens only, so each row decodes exactly as it would alone.
Works with any model whose forward takes (input_ids | inputs_embeds, attention_mask, kv_cache,
logits_to_keep) and returns `.logits`, and that offers `new_kv_cache(batch, max_len)`.
Arguments and prompt lengths are checked first (`polymodal.infer.limits`): a bad request fails
before any model work, and no reply runs past the model's context.
"""
from __future__ import annotations

import argparse
import queue
import threading
from typing import Callable, Iterator, Sequence

import torch

from polymodal.errors import UsageError
from polymodal.infer.limits import (
    SAMPLING_RULES,
    check_sampling,
    context_length,
    fit_prompts,
    reply_limits,
    sampling_problem,
    truncation_start,
)

DEFAULT_MAX_NEW_TOKENS = 64


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token per row from logits (B, V) -> (B,). temperature 0 = greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop = (probs.cumsum(-1) - probs) > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]] | torch.Tensor, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged prompts -> (ids (B, T), mask (B, T)) left-padded, mask 1 on real tokens."""
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UsageError("generate needs at least one prompt and every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def generate(model, input_ids, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
             stop_strings: Sequence[str] = (), tokenizer=None, on_token: Callable[[int, int], None] | None = None,
             use_cache: bool = True, seed: int | None = None, inputs_embeds: torch.Tensor | None = None,
             prefill_inputs: dict | None = None, attention_mask: torch.Tensor | None = None,
             suppress_tokens: Sequence[int] = (), truncate: bool = False) -> list[list[int]]:
    """Generate up to `max_new_tokens` per prompt; returns the new token ids of each row.

    input_ids: a (B, T) tensor or a list of ragged token lists (left-padded internally).
    eos_token_id: id(s) that end a row (default: the model config's eos_token_id); included in
        the output, as transformers does. stop_strings: end a row once its decoded continuation
        contains one (needs `tokenizer`; cut the text with `cut_at_stop`).
    on_token(row, token_id): called for every new token (streaming).
    use_cache: False recomputes the full sequence each step (the oracle for the cached path).
    inputs_embeds (B, T, D) + attention_mask (B, T): prefill from embeddings (multimodal prompts);
        input_ids then only supply the batch size.
    suppress_tokens: ids never generated (e.g. an `<image>` placeholder, which a reply cannot fill);
        default: the model's `generation_suppressed_tokens()` when it has one (a unified model's
        image codes, which a text reply never holds).
    prefill_inputs: extra keyword arguments of the prompt's forward (e.g. a multimodal model's `image_mask`).
    truncate: a prompt longer than the model's context keeps its last tokens (with a warning)
        instead of raising `UsageError`; see `polymodal.infer.limits`. A row whose reply would run
        past the context stops there (one warning per call).
    Raises `UsageError` naming a sampling argument out of range (temperature, top_k, top_p,
    max_new_tokens, seed).
    """
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if not suppress_tokens and hasattr(model, "generation_suppressed_tokens"):
        suppress_tokens = model.generation_suppressed_tokens()
    if stop_strings and tokenizer is None:
        raise UsageError("stop_strings need a tokenizer to decode the continuation")
    device = next(model.parameters()).device
    context = context_length(model)
    if inputs_embeds is not None:
        mask = (attention_mask if attention_mask is not None
                else torch.ones(inputs_embeds.shape[:2], dtype=torch.long)).to(device)
        ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=device)
        lengths = mask.sum(-1).tolist()
        if any(truncation_start(n, context, max_new_tokens, truncate) for n in lengths):
            # Embeddings may hold image features; only the caller knows where a cut may fall.
            raise UsageError("truncate: a prompt given as inputs_embeds cannot be cut here; cut its ids before "
                             "embedding (polymodal.infer.chat does this for prompts with images)")
    else:
        prompts = fit_prompts(_prompt_lists(input_ids), context, max_new_tokens, truncate)
        lengths = [len(p) for p in prompts]
        ids, mask = left_pad(prompts)
        ids, mask = ids.to(device), mask.to(device)
    limits = reply_limits(lengths, context, max_new_tokens)
    eos = _eos_set(model, eos_token_id)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    batch, prompt_len = ids.shape
    padded = bool((mask == 0).any())
    cache = model.new_kv_cache(batch, prompt_len + max(limits)) if use_cache else None
    out = model(None if inputs_embeds is not None else ids, inputs_embeds=inputs_embeds,
                attention_mask=mask if padded else None, kv_cache=cache, logits_to_keep=1, **(prefill_inputs or {}))
    new_tokens: list[list[int]] = [[] for _ in range(batch)]
    done = torch.tensor([limit == 0 for limit in limits], dtype=torch.bool, device=device)
    suppress = torch.tensor(list(suppress_tokens), dtype=torch.long, device=device)
    for _ in range(max(limits)):
        logits = out.logits[:, -1]  # (B, V)
        if suppress.numel():
            logits = logits.index_fill(-1, suppress, float("-inf"))
        next_ids = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B,)
        for row in (~done).nonzero().flatten().tolist():
            token = int(next_ids[row])
            new_tokens[row].append(token)
            if on_token is not None:
                on_token(row, token)
            if (token in eos or len(new_tokens[row]) >= limits[row]
                    or (stop_strings and _hits_stop(tokenizer, new_tokens[row], stop_strings))):
                done[row] = True
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
        if use_cache:
            out = model(next_ids[:, None], attention_mask=mask if padded else None, kv_cache=cache, logits_to_keep=1)
        else:
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            out = model(ids, attention_mask=mask if padded else None, logits_to_keep=1)
    return new_tokens


def _prompt_lists(input_ids) -> list[list[int]]:
    """Prompts as token lists: a (B, T) or (T,) tensor, or ragged lists."""
    if isinstance(input_ids, torch.Tensor):
        return input_ids.tolist() if input_ids.dim() == 2 else [input_ids.tolist()]
    return [list(p) for p in input_ids]


def generate_text(model, tokenizer, prompts: Sequence[str], **kwargs) -> list[str]:
    """Encode text prompts, generate, decode; text is cut at the first stop string or eos."""
    ids = [tokenizer.encode(p) for p in prompts]
    outs = generate(model, ids, tokenizer=tokenizer, **kwargs)
    return [cut_at_stop(tokenizer.decode(o, skip_special_tokens=True), kwargs.get("stop_strings", ())) for o in outs]


def stream_text(model, tokenizer, prompt_ids: Sequence[int], **kwargs) -> Iterator[str]:
    """Yield text pieces of one prompt's continuation as they are produced (stop strings cut).

    prompt_ids: one prompt (T,); kwargs as `generate`. The arguments and the prompt's length are
    checked (and a too-long prompt truncated, with `truncate=True`) when this is called, before
    the first piece, so a bad request raises here rather than mid-stream. Closing the iterator
    early stops the generation.
    """
    check_sampling(**{name: kwargs[name] for name in SAMPLING_RULES if name in kwargs})
    if kwargs.get("inputs_embeds") is None:
        prompt_ids = fit_prompts([list(prompt_ids)], context_length(model),
                                 kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS), kwargs.pop("truncate", False))[0]
    return _stream(model, tokenizer, list(prompt_ids), kwargs)


class _StreamClosed(Exception):
    """Raised inside the generation thread to end it once its consumer has gone."""


def _stream(model, tokenizer, prompt_ids: list[int], kwargs: dict) -> Iterator[str]:
    """`stream_text`'s generator: `generate` runs in a thread, its tokens are decoded here."""
    from polymodal.tokenizers.text import IncrementalDecoder

    pieces: queue.Queue = queue.Queue()
    decoder = IncrementalDecoder(tokenizer)
    failure: list[BaseException] = []
    closed = threading.Event()

    def on_token(_row: int, token: int) -> None:
        if closed.is_set():
            raise _StreamClosed
        pieces.put(decoder.push(token))

    def run():
        try:
            generate(model, [prompt_ids], tokenizer=tokenizer, on_token=on_token, **kwargs)
            pieces.put(decoder.flush())
        except _StreamClosed:
            pass
        except BaseException as exc:  # re-raised in the consumer thread
            failure.append(exc)
        finally:
            pieces.put(None)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    stops = tuple(kwargs.get("stop_strings", ()))
    raw, sent = "", 0
    try:
        while (piece := pieces.get()) is not None:
            raw += piece
            visible = cut_at_stop(raw, stops)
            stopped = len(visible) < len(raw) and any(s in raw for s in stops)
            # Hold back a tail that could still grow into a stop string.
            ready = len(visible) if stopped else len(visible) - partial_stop_len(visible, stops)
            if ready > sent:
                yield visible[sent:ready]
                sent = ready
            if stopped:
                break
    finally:
        # Runs too when the consumer closes the stream early (a client gone, Ctrl-C): the thread
        # stops at its next token instead of generating a reply nobody reads.
        closed.set()
    worker.join()
    if failure:
        raise failure[0]
    if sent < len(cut_at_stop(raw, stops)):
        yield cut_at_stop(raw, stops)[sent:]


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """text up to (not including) the earliest stop string."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut]


def partial_stop_len(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for stop in stop_strings:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def _hits_stop(tokenizer, tokens: list[int], stop_strings: Sequence[str]) -> bool:
    # A stop string spans at most len(stop) tokens (each token decodes to >= 1 char in practice),
    # so decoding a short tail is enough and keeps the check O(1) per step.
    window = max(len(s) for s in stop_strings) + 2
    tail = tokenizer.decode(tokens[-window:])
    return any(s in tail for s in stop_strings)


def _eos_set(model, eos_token_id) -> set[int]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "config", None), "eos_token_id", None)
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id}


def _option_type(convert: Callable[[str], object], argument: str) -> Callable[[str], object]:
    """An argparse `type=` that converts the text, then applies `SAMPLING_RULES[argument]`, so a
    value out of range gets argparse's one-line error naming the option."""
    def parse(text: str):
        value = convert(text)  # a ValueError here becomes argparse's "invalid int value: 'x'"
        problem = sampling_problem(argument, value)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text!r}")
        return value

    parse.__name__ = convert.__name__  # argparse names the type in its "invalid ... value" message
    return parse


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The generation options every generating CLI command shares: --max-new-tokens, --temperature,
    --top-k, --top-p, --seed and --stop (repeatable). Values out of range are argparse errors."""
    parser.add_argument("--max-new-tokens", type=_option_type(int, "max_new_tokens"), default=max_new_tokens,
                        help="most tokens to generate (fewer when the reply reaches the model's context)")
    parser.add_argument("--temperature", type=_option_type(float, "temperature"), default=0.0,
                        help="sampling temperature, >= 0; 0 = greedy (always the most likely token)")
    parser.add_argument("--top-k", type=_option_type(int, "top_k"), default=0,
                        help="sample among the K most likely tokens only; 0 = no limit")
    parser.add_argument("--top-p", type=_option_type(float, "top_p"), default=1.0,
                        help="nucleus sampling: the smallest set of tokens holding this much probability, in (0, 1]")
    parser.add_argument("--seed", type=_option_type(int, "seed"), default=None,
                        help="random seed of the sampler, for reproducible sampled replies")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="end the reply before this text (repeatable)")


def add_context_arguments(parser: argparse.ArgumentParser) -> None:
    """--truncate: keep the last tokens of a prompt longer than the model's context (with a
    warning) instead of refusing it."""
    parser.add_argument("--truncate", action="store_true",
                        help="keep the last tokens of a prompt longer than the model's context instead of refusing "
                             "it (leaving room for --max-new-tokens)")
