"""`polymodal quickstart`: train a small multimodal LM from scratch on the CPU, in minutes.

It generates shapes-world scenes and trains a LLaVA-layout model (conv encoder -> MLP projector ->
decoder LM, all from scratch, world tokenizer) in two stages: "align" on image captions, then
"instruct" on visual chats of one question each with the loss on the answers only, every step
packing whole chats padding-free. It then answers every question of held-out scenes (val) and
of scenes with held-out color+shape pairs (compositional), prints the exact-match table and a
few conversations, and saves a loss plot, a grid of images with the model's answers and a
checkpoint that `polymodal chat` and `polymodal eval` load.

Nothing is pretrained here, so stage 1 trains the LM along with the projector (in the
`configs/mmllm/smollm2_*` recipes, with a pretrained LM, it trains the projector only, as LLaVA
does); the vision tower, one random convolution pooled per grid cell, stays frozen in both stages.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from polymodal.backbones.decoder import DecoderConfig
from polymodal.encoders.gridpool import GridPoolConfig
from polymodal.eval.mmllm import answer_questions
from polymodal.models.mmllm import MMLLMConfig
from polymodal.projectors import ProjectorConfig
from polymodal.recipes.mmllm import (
    MMLLMDataConfig,
    MMLLMRecipeConfig,
    build_mmllm,
    make_batches,
    set_trainable,
    train_mmllm,
)
from polymodal.train.loop import TrainConfig

IMAGE_SIZE = 96
# The question types that compare the question's words with the image, rather than read one cell.
COMPARISON_QTYPES = ("existence", "count", "position", "relation")
ALIGN_SHARE = 0.35  # of the training budget: ~2,200 align steps here (a run at 0.3, ~1,700, stayed on the comparison plateau)
EVAL_SHARE = 0.05  # of the total budget, kept for evaluation and the demo outputs (~15 s) and step-time estimates that run short
# Table columns: (world split, objects per scene). "single" holds the val scenes' one-object
# counterparts, where the color and shape targets are read; compositional scenes use the 6
# color+shape pairs never seen in training.
EVAL_COLUMNS = {"val": ("val", (1, 3)), "single": ("val", (1, 1)), "compositional": ("compositional", (1, 3))}


def quickstart_model() -> MMLLMConfig:
    """The quickstart's model: a 96 px grid-pooled conv tower + a 2-layer MLP projector + a 3-layer LM (~0.7M parameters).

    The tower (`polymodal.encoders.gridpool`) pools one convolution's rectified responses over
    each of the world's 3 x 3 grid cells, so an image costs only 9 LM tokens and "the object in
    the top left" is one token: the model learns to look up a cell instead of assembling objects
    from fragments, which is what makes minutes enough. It stays frozen at its random
    initialisation (see `stage_config`); its per-cell max makes an object's outline readable
    wherever in the cell the object sits, and the projector's MLP maps that into the LM.
    Measured on this task: from-scratch ViT layers collapsed every patch onto one huge shared
    vector, a trained patch projection was pulled towards color by the LM's gradients until shape
    was unreadable, and a frozen random patch projection (the previous tower) tied shape to the
    object's offset in its cell, so one-object shape stayed at 81-88% (benchmarks/RESULTS.md).
    Chat text dominates the sequence (about 20 template and question tokens per one-word
    answer), so the LM's cost per token sets the pace: it is kept narrow. It has 8 heads of 16
    (4 key/value heads), with the same weights as 4 heads of 32, for two kinds of lookup side by
    side, by place ("the object in the top left") and by content ("is there a red circle?").
    Measured with the located descriptions of `stage_config`: with 4 heads, one of two runs lost
    the lookups by place and stayed at chance on existence (70.1% over all types); with 8 heads,
    four of four runs passed every target (78.6-82.4%, existence 67-90%; benchmarks/RESULTS.md).
    """
    tower = GridPoolConfig(image_size=IMAGE_SIZE, filters=64, kernel_size=5, stride=2, grid=3)
    lm = DecoderConfig(hidden_size=128, intermediate_size=384, num_layers=3, num_heads=8, num_kv_heads=4,
                       max_position_embeddings=512, tie_word_embeddings=True)
    # One LM token per cell, each passed through its own nonlinear map.
    projector = ProjectorConfig(kind="mlp")
    return MMLLMConfig(vision_tower="gridpool", gridpool=tower, lm=lm, projector=projector, vision_feature_layer=-1)


def stage_config(stage: str, out: Path, seed: int, steps: int = 1, init_from: str | None = None) -> MMLLMRecipeConfig:
    """The recipe config of one quickstart stage (steps are set from the time budget)."""
    # Align on "grounded" captions (place first, then the object): the words before each object
    # name its grid cell, so the LM reads the object off that cell's token from the first steps.
    # Half of them are "located" (the object, then its place): finding the cell that holds an
    # object described by earlier words is what the comparison questions need, and measured, an
    # LM aligned on grounded captions alone rarely learnt them in the instruct stage (RESULTS.md).
    # max_tokens holds a whole step's chats in one packed row: CPU attention runs per document,
    # so a longer row costs nothing, while rows of 256 left ~30% of the slots as padding.
    # Instruct chats ask one question each, or (a quarter of them) for a description.
    # Measured from the same align checkpoint: with one question per chat the instruct stage
    # learnt the comparison questions (val all 85.8%), with six-turn chats it did not (72.6%);
    # the answer has to be found from the latest question alone, and a clean context is where
    # that lookup is learnt (RESULTS.md). 56 one-question chats cost about what 16 six-turn chats did.
    # The comparison types are asked twice as often as the lookups, which the model learns fast
    # anyway: from a plateau run's align checkpoint this left the plateau (78.1%) where the
    # uniform mix did not (71.2%).
    # The descriptions are located captions: the instruct stage's questions ask for lookups by
    # place, and without located descriptions the align stage's lookup by content (name an
    # object, find its cell), which the comparison questions build on, decayed (located-caption
    # shape words 98% -> 62%) and existence stayed at chance; with them it is kept (99%).
    data = MMLLMDataConfig(num_scenes=50000, turns=1, describe=0.25, describe_styles=["located"],
                           docs_per_batch=32 if stage == "align" else 56,
                           max_tokens=4096, caption_styles=["grounded", "located"],
                           question_weights={qtype: 2 for qtype in COMPARISON_QTYPES})
    # Measured: at 2e-3 / 3e-3 the projector's outputs grew to norms of ~250 (the LM then ignored
    # colors a linear probe reads at 98%); at these rates they stay near 14 and get used.
    train = TrainConfig(steps=steps, lr=7.5e-4 if stage == "align" else 5e-4, warmup_steps=max(1, steps // 20),
                        weight_decay=0.01, out_dir=str(out / stage), ckpt_every=0, keep_checkpoints=1, seed=seed,
                        log_every=5)
    return MMLLMRecipeConfig(stage=stage, init_from=init_from, model=quickstart_model(), data=data,
                             trainable=["projector", "lm"], train=train)


def _clear_previous_run(out: Path, overwrite: bool) -> None:
    """Refuse (or, with `overwrite`, delete) an earlier quickstart run's stage folders under `out`."""
    import shutil

    previous = [out / stage for stage in ("align", "instruct") if (out / stage).exists()]
    if previous and not overwrite:
        raise ValueError(f"{out} already holds a quickstart run ({', '.join(str(p) for p in previous)}); "
                         "pass --overwrite to replace it, or choose another --out")
    for folder in previous:
        shutil.rmtree(folder)


def _seconds_per_step(config: MMLLMRecipeConfig, model, tokenizer) -> float:
    """Seconds of one training step on real batches of the stage: the median of eight timed steps
    after three warm-ups (batches of one-question chats vary in length, so fewer steps mislead;
    measured with one warm-up, the instruct stage's estimate ran 13% long, 0.14 s against 0.124 s)."""
    set_trainable(model, config.trainable, config.lora)
    batches = make_batches(config, model, tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    times = []
    for _ in range(3 + 8):
        start = time.perf_counter()
        model(packed=next(batches), loss_only=True).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:])


def quickstart(minutes: float = 9.5, out: str | Path = "runs/quickstart", seed: int = 0, eval_scenes: int = 100,
               overwrite: bool = False) -> dict:
    """Run the whole quickstart in about `minutes` (training and evaluation).

    A folder that already holds a quickstart run is an error unless `overwrite` (its stage
    folders are then deleted first): the step counts follow the time budget, so continuing an
    earlier run's checkpoints would mix two schedules.

    Returns the figures of `polymodal.eval.mmllm.evaluate_world` on `eval_scenes` scenes per
    column of EVAL_COLUMNS: {"val/<qtype>": VQA exact match, "val/all", "val/bleu4", "val/cider",
    the same under "single/..." and "compositional/...", and the val figures again without
    prefix ("color", "all", ...)}."""
    from polymodal.data.conversation import ImageProcessor
    from polymodal.data.world import World
    from polymodal.eval.mmllm import evaluate_world

    out = Path(out)
    _clear_previous_run(out, overwrite)
    started = time.perf_counter()
    torch.manual_seed(seed)
    print(f"polymodal quickstart: a multimodal LM from scratch in ~{minutes:.1f} min on {torch.get_num_threads()} "
          f"CPU threads, writing to {out}/")
    # Each stage's step count is fitted to the time left just before it runs, so a shared
    # machine whose load changes mid-run still ends near the budget.
    deadline = started + minutes * 60 * (1 - EVAL_SHARE)
    align = stage_config("align", out, seed)
    model, tokenizer = build_mmllm(align)
    per_step = _seconds_per_step(align, model, tokenizer)  # lr 0: the weights do not move
    steps = max(5, int((deadline - time.perf_counter()) * ALIGN_SHARE / per_step))
    print(f"\n[1/3] stage 1, align: image -> caption ({steps} steps of ~{per_step:.2f}s)")
    model, tokenizer, first, align_final = train_mmllm(stage_config("align", out, seed, steps), model, tokenizer)

    instruct = stage_config("instruct", out, seed, init_from=str(align_final))
    per_step = _seconds_per_step(instruct, model, tokenizer)
    instruct.train = stage_config("instruct", out, seed, max(5, int((deadline - time.perf_counter()) / per_step))).train
    print(f"\n[2/3] stage 2, instruct: visual chats of one question each, loss on the answers "
          f"({instruct.train.steps} steps of ~{per_step:.2f}s)")
    model, tokenizer, second, final = train_mmllm(instruct, model, tokenizer)
    losses = first.losses + second.losses
    _loss_plot(first.losses, second.losses, out / "loss.png")

    print("\n[3/3] evaluating: every question of held-out scenes, and a description of each")
    processor = ImageProcessor.for_model(model.config)
    table = {}
    for column, (split, objects) in EVAL_COLUMNS.items():
        metrics = evaluate_world(model, tokenizer, split, num_scenes=eval_scenes, processor=processor,
                                 num_objects=objects)
        table.update({f"{column}/{key.removeprefix('vqa_')}": value for key, value in metrics.items()})
    table.update({k.split("/", 1)[1]: v for k, v in table.items() if k.startswith("val/")})
    _print_table(table)
    _print_examples(model, tokenizer, processor, World("val", image_size=IMAGE_SIZE, num_objects=(1, 3)))
    grid = _answer_grid(model, tokenizer, processor, World("val", image_size=IMAGE_SIZE, num_objects=(1, 3)),
                        out / "examples.png")
    elapsed = time.perf_counter() - started
    print(f"\ndone in {elapsed / 60:.1f} min; final loss {losses[-1]:.3f}")
    print(f"loss plot:        {out / 'loss.png'}\nexample answers:  {grid}\ncheckpoint:       {final}")
    print("\nnext:")
    print(f"  polymodal chat {final} --image my_picture.png      # talk about an image")
    print(f"  polymodal eval {final} --split compositional      # the full evaluation")
    print("  polymodal train configs/mmllm/world_align.yaml    # the longer two-stage recipe")
    return table


def _loss_plot(align: list[float], instruct: list[float], path: Path) -> None:
    from polymodal.plots import save_loss_plot

    steps = list(range(1, len(align) + len(instruct) + 1))
    save_loss_plot(steps, align + instruct, path, title=f"quickstart loss (align: steps 1-{len(align)}, then instruct)")


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
