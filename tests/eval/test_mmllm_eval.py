"""`polymodal eval` for mmllm: world VQA + captioning, checked with an oracle and a tiny random model."""
import pytest
import torch

import polymodal.eval.mmllm as mmllm_eval
from polymodal.data.world import QTYPES, World, world_tokenizer
from polymodal.eval.mmllm import evaluate, evaluate_world
from polymodal.models.mmllm import MultimodalLM, mmllm_tiny_for


@pytest.fixture(scope="module")
def tokenizer():
    return world_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return MultimodalLM(mmllm_tiny_for(tokenizer)).eval()


def _oracle(monkeypatch, model, tokenizer, split, n, wrong_type=None):
    """Replace generation by one that checks each prompt and answers it exactly (in evaluation order)."""
    scenes = list(World(split, image_size=32).scenes(n))
    expected = [(qa.question, qa.answer, qa.qtype) for s in scenes for qa in s.questions()]
    # Located descriptions (the quickstart's instruct style) are references too: every caption style is.
    expected += [("Describe the image.", s.caption("located"), None) for s in scenes]
    queue = iter(expected)
    image_id = model.config.image_token_id

    def fake_generate(model_, tokenizer_, prompts, **gen):
        replies = []
        for prompt in prompts:
            question, answer, qtype = next(queue)
            assert prompt.ids.count(image_id) == model.image_tokens
            assert prompt.pixels.shape == (1, 3, 32, 32)
            assert question in tokenizer.decode(prompt.ids)
            if qtype is None:  # a description: one of the references, verbatim
                replies.append(answer)
            else:  # an answer in another case with punctuation and a second line, which are ignored
                replies.append("nope" if qtype == wrong_type else f" {answer.capitalize()}.\nextra line")
        return replies

    monkeypatch.setattr(mmllm_eval, "generate_replies", fake_generate)
    return queue


def test_oracle_scores_perfectly(monkeypatch, model, tokenizer):
    queue = _oracle(monkeypatch, model, tokenizer, "compositional", 4)
    metrics = evaluate(model, tokenizer, data="world", split="compositional", n=4)
    assert next(queue, None) is None  # every question and every caption prompt was asked, in order
    assert {k for k in metrics if k.startswith("vqa_")} <= {f"vqa_{q}" for q in QTYPES} | {"vqa_all"}
    assert all(v == 1.0 for k, v in metrics.items() if k.startswith("vqa_"))
    assert metrics["bleu4"] == pytest.approx(1.0)  # each description is one of the references
    assert metrics["cider"] > 1.0


def test_wrong_answers_count_against_their_type(monkeypatch, model, tokenizer):
    _oracle(monkeypatch, model, tokenizer, "val", 3, wrong_type="color")
    metrics = evaluate_world(model, tokenizer, split="val", num_scenes=3, progress=False)
    assert metrics["vqa_color"] == 0.0 and metrics["vqa_count"] == 1.0
    assert 0.0 < metrics["vqa_all"] < 1.0
    # Exactly: every question but the color ones is right, and "all" weights questions equally.
    qtypes = [qa.qtype for s in World("val", image_size=32).scenes(3) for qa in s.questions()]
    assert metrics["vqa_all"] == pytest.approx(1 - qtypes.count("color") / len(qtypes))
    assert all(metrics[f"vqa_{q}"] == 1.0 for q in set(qtypes) - {"color"})


def test_tiny_model_end_to_end(model, tokenizer):
    metrics = evaluate_world(model, tokenizer, split="test", num_scenes=1, answer_tokens=3, caption_tokens=6,
                             progress=False)
    assert "vqa_all" in metrics and {"bleu4", "cider"} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in metrics if k != "cider") and metrics["cider"] >= 0.0


def test_rejects_other_data(model, tokenizer):
    with pytest.raises(ValueError, match="world"):
        evaluate(model, tokenizer, data="coco")
