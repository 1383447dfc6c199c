"""Autoregressive generation: greedy or sampled, KV-cached, batched over ragged prompts, streamed.

Prompts of different lengths are left-padded into one batch; the padding mask keeps pads out of
attention and positions count real tokens only, so each row decodes exactly as it would alone.
Works with any model whose forward takes (input_ids | inputs_embeds, attention_mask, kv_cache,
logits_to_keep) and returns `.logits`, and that offers `new_kv_cache(batch, max_len)`.
"""
from __future__ import annotations

import argparse
from typing import Callable, Iterator, Sequence

import torch


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
        raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def generate(model, input_ids, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None, stop_strings: Sequence[str] = (),
             tokenizer=None, on_token: Callable[[int, int], None] | None = None, use_cache: bool = True,
             seed: int | None = None, inputs_embeds: torch.Tensor | None = None, prefill_inputs: dict | None = None,
             attention_mask: torch.Tensor | None = None, suppress_tokens: Sequence[int] = ()) -> list[list[int]]:
    """Generate up to `max_new_tokens` per prompt; returns the new token ids of each row.

    input_ids: a (B, T) tensor or a list of ragged token lists (left-padded internally).
    eos_token_id: id(s) that end a row (default: the model config's eos_token_id); included in
        the output, as transformers does. stop_strings: end a row once its decoded continuation
        contains one (needs `tokenizer`; cut the text with `cut_at_stop`).
    on_token(row, token_id): called for every new token (streaming).
    use_cache: False recomputes the full sequence each step (the oracle for the cached path).
    inputs_embeds (B, T, D) + attention_mask (B, T): prefill from embeddings (multimodal prompts);
        input_ids then only supply the batch size.
    suppress_tokens: ids never generated (e.g. an `<image>` placeholder, which a reply cannot fill).
    prefill_inputs: extra keyword arguments of the prompt's forward (e.g. a multimodal model's `image_mask`).
    """
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the continuation")
    device = next(model.parameters()).device
    if inputs_embeds is not None:
        mask = (attention_mask if attention_mask is not None
                else torch.ones(inputs_embeds.shape[:2], dtype=torch.long)).to(device)
        ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=device)
    else:
        ids, mask = left_pad(input_ids)
        ids, mask = ids.to(device), mask.to(device)
    eos = _eos_set(model, eos_token_id)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    batch, prompt_len = ids.shape
    padded = bool((mask == 0).any())
    cache = model.new_kv_cache(batch, prompt_len + max_new_tokens) if use_cache else None
    out = model(None if inputs_embeds is not None else ids, inputs_embeds=inputs_embeds,
                attention_mask=mask if padded else None, kv_cache=cache, logits_to_keep=1, **(prefill_inputs or {}))
    new_tokens: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    suppress = torch.tensor(list(suppress_tokens), dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1]  # (B, V)
        if suppress.numel():
            logits = logits.index_fill(-1, suppress, float("-inf"))
        next_ids = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B,)
        for row in (~done).nonzero().flatten().tolist():
            token = int(next_ids[row])
            new_tokens[row].append(token)
            if on_token is not None:
                on_token(row, token)
            if token in eos or (stop_strings and _hits_stop(tokenizer, new_tokens[row], stop_strings)):
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


def generate_text(model, tokenizer, prompts: Sequence[str], **kwargs) -> list[str]:
    """Encode text prompts, generate, decode; text is cut at the first stop string or eos."""
    ids = [tokenizer.encode(p) for p in prompts]
    outs = generate(model, ids, tokenizer=tokenizer, **kwargs)
    return [cut_at_stop(tokenizer.decode(o, skip_special_tokens=True), kwargs.get("stop_strings", ())) for o in outs]


def stream_text(model, tokenizer, prompt_ids: Sequence[int], **kwargs) -> Iterator[str]:
    """Yield text pieces of one prompt's continuation as they are produced (stop strings cut)."""
    import queue
    import threading

    from polymodal.tokenizers.text import IncrementalDecoder

    pieces: queue.Queue = queue.Queue()
    decoder = IncrementalDecoder(tokenizer)
    failure: list[BaseException] = []

    def run():
        try:
            generate(model, [list(prompt_ids)], tokenizer=tokenizer,
                     on_token=lambda _row, tok: pieces.put(decoder.push(tok)), **kwargs)
            pieces.put(decoder.flush())
        except BaseException as exc:  # re-raised in the consumer thread
            failure.append(exc)
        finally:
            pieces.put(None)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    stops = tuple(kwargs.get("stop_strings", ()))
    raw, sent = "", 0
    while (piece := pieces.get()) is not None:
        raw += piece
        visible = cut_at_stop(raw, stops)
        stopped = len(visible) < len(raw) and any(s in raw for s in stops)
        # Hold back a tail that could still grow into a stop string.
        ready = len(visible) if stopped else len(visible) - _partial_stop_len(visible, stops)
        if ready > sent:
            yield visible[sent:ready]
            sent = ready
        if stopped:
            break
    worker.join()
    if failure:
        raise failure[0]
    if sent < len(cut_at_stop(raw, stops)):
        yield cut_at_stop(raw, stops)[sent:]


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """text up to (not including) the earliest stop string."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut]


def _partial_stop_len(text: str, stop_strings: Sequence[str]) -> int:
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


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The generation options every generating CLI command shares: --max-new-tokens, --temperature,
    --top-k, --top-p, --seed and --stop (repeatable)."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
