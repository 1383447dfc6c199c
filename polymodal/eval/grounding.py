"""Grounding evaluation on the shapes world: boxes out (IoU >= 0.5), boxes in, grounded captions.

`polymodal eval CHECKPOINT --data grounding` runs `evaluate_grounding` for any chat model with
image slots (the `mmllm` and `cogvlm` families, whatever their projector). Each of the first n
scenes of a world split is rendered at the model's vision resolution and asked its grounding
questions (`polymodal.data.world.grounding`) as one-turn chats, greedily:
- refer: "Where is <ref>the small red star</ref>?" — the reply's first `<box>` against the
  object's true box; a hit is IoU >= 0.5 (the usual referring-expression accuracy, as in
  RefCOCO), reported over all scenes and per number of objects in the scene;
- region: "What is in <box>...</box>?" — exact match of the description after answer
  normalisation (`polymodal.eval.vqa`);
- grounded caption: every `<ref>phrase</ref><box>...</box>` pair of the reply is matched to an
  unmatched object of the same description whose box it hits at IoU >= 0.5; recall = matched
  objects / objects, precision = matched pairs / pairs written.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from polymodal.data.boxes import PixelBox, box_iou, boxes_in_text, refs_in_text
from polymodal.data.conversation import ImageProcessor
from polymodal.data.world.grounding import grounding_questions
from polymodal.data.world.text import noun
from polymodal.errors import UsageError
from polymodal.eval.mmllm import chat_replies, first_line, world_scenes
from polymodal.eval.vqa import answers_match

IOU_THRESHOLD = 0.5


def referring_hits(replies: Sequence[str], truths: Sequence[PixelBox], size: int) -> list[float]:
    """IoU of each reply's first box with its true pixel box (0.0 for a reply without a box)."""
    ious = []
    for reply, truth in zip(replies, truths, strict=True):
        boxes = boxes_in_text(reply, size, size)
        ious.append(box_iou(boxes[0], truth) if boxes else 0.0)
    return ious


def match_grounded_caption(reply: str, truth: Sequence[tuple[str, PixelBox]], size: int) -> tuple[int, int]:
    """(matched pairs, pairs written) of a grounded caption against the scene's (description, box)
    objects: each written pair takes the first unmatched object of the same normalised description
    whose box it hits at IoU >= 0.5."""
    pairs = refs_in_text(reply, size, size)
    free = list(truth)
    matched = 0
    for phrase, box in pairs:
        for k, (name, true_box) in enumerate(free):
            if answers_match(phrase, name) and box_iou(box, true_box) >= IOU_THRESHOLD:
                matched += 1
                del free[k]
                break
    return matched, len(pairs)


def grounding_prompts(scenes: Sequence) -> dict[str, list[tuple[str, int, str, int]]]:
    """Every grounding question of `scenes` by task ("refer", "region", "caption"), each as
    (question, scene index, true answer, object index)."""
    asked: dict[str, list[tuple[str, int, str, int]]] = {"refer": [], "region": [], "caption": []}
    for k, scene in enumerate(scenes):
        for qa in grounding_questions(scene):
            asked[qa.task].append((qa.question, k, qa.answer, qa.obj))
    return asked


def score_grounding(scenes: Sequence, asked: dict[str, list[tuple[str, int, str, int]]],
                    replies: dict[str, Sequence[str]]) -> dict[str, float]:
    """The metrics of `evaluate_grounding` from the replies to `grounding_prompts(scenes)` (same
    order); boxes are read at the scenes' `image_size`."""
    size = scenes[0].image_size
    truths = [scenes[k].boxes()[obj] for _, k, _, obj in asked["refer"]]
    ious = referring_hits([first_line(r) for r in replies["refer"]], truths, size)
    metrics = {"refer_iou50": _mean([iou >= IOU_THRESHOLD for iou in ious])}
    by_count: dict[int, list[bool]] = {}
    for (_, k, _, _), iou in zip(asked["refer"], ious):
        by_count.setdefault(len(scenes[k].objects), []).append(iou >= IOU_THRESHOLD)
    metrics.update({f"refer_iou50_{count}obj": _mean(hits) for count, hits in sorted(by_count.items())})
    metrics["refer_miou"] = _mean(ious)
    metrics["region_acc"] = _mean([answers_match(first_line(r), answer)
                                   for r, (_, _, answer, _) in zip(replies["region"], asked["region"], strict=True)])
    matched = written = objects = 0
    for reply, (_, k, _, _) in zip(replies["caption"], asked["caption"], strict=True):
        scene = scenes[k]
        truth = [(noun(o, size=True), box) for o, box in zip(scene.objects, scene.boxes())]
        hits, pairs = match_grounded_caption(reply.strip(), truth, size)
        matched, written, objects = matched + hits, written + pairs, objects + len(truth)
    metrics["caption_recall"] = matched / objects if objects else 0.0
    metrics["caption_precision"] = matched / written if written else 0.0
    return metrics


@torch.no_grad()
def evaluate_grounding(model, tokenizer, split: str = "test", num_scenes: int = 100, batch_size: int = 32,
                       processor: ImageProcessor | None = None, num_objects: tuple[int, int] = (1, 3),
                       background: str = "plain", box_tokens: int = 40, caption_tokens: int = 200,
                       progress: bool = True) -> dict[str, float]:
    """Grounding metrics on `num_scenes` scenes of a world split (see the module docstring).

    Returns {"refer_iou50": accuracy, "refer_iou50_<k>obj": the same on scenes of k objects,
    "refer_miou": mean IoU, "region_acc", "caption_recall", "caption_precision"}, all in [0, 1].
    box_tokens / caption_tokens: generation budgets for box / region answers and grounded captions.
    """
    from tqdm import tqdm

    if num_scenes < 1:
        raise UsageError(f"evaluate_grounding: num_scenes must be >= 1, got {num_scenes}")
    processor, scenes, pixels_of = world_scenes(model, processor, split, num_scenes, num_objects, background,
                                                batch_size)
    asked = grounding_prompts(scenes)
    replies: dict[str, list[str]] = {}
    with tqdm(total=sum(len(v) for v in asked.values()), desc=f"eval grounding ({split})", unit="prompt",
              disable=not progress) as bar:
        for task, items in asked.items():
            budget = caption_tokens if task == "caption" else box_tokens
            replies[task] = chat_replies(model, tokenizer, [q for q, *_ in items],
                                         lambda i, items=items: pixels_of(items[i][1]), batch_size, budget, bar=bar)
    return score_grounding(scenes, asked, replies)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values)) / len(values) if values else 0.0
