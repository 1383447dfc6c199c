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


NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


@pytest.mark.parametrize("value, word", list(enumerate(NUMBER_WORDS)))
def test_every_number_word_zero_to_ten_is_its_digit(value, word):
    """The module's rule 3 (as the official VQA eval's manualMap): each of zero..ten, in any case and
    with punctuation or articles around it, normalises to its digit and to nothing else."""
    assert normalize_answer(word) == str(value)
    assert normalize_answer(f"The {word.capitalize()}.") == str(value)
    assert normalize_answer(f"{word.upper()} stars") == f"{value} stars"
    assert answers_match(word, str(value)) and answers_match(str(value), word.title())
    others = [str(v) for v in range(11) if v != value] + [w for w in NUMBER_WORDS if w != word]
    assert not any(answers_match(word, other) for other in others)


def test_number_words_score_as_digits_in_vqa_accuracy():
    """Count answers given as words against digit references (and the reverse): all 11 right;
    one word off by one counts as wrong: 21 of 22 right."""
    digits = [str(v) for v in range(11)]
    assert vqa_accuracy(NUMBER_WORDS, digits, ["count"] * 11) == {"count": 1.0, "all": 1.0}
    assert vqa_accuracy(digits, [w.title() for w in NUMBER_WORDS], ["count"] * 11) == {"count": 1.0, "all": 1.0}
    preds = NUMBER_WORDS + ["seven"] + digits[1:]
    table = vqa_accuracy(preds, digits + ["6"] + NUMBER_WORDS[1:], ["count"] * 22)
    assert table == {"count": pytest.approx(21 / 22), "all": pytest.approx(21 / 22)}
    # Not a number word: left alone (only whole words zero..ten are mapped).
    assert normalize_answer("eleven someone often") == "eleven someone often"


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
