"""Can an MM-LLM learn one shapes-world question type? Train on that type alone and watch.

Every training document is a one-turn chat "<image>\\n<question>" -> answer with a question of
the chosen type (so nothing but the image can answer it), packed padding-free as in the
instruct stage. The script prints the answer loss along the way and the val exact match plus
the most common answers before and after. A loss that stays at the entropy of the answers
(ln 2 / 2 per supervised token for balanced yes/no plus the end token) means the model learns
nothing of the image-question relation, whatever the step count.

Usage: python benchmarks/probe_mmllm_qtype.py --qtype existence [--init CHECKPOINT] [--steps 400]
       [--docs 80] [--lr 5e-4] [--warmup N] [--untied] [--objects 1 3] [--scene-as image|words|scrambled]
Without --init the quickstart's model is built fresh (random LM, frozen random patch encoder);
--untied gives it separate input and output word embeddings. An --init checkpoint that records
the token ids its stage saw (an align checkpoint's seen_tokens.json) gets fresh rows for the
others first, as the instruct stage does: so `--init ALIGN_CHECKPOINT` is a ~90 s test of whether
that align stage's LM lets the comparison questions be learnt (docs/notes/quickstart.md).
--scene-as words replaces the image by text naming each object ("red circle , blue star"), and
scrambled names colors and shapes with words the questions never use for them (digits, number
words), so scene and question share no token: this separates "the LM cannot learn the
comparison" from "the LM cannot compare two different representations of the same thing". With
a text scene there is no val exact match; the answer loss tells.
With --templates, nothing trains: the --init checkpoint's val exact match is printed per question
template of the type (color and shape words replaced by C and S) with its answer counts, which
shows which forms are answered and which get one constant answer.
"""
from __future__ import annotations

import argparse
import collections
import math
import re

import torch

from polymodal.api import load
from polymodal.data.conversation import IMAGE_MARKER, ImageProcessor, conversation_document
from polymodal.data.world import COLORS, QTYPES, SHAPES, World
from polymodal.data.world.text import NUMBER_WORDS
from polymodal.nn.lora import LoRAConfig
from polymodal.quickstart import stage_config
from polymodal.eval.mmllm import answer_questions
from polymodal.recipes.mmllm import build_mmllm, set_trainable
from polymodal.recipes.seen_tokens import recorded_in, reinit_unseen_tokens
from polymodal.sequence import pack_documents
from polymodal.train.data import ShuffledBatches
from polymodal.train.loop import TrainConfig, train
from polymodal.train.objectives import sequence_loss


def _val_questions(processor, qtype: str, objects: tuple[int, int], scenes: int) -> tuple[list, list]:
    """([(image, question)], [qa]) for every `qtype` question of the first `scenes` val scenes."""
    items, qas = [], []
    for scene in World("val", image_size=processor.size, num_objects=objects).scenes(scenes):
        for qa in scene.questions():
            if qa.qtype == qtype:
                items.append((scene.image(), qa.question))
                qas.append(qa)
    return items, qas


def accuracy(model, tokenizer, processor, qtype: str, objects: tuple[int, int], scenes: int = 60) -> tuple[float, list]:
    """(val exact match on `qtype`, the 4 most common answers) over `scenes` val scenes."""
    items, qas = _val_questions(processor, qtype, objects, scenes)
    answers = answer_questions(model, tokenizer, processor, items)
    correct = sum(a == qa.answer for a, qa in zip(answers, qas))
    return correct / len(qas), collections.Counter(answers).most_common(4)


def question_template(question: str) -> str:
    """The question with its color words replaced by C and its shape words (singular or plural) by S."""
    question = re.sub(rf"\b({'|'.join(COLORS)})\b", "C", question)
    return re.sub(rf"\b({'|'.join(SHAPES)})(e?s)?\b", "S", question)


def accuracy_by_template(model, tokenizer, processor, qtype: str, objects: tuple[int, int] = (1, 3),
                         scenes: int = 100) -> list[tuple[str, int, float, dict, dict]]:
    """Per question template of `qtype` on `scenes` val scenes: (template, count, exact match,
    {true answer: count}, {model answer: count}), most frequent template first."""
    asked = collections.defaultdict(list)  # template -> [(truth, answer)]
    items, qas = _val_questions(processor, qtype, objects, scenes)
    for qa, answer in zip(qas, answer_questions(model, tokenizer, processor, items)):
        asked[question_template(qa.question)].append((qa.answer, answer))
    rows = [(t, len(pairs), sum(a == b for a, b in pairs) / len(pairs), dict(collections.Counter(a for a, _ in pairs)),
             dict(collections.Counter(b for _, b in pairs))) for t, pairs in asked.items()]
    return sorted(rows, key=lambda row: -row[1])


SCENE_FORMS = ("image", "words", "scrambled")
# The scrambled scene's names: each color a digit, each shape a number word (neither names a
# color or shape in any question).
SCRAMBLED_NAMES = {**{c: str(i) for i, c in enumerate(COLORS)}, **{s: NUMBER_WORDS[i + 1] for i, s in enumerate(SHAPES)}}


def scene_words(scene, scrambled: bool = False) -> str:
    """The scene's objects as text, "red circle , blue star" (scrambled: "0 one , 2 five")."""
    name = SCRAMBLED_NAMES.get if scrambled else str
    return " , ".join(f"{name(o.color)} {name(o.shape)}" for o in scene.objects)


def one_question_chat(scene, qtype: str, scene_as: str = "image") -> list[dict]:
    """A one-turn chat asking one `qtype` question of `scene` (any question if it has none of that
    type); the scene is the image, or text when `scene_as` is "words" / "scrambled"."""
    if scene_as not in SCENE_FORMS:
        raise ValueError(f"scene_as must be one of {SCENE_FORMS}, got {scene_as!r}")
    pool = [qa for qa in scene.questions() if qa.qtype == qtype] or scene.questions()
    qa = pool[scene.seed % len(pool)]
    context = IMAGE_MARKER if scene_as == "image" else scene_words(scene, scrambled=scene_as == "scrambled")
    return [{"role": "user", "content": context + "\n" + qa.question}, {"role": "assistant", "content": qa.answer}]


def probe_qtype(qtype: str, init: str | None = None, steps: int = 400, docs: int = 80, lr: float = 5e-4,
                objects: tuple[int, int] = (1, 3), eval_scenes: int = 60, scene_as: str = "image",
                warmup: int | None = None, untied: bool = False) -> dict:
    """Train on `qtype` questions alone; returns {"losses": per step, "before"/"after": (accuracy,
    top answers), or None with a text scene}. warmup: linear warm-up steps (default steps // 20)."""
    if init and untied:
        raise ValueError("probe_qtype: untied builds a fresh model; it cannot be combined with init")
    torch.manual_seed(0)
    if init:
        model, tokenizer = load(init)
        seen = recorded_in(init)
        if seen is not None:
            reinit_unseen_tokens(model.lm, seen, seed=0)
    else:
        # Only the stage config's model and tokenizer settings are read here; nothing is written.
        stage = stage_config("instruct")
        stage.model.lm.tie_word_embeddings = not untied
        model, tokenizer = build_mmllm(stage)
    set_trainable(model, ["projector", "lm"], LoRAConfig())
    processor = ImageProcessor.for_model(model.config)
    world = World("train", image_size=processor.size, num_objects=objects)

    def document(index: int):
        scene = world[index]
        images = [processor(scene.image())] if scene_as == "image" else []
        return conversation_document(tokenizer, one_question_chat(scene, qtype, scene_as), images,
                                     model.config.image_token_id, model.image_tokens)

    def val_accuracy():
        return accuracy(model, tokenizer, processor, qtype, objects, eval_scenes) if scene_as == "image" else None

    before = val_accuracy()
    batches = ShuffledBatches(50_000, docs, lambda idx: pack_documents([document(int(i)) for i in idx], 256,
                                                                      truncate=True))
    config = TrainConfig(steps=steps, lr=lr, warmup_steps=max(1, steps // 20) if warmup is None else warmup,
                         weight_decay=0.01)
    model.train()
    result = train(model, batches, sequence_loss, config,
                   tokens_in_batch=lambda batch: batch.num_tokens)
    return {"losses": result.losses, "before": before, "after": val_accuracy()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qtype", required=True, choices=QTYPES)
    parser.add_argument("--init", help="a polymodal MM-LLM checkpoint (default: the quickstart model, fresh)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--docs", type=int, default=80, help="one-question chats per step")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, help="linear warm-up steps (default: steps // 20)")
    parser.add_argument("--untied", action="store_true", help="fresh model: separate input and output word embeddings")
    parser.add_argument("--objects", type=int, nargs=2, default=(1, 3), metavar=("MIN", "MAX"))
    parser.add_argument("--scene-as", choices=SCENE_FORMS, default="image", help="the scene as the image or as text")
    parser.add_argument("--templates", action="store_true", help="no training: --init's accuracy per question template")
    args = parser.parse_args()
    if args.templates:
        if not args.init:
            parser.error("--templates needs --init CHECKPOINT")
        model, tokenizer = load(args.init)
        rows = accuracy_by_template(model, tokenizer, ImageProcessor.for_model(model.config), args.qtype,
                                    tuple(args.objects))
        for template, n, acc, truth, answers in rows:
            print(f"{n:5d} {100 * acc:5.1f}%  {template:<45} truth {truth}  model {answers}")
        return
    r = probe_qtype(args.qtype, args.init, args.steps, args.docs, args.lr, tuple(args.objects), scene_as=args.scene_as,
                    warmup=args.warmup, untied=args.untied)
    losses = r["losses"]
    tenth = max(1, len(losses) // 10)
    curve = [sum(losses[i:i + tenth]) / len(losses[i:i + tenth]) for i in range(0, len(losses), tenth)]
    print(f"{args.qtype}: answer loss per tenth of the run: {', '.join(f'{v:.3f}' for v in curve)}")
    print(f"  (a constant balanced yes/no answer scores ln 2 / 2 = {math.log(2) / 2:.3f})")
    if r["before"] is not None:  # None with a text scene
        for when in ("before", "after"):
            print(f"val exact match {when:<6} {100 * r[when][0]:.1f}% {r[when][1]}")


if __name__ == "__main__":
    main()
