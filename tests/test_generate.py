"""Generation: KV cache equals recomputation, batched ragged prompts equal one-by-one (tokens and, on
sharpened models, logits at every step), sampling rules and their validation (library and command line)."""
import argparse
import re

import pytest
import torch

from polymodal.backbones.decoder import DecoderLM
from polymodal.errors import UsageError
from polymodal.infer.limits import ContextWarning
from polymodal.infer.generate import (
    add_context_arguments,
    add_sampling_arguments,
    cut_at_stop,
    generate,
    sample_next_token,
    stream_text,
)
from polymodal.models.lm import lm_tiny
from polymodal.models.mmllm import MultimodalLM, mmllm_tiny


def _model(seed=0):
    torch.manual_seed(seed)
    return DecoderLM(lm_tiny()).eval()


PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]


def test_kv_cache_generation_equals_full_recomputation():
    model = _model()
    cached = generate(model, PROMPTS, max_new_tokens=12)
    recomputed = generate(model, PROMPTS, max_new_tokens=12, use_cache=False)
    assert cached == recomputed
    assert all(len(t) == 12 for t in cached)


def test_kv_cache_logits_equal_full_forward():
    model = _model()
    ids = torch.randint(0, 256, (2, 9))
    full = model(ids).logits
    cache = model.new_kv_cache(2, 16)
    step_logits = [model(ids[:, :5], kv_cache=cache).logits]
    for t in range(5, 9):
        step_logits.append(model(ids[:, t:t + 1], kv_cache=cache).logits)
    torch.testing.assert_close(torch.cat(step_logits, 1), full, atol=1e-5, rtol=1e-5)


def test_batched_ragged_generation_equals_one_by_one():
    model = _model(1)
    batched = generate(model, PROMPTS, max_new_tokens=10)
    single = [generate(model, [p], max_new_tokens=10)[0] for p in PROMPTS]
    assert batched == single


def _sharpened(model, factor: float = 8.0):
    """`model` with every weight matrix scaled by `factor` (norm gains and biases untouched).

    At the 0.02 init q.k is ~0, attention is nearly uniform and the logits hardly depend on the
    input: a decoding bug that puts a token at the wrong position moved the logits by ~0.004 and
    left every greedy token unchanged. Scaled up, attention is sharp and position-sensitive, so
    such a bug moves the logits by O(1) and the top-1 margins are no longer razor-thin.
    """
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.mul_(factor)
    return model.eval()


def _with_step_logits(model, run):
    """(run(), logits (B, S, V)): the last-position logits of each of the S forward calls of `model`
    that `run` makes (a forward hook: one call per generated token, prefill first)."""
    steps = []
    handle = model.register_forward_hook(lambda _module, _args, out: steps.append(out.logits[:, -1].clone()))
    try:
        result = run()
    finally:
        handle.remove()
    return result, torch.stack(steps, dim=1)


def _alone_unpadded(model, prompt, new_tokens, **inputs):
    """Oracle: one plain forward of prompt + generated tokens, alone in its batch (no padding, no
    mask, no cache) -> the logits (S, V) that predicted each generated token."""
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(new_tokens)]), **inputs).logits[0]
    return logits[len(prompt) - 1:len(prompt) - 1 + len(new_tokens)]


RAGGED = [[5, 6, 7, 8, 9, 10, 31, 32], [11, 12], [13, 14, 15, 16, 17], [18]]  # left-padded by 0, 6, 3 and 7


def test_cached_ragged_decoding_logits_equal_each_prompt_alone_and_full_recomputation():
    """Left-padded ragged batch, KV cache: the logits of every step of every row equal (a) the
    full recomputation `generate(use_cache=False)` and (b) the row run alone and unpadded in one
    plain forward, which shares no padding, mask, position or cache logic with the path under test."""
    model = _sharpened(_model(2))
    steps = 8
    tokens, cached = _with_step_logits(model, lambda: generate(model, RAGGED, max_new_tokens=steps, eos_token_id=[]))
    again, recomputed = _with_step_logits(
        model, lambda: generate(model, RAGGED, max_new_tokens=steps, eos_token_id=[], use_cache=False))
    assert cached.shape == (len(RAGGED), steps, model.config.vocab_size)
    assert tokens == again and all(len(t) == steps for t in tokens)
    torch.testing.assert_close(cached, recomputed, atol=1e-4, rtol=1e-4)
    for row, prompt in enumerate(RAGGED):
        torch.testing.assert_close(cached[row], _alone_unpadded(model, prompt, tokens[row]), atol=1e-4, rtol=1e-4)
    # The sharpening worked: different prompts give very different next-token logits.
    assert (cached[0, 0] - cached[1, 0]).abs().max() > 1.0


def test_cached_ragged_image_prompt_logits_equal_each_prompt_alone():
    """MultimodalLM: ragged prompts with an image at different offsets, left-padded into one batch
    and decoded with the KV cache from embeddings; every step's logits equal the row run alone,
    unpadded, from its ids and pixels in one plain forward."""
    torch.manual_seed(3)
    model = _sharpened(MultimodalLM(mmllm_tiny()))
    image, k = model.config.image_token_id, model.image_tokens
    prompts = [[1, 2, 3] + [image] * k + [4, 5, 6, 7], [image] * k + [8], [9] + [image] * k + [10, 11]]
    pixels = torch.randn(len(prompts), 3, model.config.image_size, model.config.image_size,
                         generator=torch.Generator().manual_seed(0))
    steps = 6
    tokens, cached = _with_step_logits(
        model, lambda: model.generate(prompts, pixels, max_new_tokens=steps, eos_token_id=[]))
    assert cached.shape == (len(prompts), steps, model.config.lm.vocab_size)
    for row, prompt in enumerate(prompts):
        assert len(tokens[row]) == steps and image not in tokens[row]
        alone = _alone_unpadded(model, prompt, tokens[row], pixel_values=pixels[row:row + 1])
        torch.testing.assert_close(cached[row], alone, atol=1e-4, rtol=1e-4)
    assert (cached[0, 0] - cached[1, 0]).abs().max() > 1.0


def test_eos_stops_a_row_and_is_included():
    model = _model()
    free = generate(model, PROMPTS[:1], max_new_tokens=6)[0]
    stopped = generate(model, PROMPTS[:1], max_new_tokens=6, eos_token_id=free[2])[0]
    assert stopped == free[: free.index(free[2]) + 1]


def test_sampling_respects_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    top2 = sample_next_token(logits, temperature=1.0, top_k=2, generator=g)
    assert set(top2.tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # p0 ~ 0.64, p0+p1 ~ 0.87
    nucleus = sample_next_token(logits, temperature=1.0, top_p=0.7, generator=g)
    assert set(nucleus.tolist()) == {0, 1} and probs[0] < 0.7
    assert sample_next_token(logits[:1], temperature=0.0).item() == 0



def test_temperature_divides_the_logits():
    """Sampled frequencies follow softmax(logits / T): T = 2 on logits (2, 0) gives p0 = 0.731."""
    logits = torch.tensor([[2.0, 0.0]]).repeat(20_000, 1)
    picks = sample_next_token(logits, temperature=2.0, generator=torch.Generator().manual_seed(0))
    expected = torch.tensor([1.0, 0.0]).softmax(-1)[0].item()
    assert (picks == 0).float().mean().item() == pytest.approx(expected, abs=0.015)


def test_each_row_gets_exactly_its_token_limit_without_eos():
    """max_new_tokens each, except a prompt that reaches the context (256) first: it gets 256 - 253."""
    prompts = PROMPTS + [list(range(3, 256))]
    with pytest.warns(ContextWarning):
        new = generate(_model(), prompts, max_new_tokens=5, eos_token_id=[])
    assert [len(row) for row in new] == [5, 5, 5, 3]

def test_seeded_sampling_is_reproducible():
    model = _model()
    a = generate(model, PROMPTS, max_new_tokens=8, temperature=0.9, top_p=0.9, seed=3)
    b = generate(model, PROMPTS, max_new_tokens=8, temperature=0.9, top_p=0.9, seed=3)
    assert a == b


def test_cut_at_stop():
    assert cut_at_stop("hello\nUser: hi", ["\nUser:"]) == "hello"
    assert cut_at_stop("hello", ["zzz"]) == "hello"


BAD_SAMPLING = [("temperature", -1.0), ("temperature", float("nan")), ("temperature", float("inf")),
                ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("top_k", 2.5), ("max_new_tokens", -1),
                ("max_new_tokens", 3.0), ("seed", "7"), ("seed", 1.5)]


@pytest.mark.parametrize("argument,value", BAD_SAMPLING)
def test_bad_sampling_arguments_are_usage_errors_naming_the_argument(argument, value):
    model = _model()
    with pytest.raises(UsageError, match=rf"^{argument} must be .*, got {re.escape(repr(value))}$"):
        generate(model, PROMPTS, **{argument: value})
    with pytest.raises(UsageError, match=rf"^{argument} must be"):
        stream_text(model, None, PROMPTS[0], **{argument: value})  # raised at the call, before any piece


def test_boundary_sampling_values_are_accepted():
    model = _model()
    assert generate(model, PROMPTS, max_new_tokens=0) == [[], [], []]
    out = generate(model, PROMPTS, max_new_tokens=3, temperature=0, top_k=0, top_p=1.0, seed=None)
    assert all(len(t) == 3 for t in out)
    assert len(generate(model, PROMPTS[:1], max_new_tokens=2, temperature=1e-3, top_p=1e-3, seed=0)[0]) == 2


def _sampling_parser():
    parser = argparse.ArgumentParser(prog="polymodal complete")
    add_sampling_arguments(parser, max_new_tokens=64)
    add_context_arguments(parser)
    return parser


@pytest.mark.parametrize("option,text,expected", [
    ("--temperature", "-1", "must be a finite number >= 0"), ("--temperature", "nan", "must be a finite number"),
    ("--top-p", "0", "must be a number in (0, 1]"), ("--top-p", "1.01", "must be a number in (0, 1]"),
    ("--top-k", "-3", "must be an integer >= 0"), ("--max-new-tokens", "-1", "must be an integer >= 0"),
    ("--top-k", "x", "invalid int value: 'x'"), ("--seed", "1.5", "invalid int value: '1.5'"),
    ("--temperature", "hot", "invalid float value: 'hot'"),
])
def test_cli_sampling_options_get_argparse_errors_naming_the_option(option, text, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _sampling_parser().parse_args([option, text])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"polymodal complete: error: argument {option}: {expected}" in err and "Traceback" not in err


def test_cli_sampling_options_parse_and_have_help():
    parser = _sampling_parser()
    args = parser.parse_args(["--temperature", "0.7", "--top-p", "0.9", "--top-k", "5", "--seed", "3",
                              "--max-new-tokens", "0", "--truncate"])
    assert (args.temperature, args.top_p, args.top_k, args.seed, args.max_new_tokens, args.truncate) == \
        (0.7, 0.9, 5, 3, 0, True)
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) == 7 and all(a.help for a in options)
