"""VQA answer normalisation and per-type exact-match accuracy."""
import pytest

from polymodal.data.world import World
from polymodal.eval.vqa import answers_match, normalize_answer, vqa_accuracy


@pytest.mark.parametrize("raw, canonical", [
    ("The Top-Left.", "top left"),
    ("  a  RED circle!! ", "red circle"),
    ("Two", "2"),
    ("2.5", "2.5"),
    ("It's an apple", "its apple"),
    ("yes.", "yes"),
    ("snake_case", "snake case"),
    ("", ""),
])
def test_normalize_answer(raw, canonical):
    assert normalize_answer(raw) == canonical


def test_answers_match_is_exact_after_normalisation():
    assert answers_match("Bottom right.", "bottom right")
    assert answers_match("three", "3")
    assert not answers_match("reddish", "red")
    assert not answers_match("bottom", "bottom right")
    assert not answers_match("theory", "ory")  # articles are whole words only


def test_vqa_accuracy_per_type_and_overall():
    preds = ["Red", "blue", "3", "no", "Yes."]
    answers = ["red", "green", "three", "no", "yes"]
    qtypes = ["color", "color", "count", "existence", "existence"]
    table = vqa_accuracy(preds, answers, qtypes)
    assert table == {"color": 0.5, "count": 1.0, "existence": 1.0, "all": 0.8}
    assert list(table) == ["color", "count", "existence", "all"]


def test_world_answers_score_perfectly_against_themselves():
    qas = [qa for scene in World("test").scenes(10) for qa in scene.questions()]
    table = vqa_accuracy([qa.answer.upper() + "." for qa in qas], [qa.answer for qa in qas], [qa.qtype for qa in qas])
    assert table["all"] == 1.0 and len(table) > 5


def test_misaligned_inputs_are_rejected():
    with pytest.raises(ValueError, match="align"):
        vqa_accuracy(["a"], ["a", "b"], ["color"])
    assert vqa_accuracy([], [], []) == {"all": 0.0}
