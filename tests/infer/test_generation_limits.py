"""The model's context bounds generation: too-long prompts are refused or truncated, replies stop at the context."""
import threading
import warnings

import pytest
import torch

from polymodal.backbones.decoder import DecoderLM
from polymodal.errors import UsageError
from polymodal.infer.generate import generate, stream_text
from polymodal.infer.limits import ContextWarning, check_sampling, context_length, truncation_start
from polymodal.models.lm import lm_tiny


def _model(context):
    torch.manual_seed(0)
    config = lm_tiny()
    config.max_position_embeddings = context
    return DecoderLM(config).eval()


PROMPTS = [list(range(5, 17)), [20, 21, 22], list(range(30, 38))]  # 12, 3 and 8 tokens


def test_context_length_reads_the_lm_config(mm_model):
    assert context_length(_model(20)) == 20
    assert context_length(mm_model) == mm_model.config.lm.max_position_embeddings
    assert context_length(object()) is None


def test_a_prompt_longer_than_the_context_is_an_error_naming_both_lengths():
    model = _model(10)
    with pytest.raises(UsageError, match=r"the prompt is 12 tokens, longer than the model's context of 10 tokens"):
        generate(model, PROMPTS, max_new_tokens=4)
    with pytest.raises(UsageError, match="12 tokens.*context of 10"):
        stream_text(model, None, PROMPTS[0], max_new_tokens=4)  # at the call, before the first piece


def test_truncate_keeps_the_last_tokens_with_room_for_the_reply():
    model = _model(10)
    with pytest.warns(ContextWarning, match="the prompt of 12 tokens was truncated to its last 6 tokens") as caught:
        out = generate(model, PROMPTS, max_new_tokens=4, truncate=True, eos_token_id=[])
    assert len(caught) == 1  # one warning for the batch, naming the longest prompt
    expected = generate(model, [PROMPTS[0][-6:], PROMPTS[1], PROMPTS[2][-6:]], max_new_tokens=4, eos_token_id=[])
    assert out == expected and all(len(t) == 4 for t in out)
    assert truncation_start(12, 10, 20, truncate=True) == 11  # a reply as long as the context keeps one token
    assert truncation_start(12, None, 4, truncate=False) == 0  # a model that states no context is not checked


def test_replies_stop_at_the_context_row_by_row_with_one_warning():
    model = _model(14)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cached = generate(model, PROMPTS, max_new_tokens=9, eos_token_id=[])
        recomputed = generate(model, PROMPTS, max_new_tokens=9, eos_token_id=[], use_cache=False)
        alone = [generate(model, [p], max_new_tokens=9, eos_token_id=[])[0] for p in PROMPTS]
    assert [len(t) for t in cached] == [2, 9, 6]  # 14 - 12, all 9, 14 - 8
    assert cached == recomputed == alone
    assert [str(w.message) for w in caught[:2]] == [
        "the prompt (12 tokens) + max_new_tokens (9) exceeds the model's context of 14 tokens; generation stops "
        "at the context (after at most 2 new tokens)"] * 2


def test_a_prompt_filling_the_context_gets_no_new_tokens():
    with pytest.warns(ContextWarning, match="after at most 0 new tokens"):
        assert generate(_model(12), PROMPTS[:1], max_new_tokens=3) == [[]]


def test_embedded_prompts_are_checked_but_not_cut_here(mm_model):
    ids = [[1, 2, 3] * 100]  # 300 tokens, more than the tiny model's 256
    with pytest.raises(UsageError, match="the prompt is 300 tokens, longer than the model's context of 256"):
        mm_model.generate(ids, None, max_new_tokens=2)
    with pytest.raises(UsageError, match="cannot be cut here"):
        mm_model.generate(ids, None, max_new_tokens=2, truncate=True)


def test_closing_a_stream_early_stops_its_generation():
    model = _model(256)
    calls = []
    forward = model.forward

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    model.forward = counting_forward

    class Tokenizer:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(65 + i % 26) for i in ids)

    before = set(threading.enumerate())
    stream = stream_text(model, Tokenizer(), PROMPTS[1], max_new_tokens=200, eos_token_id=[])
    next(stream)
    (worker,) = set(threading.enumerate()) - before
    stream.close()
    worker.join(timeout=60)
    assert not worker.is_alive() and len(calls) < 200  # 200 forwards would mean it ran to the end


def test_check_sampling_names_unknown_arguments():
    with pytest.raises(UsageError, match="unknown sampling argument 'temp'"):
        check_sampling(temp=1.0)
