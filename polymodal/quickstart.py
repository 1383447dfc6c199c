"""`polymodal quickstart`: a small multimodal LM from scratch, trained, evaluated and demoed on the CPU.

The quickstart runs the two stages of `configs/quickstart/` with the `mmllm` recipe — "align" on
image captions, then "instruct" on visual chats of one question each with the loss on the
answers only — a frozen random grid-pooled conv tower, an MLP projector and a 3-layer LM trained
from scratch on the world's tokenizer. It then answers every question of held-out scenes (val),
of their one-object counterparts and of scenes with held-out color+shape pairs
(compositional), prints the exact-match table and a few conversations, and saves a loss plot, a
grid of images with the model's answers and a checkpoint that `polymodal chat` and
`polymodal eval` load. Step counts are fixed in the YAML and every RNG is seeded, so the same
command gives the same figures on any machine; a progress bar tells the time left.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from polymodal.config import load_config
from polymodal.errors import ConfigError
from polymodal.eval.mmllm import answer_questions
from polymodal.outputs import claim_folder
from polymodal.models.registry import get_recipe
from polymodal.recipes.mmllm import MMLLMRecipeConfig
from polymodal.recipes.runner import run_training

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "quickstart"
STAGES = ("align", "instruct")
# Table columns: (world split, objects per scene). "single" holds the val scenes' one-object
# counterparts, where the color and shape targets are read; compositional scenes use the 6
# color+shape pairs never seen in training.
EVAL_COLUMNS = {"val": ("val", (1, 3)), "single": ("val", (1, 1)), "compositional": ("compositional", (1, 3))}


def stage_config(stage: str, out: str | Path | None = None, overrides: Sequence[str] = ()) -> MMLLMRecipeConfig:
    """The recipe config of one quickstart stage, read from `configs/quickstart/<stage>.yaml`;
    with `out`, the stage writes to `out/<stage>` (and instruct continues from `out/align/final`)."""
    path = CONFIGS / f"{stage}.yaml"
    if not path.is_file():
        raise ConfigError(f"the quickstart reads {path}, which is missing: run it from a source checkout of "
                          "polymodal (pip install -e .)")
    placed = []
    if out is not None:
        placed.append(f"train.out_dir={Path(out) / stage}")
        if stage == "instruct":
            placed.append(f"init_from={Path(out) / 'align' / 'final'}")
    return load_config(MMLLMRecipeConfig, path, [*placed, *overrides])


def quickstart(out: str | Path = "runs/quickstart", eval_scenes: int = 100, overwrite: bool = False,
               overrides: Sequence[str] = ()) -> dict:
    """Run the whole quickstart; `overrides` (key=value) apply to both stages (e.g. train.steps=5).

    A folder that already holds a quickstart run is an error unless `overwrite`, which removes
    only that run's files. Returns the figures of `polymodal.eval.mmllm.evaluate_world` on
    `eval_scenes` scenes per column of EVAL_COLUMNS: {"val/<qtype>": VQA exact match, "val/all",
    "val/bleu4", "val/cider", the same under "single/..." and "compositional/...", and the val
    figures again without prefix ("color", "all", ...)}."""
    from polymodal.data.conversation import ImageProcessor
    from polymodal.data.world import World
    from polymodal.eval.mmllm import evaluate_world

    out = Path(out)
    configs = [stage_config(stage, out, overrides) for stage in STAGES]  # validated before anything runs
    manifest = claim_folder(out, "quickstart", overwrite)
    for name in (*STAGES, "loss.png", "examples.png"):
        manifest.claim(name)
    manifest.save()
    started = time.perf_counter()
    steps = " + ".join(str(c.train.steps) for c in configs)
    print(f"polymodal quickstart: a multimodal LM from scratch ({steps} steps) on {torch.get_num_threads()} CPU "
          f"threads, writing to {out}/")
    print("\n[1/3] stage 1, align: image -> caption")
    recipe = get_recipe("mmllm")[1]
    first = run_training(configs[0], recipe)
    print("\n[2/3] stage 2, instruct: visual chats of one question each, loss on the answers")
    second = run_training(configs[1], recipe)
    model, tokenizer, final = second.model, second.tokenizer, second.final
    _loss_plot(first.result.losses, second.result.losses, out / "loss.png")

    print("\n[3/3] evaluating: every question of held-out scenes, and a description of each")
    processor = ImageProcessor.for_model(model.config)
    table = {}
    for column, (split, objects) in EVAL_COLUMNS.items():
        metrics = evaluate_world(model, tokenizer, split, num_scenes=eval_scenes, processor=processor,
                                 num_objects=objects)
        table.update({f"{column}/{key.removeprefix('vqa_')}": value for key, value in metrics.items()})
    table.update({k.split("/", 1)[1]: v for k, v in table.items() if k.startswith("val/")})
    _print_table(table)
    size = model.config.image_size
    _print_examples(model, tokenizer, processor, World("val", image_size=size, num_objects=(1, 3)))
    grid = _answer_grid(model, tokenizer, processor, World("val", image_size=size, num_objects=(1, 3)),
                        out / "examples.png")
    elapsed = time.perf_counter() - started
    print(f"\ndone in {elapsed / 60:.1f} min; final loss {second.result.losses[-1]:.3f}")
    print(f"loss plot:        {out / 'loss.png'}\nexample answers:  {grid}\ncheckpoint:       {final}")
    print("\nnext:")
    print(f"  polymodal chat {final} --image my_picture.png \"What color is the star?\"")
    print(f"  polymodal eval {final} --split compositional")
    print("  polymodal train configs/mmllm/world_align.yaml train.out_dir=runs/world/align   # the longer recipe")
    return table


def _loss_plot(align: list[float], instruct: list[float], path: Path) -> None:
    from polymodal.plots import save_loss_plot

    steps = list(range(1, len(align) + len(instruct) + 1))
    save_loss_plot(steps, align + instruct, path, title="quickstart loss", stages={"align": 1, "instruct": len(align) + 1})


def _print_table(table: dict[str, float]) -> None:
    from polymodal.data.world import QTYPES

    print("\n  VQA exact match   val (1-3 objects)   single object   compositional")
    for qtype in (*QTYPES, "all"):
        if f"val/{qtype}" in table:
            cells = [f"{100 * table[f'{c}/{qtype}']:6.1f}%" if f"{c}/{qtype}" in table else "      -" for c in EVAL_COLUMNS]
            print(f"  {qtype:<16} {cells[0]:>19} {cells[1]:>15} {cells[2]:>15}")
    for key, name, scale in (("bleu4", "caption BLEU-4", 100), ("cider", "caption CIDEr", 1)):
        cells = [f"{scale * table[f'{c}/{key}']:6.2f}" for c in EVAL_COLUMNS]
        print(f"  {name:<16} {cells[0]:>19} {cells[1]:>15} {cells[2]:>15}")


def _print_examples(model, tokenizer, processor, world, n: int = 3) -> None:
    print("\nexample conversations (val scenes):")
    for scene in world.scenes(n, start=10):
        qas = scene.questions()[:: max(1, len(scene.questions()) // 3)][:3]
        answers = answer_questions(model, tokenizer, processor, [(scene.image(), qa.question) for qa in qas])
        print(f"  scene: {scene.caption('detailed')}")
        for qa, answer in zip(qas, answers):
            mark = "ok" if answer == qa.answer else f"expected {qa.answer!r}"
            print(f"    user: {qa.question}\n    model: {answer}   ({mark})")


def _answer_grid(model, tokenizer, processor, world, path: Path, n: int = 12) -> Path:
    from polymodal.eval.grids import labelled_grid

    scenes = list(world.scenes(n))
    qas = [s.questions()[s.index * 7 % len(s.questions())] for s in scenes]
    answers = answer_questions(model, tokenizer, processor, [(s.image(), qa.question) for s, qa in zip(scenes, qas)])
    labels = [[qa.question, f"model: {a}  (truth: {qa.answer})"] for qa, a in zip(qas, answers)]
    return labelled_grid([s.image(128) for s in scenes], labels, path, [a == qa.answer for qa, a in zip(qas, answers)])
