"""The `unified` family's evaluation: understanding and generation of one checkpoint in one table.

    understanding/<split>/vqa_*      exact-match VQA per question type (`polymodal.eval.mmllm`), on
                                     scenes of the evaluated split and of the compositional split
    understanding/<split>/bleu4, cider   captions of the evaluated split's scenes
    generation/<column>/<metric>     text -> image scored by the world's exact scorer
                                     (`polymodal.eval.generation`: single, two, compositional)
    tokenizer/psnr, ssim, codebook_usage   the image tokenizer's reconstructions (`polymodal.eval.image_tokenizer`)

Scenes hold one or two objects, as the `unified` world recipe trains on.
"""
from __future__ import annotations

from polymodal.errors import UsageError

NUM_OBJECTS = (1, 2)


def evaluate_unified(model, tokenizer, split: str = "val", n: int = 50, guidance: float | None = None,
                     progress: bool = True) -> dict[str, float]:
    """{metric: value} of the module docstring for n scenes / prompts per column."""
    from polymodal.eval.generation import evaluate_generation
    from polymodal.eval.image_tokenizer import evaluate as evaluate_tokenizer
    from polymodal.eval.mmllm import evaluate_world

    if tokenizer is None:
        raise UsageError("the unified evaluation needs the checkpoint's text tokenizer, and this checkpoint has none")
    model.eval()
    metrics: dict[str, float] = {}
    for column_split in dict.fromkeys([split, "compositional"]):
        scores = evaluate_world(model, tokenizer, split=column_split, num_scenes=n, num_objects=NUM_OBJECTS,
                                progress=progress)
        metrics.update({f"understanding/{column_split}/{k}": v for k, v in scores.items()})
    if model.image_tokenizer.config.has_decoder:
        scores = evaluate_generation(model, tokenizer, split=split, n=n, guidance=guidance, progress=progress)
        metrics.update({f"generation/{k}": v for k, v in scores.items()})
        scores = evaluate_tokenizer(model.image_tokenizer, None, split=split, n=n, progress=progress)
        metrics.update({f"tokenizer/{k}": v for k, v in scores.items()})
    return metrics


def evaluate(model, tokenizer, data: str = "world", split: str = "val", n: int = 50,
             progress: bool = True) -> dict[str, float]:
    """`polymodal eval` on a unified checkpoint: `evaluate_unified` on the world."""
    if data != "world":
        raise UsageError(f"--data: the unified family is evaluated on 'world' only, got {data!r}")
    return evaluate_unified(model, tokenizer, split=split, n=n, progress=progress)
