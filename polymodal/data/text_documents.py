"""Text documents for language-model training and evaluation: world QA and plain-text files.

- `world_qa_text(scene, qa)`: a shapes-world scene described in words, then a question and its
  exact answer (a text-only task with exact scoring, the seed of the multimodal quickstart);
- `file_texts(path)`: the documents of a `.txt` (blank-line-separated blocks) or `.jsonl` (a
  "text" field per line) file; a malformed line is a counted skip (or an error with `strict`).
"""
from __future__ import annotations

from pathlib import Path

from polymodal.data.loading import DataError, SkipCounter, iter_jsonl, skip_bad


def world_qa_text(scene, qa) -> tuple[str, str]:
    """(prompt, answer) for one world question asked about a scene described in words."""
    return f"{scene.caption('detailed')}\nQ: {qa.question}\nA:", f" {qa.answer}\n"


def world_qa_texts(num: int, split: str = "train", seed: int = 0) -> list[str]:
    """`num` texts "description / Q / A" of consecutive world scenes, cycling through each scene's questions."""
    from polymodal.data.world import World

    texts = []
    for i, scene in enumerate(World(split=split, seed=seed).scenes(num)):
        questions = scene.questions()
        prompt, answer = world_qa_text(scene, questions[i % len(questions)])
        texts.append(prompt + answer)
    return texts


def file_texts(path: str | Path, strict: bool = False) -> list[str]:
    """The documents of a .txt (blank-line separated) or .jsonl ({"text": ...} per line) file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".jsonl":
        counter = SkipCounter(path, strict=strict)
        texts = list(skip_bad(iter_jsonl(path, counter), _text_field, counter))
    else:
        try:
            content = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err})") from None
        texts = [block.strip() for block in content.split("\n\n") if block.strip()]
    if not texts:
        raise DataError(f"{path} holds no documents")
    return texts


def _text_field(record: object) -> str:
    """The "text" field of a JSONL record, or DataError."""
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DataError("expected a JSON object with a string 'text' field")
    return record["text"]
