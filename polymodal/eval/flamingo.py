"""`polymodal eval` for the `flamingo` family: few-shot (in-context) VQA on the shapes world, M-ICL.

For each of the first n scenes of a world split, one of its questions (cycling through each
scene's list, so every type is asked) is put after k shots, k in SHOTS = (0, 2, 4):

    <image>\\nQ: {shot question}\\nA: {shot answer}\\n  (k times)   <image>\\nQ: {question}\\nA:

Shots are (image, question, answer) triples of other scenes, drawn per query from a fixed pool
of train-split scenes (far from the ones the recipe trains on) asking the query's question type;
the 2-shot prompt uses the first two of the 4-shot prompt's shots, so the columns differ only in
the number of examples. The greedy reply's first line is scored by exact match after
`polymodal.eval.vqa.normalize_answer`.
"""
from __future__ import annotations

import numpy as np
import torch

from polymodal.data.conversation import ImageProcessor
from polymodal.errors import UsageError
from polymodal.eval.mmllm import first_line
from polymodal.eval.vqa import vqa_accuracy
from polymodal.recipes.flamingo import qa_chunk, questions_of_type

SHOTS = (0, 2, 4)
SUPPORT_START = 10 ** 7  # support scenes: train-split indices far past any recipe's num_scenes


def few_shot_prompt(tokenizer, image_token_id: int, shots: list[tuple], query: tuple) -> tuple[list[int], list]:
    """Ids and pixels of a prompt: `shots` (pixels, question, answer) chunks, then the `query`
    (pixels, question) chunk without its answer. Returns (ids, [pixels (3, H, W), ...])."""
    ids: list[int] = []
    pixels = []
    for chunk in [*shots, (*query, None)]:
        for segment in qa_chunk(tokenizer, image_token_id, chunk[0], chunk[1], chunk[2]):
            ids += segment.tokens.tolist()
        pixels.append(chunk[0])
    return ids, pixels


@torch.no_grad()
def evaluate_few_shot(model, tokenizer, split: str = "test", num_scenes: int = 100, shots=SHOTS,
                      batch_size: int = 16, num_objects: tuple[int, int] = (1, 3), answer_tokens: int = 8,
                      progress: bool = True) -> dict[str, float]:
    """VQA accuracy after k shots for each k in `shots`: {"vqa_<k>shot": accuracy over all questions,
    "vqa_<k>shot_<qtype>": per question type}, in [0, 1]."""
    from tqdm import tqdm

    from polymodal.data.world import World

    if num_scenes < 1:
        raise UsageError(f"evaluate_few_shot: num_scenes must be >= 1, got {num_scenes}")
    model.eval()
    processor = ImageProcessor.for_model(model.config)
    world = World(split, image_size=processor.size, num_objects=num_objects)
    support = World("train", image_size=processor.size, num_objects=num_objects)
    queries = []
    for k, scene in enumerate(world.scenes(num_scenes)):
        questions = scene.questions()
        qa = questions[k % len(questions)]
        rng = np.random.default_rng([k, 606])
        examples = []
        while len(examples) < max(shots):
            other = support[SUPPORT_START + int(rng.integers(10 * num_scenes + 100))]
            pool = questions_of_type(other, qa.qtype)
            if pool:
                pick = pool[int(rng.integers(len(pool)))]
                examples.append((processor(other.render()), pick.question, pick.answer))
        queries.append(((processor(scene.render()), qa.question), qa.answer, qa.qtype, examples))
    metrics: dict[str, float] = {}
    image_id = model.config.image_token_id
    with tqdm(total=len(shots) * len(queries), desc="eval flamingo", unit="prompt", disable=not progress) as bar:
        for count in shots:
            replies: list[str] = []
            for start in range(0, len(queries), batch_size):
                chunk = queries[start:start + batch_size]
                prompts = [few_shot_prompt(tokenizer, image_id, examples[:count], query)
                           for query, _, _, examples in chunk]
                pixels = torch.stack([p for _, images in prompts for p in images])
                outs = model.generate([ids for ids, _ in prompts], pixels, max_new_tokens=answer_tokens,
                                      eos_token_id=[], tokenizer=tokenizer, stop_strings=("\n",))
                replies += [first_line(tokenizer.decode(out, skip_special_tokens=True)) for out in outs]
                bar.update(len(chunk))
            table = vqa_accuracy(replies, [q[1] for q in queries], [q[2] for q in queries])
            metrics[f"vqa_{count}shot"] = table.pop("all")
            metrics.update({f"vqa_{count}shot_{qtype}": value for qtype, value in table.items()})
    return metrics


def evaluate(model, tokenizer, data: str = "world", split: str = "test", n: int = 100,
             progress: bool = True) -> dict[str, float]:
    """The flamingo family's `polymodal eval` suite: `evaluate_few_shot` on n scenes (data must be "world")."""
    if data != "world":
        raise UsageError(f"--data: the flamingo family evaluates on 'world' only, got {data!r}")
    if tokenizer is None:
        raise UsageError("the flamingo evaluation needs the checkpoint's tokenizer, and this checkpoint has none")
    return evaluate_few_shot(model, tokenizer, split=split, num_scenes=n, progress=progress)
