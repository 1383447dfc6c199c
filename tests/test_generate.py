"""Generation: KV cache equals recomputation, batched ragged prompts equal one-by-one, sampling rules."""
import torch

from polymodal.backbones.decoder import DecoderLM
from polymodal.infer.generate import cut_at_stop, generate, sample_next_token
from polymodal.models.lm import lm_tiny


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


def test_seeded_sampling_is_reproducible():
    model = _model()
    a = generate(model, PROMPTS, max_new_tokens=8, temperature=0.9, top_p=0.9, seed=3)
    b = generate(model, PROMPTS, max_new_tokens=8, temperature=0.9, top_p=0.9, seed=3)
    assert a == b


def test_cut_at_stop():
    assert cut_at_stop("hello\nUser: hi", ["\nUser:"]) == "hello"
    assert cut_at_stop("hello", ["zzz"]) == "hello"
