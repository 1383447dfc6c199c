"""`polymodal eval` for the `mmllm` family: shapes-world VQA and captioning with exact references.

For each of the first n scenes of a world split (val, test, or compositional: held-out
color+shape pairs), the model sees the rendered image and
- answers every question of the scene (`Scene.questions()`), asked as the first user turn
  "<image>\\n{question}" like the training conversations; the first line of the reply is scored
  by exact match after `polymodal.eval.vqa.normalize_answer`, per question type;
- describes the image ("<image>\\nDescribe the image."); the reply is scored against all the
  scene's captions (every template of every style in `CAPTION_STYLES`: a model may have been
  taught to describe in any of them) with corpus BLEU-4 and CIDEr-D.
Generation is greedy and batched; each prompt carries its own copy of the scene image.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import torch

from polymodal.data.conversation import IMAGE_MARKER, ImageProcessor
from polymodal.data.world.text import CAPTION_STYLES, captions_of
from polymodal.eval.captioning import caption_scores
from polymodal.eval.vqa import vqa_accuracy
from polymodal.errors import UsageError
from polymodal.infer.chat import encode_chat, generate_replies

CAPTION_PROMPT = "Describe the image."


def chat_replies(model, tokenizer, prompts: Sequence[str], image_of: Callable[[int], object], batch_size: int,
                 max_new_tokens: int, processor: ImageProcessor | None = None, bar=None) -> list[str]:
    """Greedy replies to one-turn chats "<image>\\n{prompt}", `batch_size` prompts per generate call.

    image_of(i) -> the i-th prompt's image (PIL, array or processed (3, H, W) tensor); images are
    made per batch, not held for the whole list.
    """
    replies: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        chats = [encode_chat(model, tokenizer, [{"role": "user", "content": IMAGE_MARKER + "\n" + text}],
                             [image_of(start + j)], processor) for j, text in enumerate(chunk)]
        replies += generate_replies(model, tokenizer, chats, max_new_tokens=max_new_tokens)
        if bar is not None:
            bar.update(len(chunk))
    return replies


def first_line(reply: str) -> str:
    """The scored part of a reply: its first line after stripping surrounding whitespace ("" if empty)."""
    return (reply.strip().splitlines() or [""])[0]


@torch.no_grad()
def answer_questions(model, tokenizer, processor: ImageProcessor | None, items: Sequence[tuple],
                     batch_size: int = 64, max_new_tokens: int = 12) -> list[str]:
    """Greedy answers to (image, question) pairs, each asked as `evaluate_world` asks it; returns
    the first line of each reply, the part exact match scores."""
    model.eval()
    replies = chat_replies(model, tokenizer, [q for _, q in items], lambda i: items[i][0], batch_size,
                           max_new_tokens, processor)
    return [first_line(reply) for reply in replies]


def world_scenes(model, processor: ImageProcessor | None, split: str, num_scenes: int,
                 num_objects: tuple[int, int], background: str, batch_size: int):
    """(processor, scenes, pixels_of) for an evaluation on `num_scenes` scenes of a world split:
    the processor (default: the model's vision tower's), the scenes, and `pixels_of(k)` -> scene k
    rendered and processed. Puts the model in eval mode."""
    from polymodal.data.world import World

    model.eval()
    processor = processor or ImageProcessor.for_model(model.config)
    world = World(split, image_size=processor.size, num_objects=num_objects, background=background)
    scenes = list(world.scenes(num_scenes))
    # A scene's questions are consecutive, so a small cache renders each scene about once per pass.
    pixels_of = lru_cache(maxsize=batch_size)(lambda k: processor(scenes[k].render()))
    return processor, scenes, pixels_of


@torch.no_grad()
def evaluate_world(model, tokenizer, split: str = "test", num_scenes: int = 100, batch_size: int = 32,
                   processor: ImageProcessor | None = None, num_objects: tuple[int, int] = (1, 3),
                   background: str = "plain", answer_tokens: int = 12, caption_tokens: int = 96,
                   progress: bool = True) -> dict[str, float]:
    """VQA accuracy per question type and captioning scores on `num_scenes` scenes of a world split.

    Returns {"vqa_<qtype>": accuracy, ..., "vqa_all": accuracy over all questions, "bleu4": corpus
    BLEU-4 in [0, 1], "cider": CIDEr-D (COCO scale)}. Scenes are rendered at the processor's size
    (default: the vision tower's resolution) with `num_objects` and `background` as in `World`.
    answer_tokens / caption_tokens: generation budgets for answers and descriptions.
    """
    from tqdm import tqdm

    if num_scenes < 1:
        raise ValueError(f"evaluate_world: num_scenes must be >= 1, got {num_scenes}")
    processor, scenes, pixels_of = world_scenes(model, processor, split, num_scenes, num_objects, background,
                                                batch_size)
    qa_items, answers, qtypes = [], [], []
    for k, scene in enumerate(scenes):
        for qa in scene.questions():
            qa_items.append((qa.question, k))
            answers.append(qa.answer)
            qtypes.append(qa.qtype)
    with tqdm(total=len(qa_items) + len(scenes), desc=f"eval mmllm ({split})", unit="prompt",
              disable=not progress) as bar:
        replies = chat_replies(model, tokenizer, [q for q, _ in qa_items], lambda i: pixels_of(qa_items[i][1]),
                               batch_size, answer_tokens, bar=bar)
        captions = chat_replies(model, tokenizer, [CAPTION_PROMPT] * len(scenes), pixels_of, batch_size,
                                caption_tokens, bar=bar)
    predictions = [first_line(reply) for reply in replies]
    metrics = {f"vqa_{k}": v for k, v in vqa_accuracy(predictions, answers, qtypes).items()}
    references = [captions_of(scene, CAPTION_STYLES) for scene in scenes]
    metrics.update(caption_scores([c.strip() for c in captions], references))
    return metrics


DATA = ("world", "grounding", "reasoning")


def evaluate(model, tokenizer, data: str = "world", split: str = "test", n: int = 100,
             progress: bool = True) -> dict[str, float]:
    """The mmllm family's `polymodal eval` suite on n scenes: data "world" runs `evaluate_world`
    (VQA and captioning), "grounding" runs `polymodal.eval.grounding.evaluate_grounding` (boxes),
    "reasoning" runs `polymodal.eval.reasoning.evaluate_reasoning` (plain / M-ICL / M-CoT / LAVR)."""
    if data not in DATA:
        raise UsageError(f"--data: the {model.family} family evaluates on one of {DATA}, got {data!r}")
    if tokenizer is None:
        raise UsageError(f"the {model.family} evaluation needs the checkpoint's tokenizer, and this checkpoint has none")
    if data == "grounding":
        from polymodal.eval.grounding import evaluate_grounding

        return evaluate_grounding(model, tokenizer, split=split, num_scenes=n, progress=progress)
    if data == "reasoning":
        from polymodal.eval.reasoning import evaluate_reasoning

        return evaluate_reasoning(model, tokenizer, split=split, num_scenes=n, progress=progress)
    return evaluate_world(model, tokenizer, split=split, num_scenes=n, progress=progress)
