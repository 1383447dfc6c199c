"""Reasoning usage types side by side on the world's multi-object questions: plain, M-ICL, M-CoT, LAVR.

`polymodal eval CHECKPOINT --data reasoning` asks each of the first n scenes of a world split
(2-4 objects: the question types that need several objects) one question of each type in
QTYPES (count, relation, position: where plain answers sit lowest), four ways, greedily:
- plain: "<image>\\n{question}" — the first line of the reply;
- icl (M-ICL): the same after two shots of the same question type about other scenes, each a
  user turn with its own image and the true answer (`in_context_messages`);
- think (M-CoT): the question + THINK_SUFFIX — the reply's text after "Answer:";
- tools (LAVR): with TOOLS_SYSTEM, the tool loop of `polymodal.infer.reasoning` with the world
  detector (the exact scorer) — the final reply's text after "Answer:" (or its first line);
  "tools_called" reports the share of questions where the model called the detector.
Answers are compared by exact match after `polymodal.eval.vqa.normalize_answer`. A model trained
on the think / tools chat variants (`data.think`, `data.tools` of the mmllm recipe) answers all
four ways; any chat checkpoint can be asked, it just may not follow the formats.
"""
from __future__ import annotations

import numpy as np
import torch

from polymodal.data.conversation import IMAGE_MARKER, ImageProcessor
from polymodal.data.world.reasoning import THINK_SUFFIX, TOOLS_SYSTEM, final_answer
from polymodal.errors import UsageError
from polymodal.eval.mmllm import first_line
from polymodal.eval.vqa import vqa_accuracy
from polymodal.infer.chat import chat_batch
from polymodal.infer.reasoning import (
    chat_responder,
    in_context_messages,
    run_with_tools,
    world_tools,
)

QTYPES = ("count", "relation", "position")
MODES = ("plain", "icl", "think", "tools")
SUPPORT_START = 10 ** 7  # shot scenes: train-split indices far past any recipe's num_scenes


@torch.no_grad()
def evaluate_reasoning(model, tokenizer, split: str = "test", num_scenes: int = 100,
                       num_objects: tuple[int, int] = (2, 4), batch_size: int = 16, modes=MODES,
                       qtypes=QTYPES, progress: bool = True) -> dict[str, float]:
    """{"<mode>_<qtype>": accuracy, "<mode>_all": over the asked questions, "tools_called"} in [0, 1]."""
    from tqdm import tqdm

    from polymodal.data.world import World

    if num_scenes < 1:
        raise UsageError(f"evaluate_reasoning: num_scenes must be >= 1, got {num_scenes}")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise UsageError(f"evaluate_reasoning: modes must be among {MODES}, got {unknown}")
    model.eval()
    processor = ImageProcessor.for_model(model.config)
    world = World(split, image_size=processor.size, num_objects=num_objects)
    support = World("train", image_size=processor.size, num_objects=num_objects)
    items = []  # (image, question, answer, qtype, shots [(image, question, answer)])
    for k, scene in enumerate(world.scenes(num_scenes)):
        rng = np.random.default_rng([k, 707])
        for qtype in qtypes:
            pool = [qa for qa in scene.questions() if qa.qtype == qtype]
            if not pool:
                continue
            qa = pool[int(rng.integers(len(pool)))]
            shots = []
            while len(shots) < 2:
                other = support[SUPPORT_START + int(rng.integers(10 * num_scenes + 100))]
                others = [x for x in other.questions() if x.qtype == qtype]
                if others:
                    pick = others[int(rng.integers(len(others)))]
                    shots.append((other.render(), pick.question, pick.answer))
            items.append((scene.render(), qa.question, qa.answer, qtype, shots))
    answers, types = [it[2] for it in items], [it[3] for it in items]
    metrics: dict[str, float] = {}
    gen = {"max_new_tokens": 12}
    with tqdm(total=len(modes) * len(items), desc="eval reasoning", unit="question", disable=not progress) as bar:
        for mode in modes:
            if mode == "tools":
                runs = run_with_tools(chat_responder(model, tokenizer, processor, batch_size, max_new_tokens=48),
                                      [([{"role": "system", "content": TOOLS_SYSTEM},
                                         {"role": "user", "content": f"{IMAGE_MARKER}\n{it[1]}"}], [it[0]])
                                       for it in items], world_tools(), max_calls=2)
                predictions = [final_answer(run.answer or "") for run in runs]
                metrics["tools_called"] = sum(bool(run.calls) for run in runs) / max(len(runs), 1)
            else:
                if mode == "plain":
                    requests = [([{"role": "user", "content": f"{IMAGE_MARKER}\n{it[1]}"}], [it[0]]) for it in items]
                elif mode == "think":
                    requests = [([{"role": "user", "content": f"{IMAGE_MARKER}\n{it[1]}{THINK_SUFFIX}"}], [it[0]])
                                for it in items]
                else:
                    requests = [(in_context_messages([(q, a) for _, q, a in it[4]], it[1]),
                                 [image for image, _, _ in it[4]] + [it[0]]) for it in items]
                budget = {**gen, "max_new_tokens": 96} if mode == "think" else gen
                replies = chat_batch(model, tokenizer, requests, processor=processor, batch_size=batch_size, **budget)
                predictions = [final_answer(r) if mode == "think" else first_line(r) for r in replies]
            bar.update(len(items))
            table = vqa_accuracy(predictions, answers, types)
            metrics[f"{mode}_all"] = table.pop("all")
            metrics.update({f"{mode}_{qtype}": value for qtype, value in table.items()})
    return metrics
