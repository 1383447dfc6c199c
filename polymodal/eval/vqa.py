"""VQA exact-match accuracy per question type, after answer normalisation.

`normalize_answer` maps an answer to a canonical form before the exact comparison, in the spirit
of the VQA v2 evaluation (Antol et al. 2015 / the official VQA eval script):
1. lowercase;
2. punctuation becomes a space (so "top-left" = "top left"), except an apostrophe, which is
   dropped ("isn't" -> "isnt"), and a period between digits ("2.5" stays);
3. the number words zero..ten become digits ("two" -> "2");
4. the articles "a", "an", "the" are removed;
5. whitespace is collapsed and stripped.
So "The top-left." == "top left" and "Two" == "2", while "red" != "reddish".
"""
from __future__ import annotations

import re
from collections.abc import Sequence

_NUMBERS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}
_ARTICLES = {"a", "an", "the"}
_DECIMAL = re.compile(r"(?<=\d)\.(?=\d)")
_PUNCT = re.compile(r"[^\w\s\x00]|_")


def normalize_answer(text: str) -> str:
    """The canonical form of an answer (see the module docstring): "The Top-Left." -> "top left"."""
    text = _DECIMAL.sub("\x00", text.lower().replace("'", ""))  # protect decimal points
    text = _PUNCT.sub(" ", text).replace("\x00", ".")
    words = [_NUMBERS.get(w, w) for w in text.split()]
    return " ".join(w for w in words if w not in _ARTICLES)


def answers_match(prediction: str, answer: str) -> bool:
    """Exact match after `normalize_answer` on both sides."""
    return normalize_answer(prediction) == normalize_answer(answer)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[str], qtypes: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy in [0, 1] per question type, plus "all" over every question.

    predictions, answers, qtypes: one entry per question, aligned. Returns {qtype: accuracy, ...,
    "all": accuracy}, question types sorted by name; "all" weights every question equally.
    """
    if not len(predictions) == len(answers) == len(qtypes):
        raise ValueError(f"vqa_accuracy: got {len(predictions)} predictions, {len(answers)} answers and "
                         f"{len(qtypes)} question types; they must align one per question")
    hits: dict[str, list[bool]] = {}
    for pred, answer, qtype in zip(predictions, answers, qtypes):
        hits.setdefault(qtype, []).append(answers_match(pred, answer))
    table = {q: sum(v) / len(v) for q, v in sorted(hits.items())}
    table["all"] = sum(sum(v) for v in hits.values()) / len(predictions) if predictions else 0.0
    return table
