"""`polymodal eval` for the `lm` family: world questions about scenes described in words.

Each held-out scene is described in words (`polymodal.data.text_documents.world_qa_text`) and
asked each of its questions; the first line of the greedy continuation is scored by exact match
per question type.
"""
from __future__ import annotations

import torch

from polymodal.data.text_documents import world_qa_text
from polymodal.errors import UsageError


@torch.no_grad()
def world_qa_accuracy(model, tokenizer, num_scenes: int = 200, split: str = "val", max_new_tokens: int = 8,
                      batch_size: int = 32, progress: bool = False) -> dict[str, float]:
    """Exact-match accuracy per question type (and "all") on held-out scenes described in words."""
    from tqdm import tqdm

    from polymodal.data.world import World
    from polymodal.infer.generate import generate

    model.eval()
    items = [(world_qa_text(scene, qa)[0], qa.answer, qa.qtype)
             for scene in World(split=split).scenes(num_scenes) for qa in scene.questions()]
    hits: dict[str, list[bool]] = {}
    with tqdm(total=len(items), desc=f"eval lm ({split})", unit="question", disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            outs = generate(model, [tokenizer.encode(p) for p, _, _ in chunk], max_new_tokens=max_new_tokens,
                            stop_strings=("\n",), tokenizer=tokenizer)
            for (_, answer, qtype), out in zip(chunk, outs):
                text = tokenizer.decode(out, skip_special_tokens=True).split("\n")[0].strip()
                hits.setdefault(qtype, []).append(text == answer)
            bar.update(len(chunk))
    table = {q: sum(v) / len(v) for q, v in sorted(hits.items())}
    table["all"] = sum(sum(v) for v in hits.values()) / max(1, sum(len(v) for v in hits.values()))
    return table


def evaluate(model, tokenizer, data: str = "world", split: str = "val", n: int = 200,
             progress: bool = True) -> dict[str, float]:
    """The `lm` family's `polymodal eval` suite: world QA from described scenes (data must be "world")."""
    if data != "world":
        raise UsageError(f"--data: the lm family evaluates on 'world' only, got {data!r}")
    return world_qa_accuracy(model, tokenizer, num_scenes=n, split=split, progress=progress)
