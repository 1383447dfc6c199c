"""Exact evaluation of image generators on the shapes world (GenEval's categories, scored exactly).

Prompts come from held-out scenes: a class-conditional model gets the scene's "color shape"
class, a text model one caption of the scene (default style "located": size, color, shape and
grid cell of every object). Each generated image is parsed by the world's exact scorer and
compared with the scene the prompt describes:

    presence       an object of the prompted color and shape is there (anywhere)
    color / shape / size / position   the matched object has the prompted attribute
    count          the image holds exactly the prompted number of objects
    all_correct    every attribute the prompt names, and the count, are right: color + shape for
                   a class prompt; color, shape, size and position for a located caption
    color_shape_position   the same without size (the issue's single-object target)
    wfd            with `wfd=True`: the world-feature Fréchet distance between the generated
                   images and the renders of the prompted scenes (`polymodal.eval.world_features`;
                   not FID: the features come from a small world attribute classifier)

Columns: "single" (one-object scenes), "two" (two objects, whose positions fix their relation:
left/right/above/below), both from the evaluated split, and "compositional" (one-object scenes
of held-out color + shape pairs). `polymodal eval CHECKPOINT` runs `evaluate`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from polymodal.data.world.text import captions_of
from polymodal.errors import UsageError

COLUMNS = {"single": (1, 1), "two": (2, 2)}
DEFAULT_STYLE = "located"


def world_prompts(model_config, split: str, num_objects: Sequence[int], n: int, style: str = DEFAULT_STYLE):
    """[(prompt, scene)] for the first `n` scenes of a world split rendered at any size: the
    prompt is the class name (class conditioning), the first caption of `style` (text), or ""."""
    from polymodal.data.world import World

    world = World(split, image_size=32, num_objects=tuple(num_objects))
    out = []
    for scene in world.scenes(n):
        if model_config.conditioning == "class":
            obj = scene.objects[0]
            prompt = f"{obj.color} {obj.shape}"
        elif model_config.conditioning == "text":
            prompt = captions_of(scene, [style])[0]
        else:
            prompt = ""
        out.append((prompt, scene))
    return out


def score_generated(image, scene, conditioning: str) -> dict[str, float]:
    """The flags of one generated image against the scene its prompt describes (see the module
    docstring), each 0.0 or 1.0 (presence and the attributes averaged over the scene's objects)."""
    from polymodal.data.world.scorer import score_image

    result = score_image(np.asarray(image.convert("RGB")), scene)
    objects = result["objects"]
    color_shape = all(o["present"] for o in objects)
    position = all(o["color"] and o["shape"] and o["position"] for o in objects)
    count = result["count_correct"]
    return {
        "presence": result["presence"],
        **{key: result[key] for key in ("color", "shape", "size", "position")},
        "count": float(count),
        "all_correct": float(count and (color_shape if conditioning == "class" else result["all_correct"])),
        "color_shape_position": float(count and position),
    }


def evaluate_generation(model, tokenizer, *, split: str = "val", n: int = 50, guidance: float | None = None,
                        steps: int | None = None, sampler: str | None = None, style: str = DEFAULT_STYLE,
                        seed: int = 0, wfd: bool = True, progress: bool = True) -> dict[str, float]:
    """{"<column>/<metric>": mean over n prompts} for the columns of the module docstring
    (a class model: "single" and "compositional"; the compositional column only when `split`
    is not "compositional" itself)."""
    from tqdm import tqdm

    from polymodal.data.dual_encoder import scene_pixels
    from polymodal.infer.images import generate_tensors, to_pil

    columns = {"single": (split, COLUMNS["single"])}
    if model.config.conditioning != "class":
        columns["two"] = (split, COLUMNS["two"])
    if split != "compositional":
        columns["compositional"] = ("compositional", COLUMNS["single"])
    metrics: dict[str, float] = {}
    for column, (column_split, objects) in columns.items():
        pairs = world_prompts(model.config, column_split, objects, n, style)
        scores, generated = [], []
        for start in tqdm(range(0, n, 16), desc=f"generate {column}", unit="batch", disable=not progress):
            chunk = pairs[start:start + 16]
            pixels = generate_tensors(model, [p for p, _ in chunk], tokenizer, guidance=guidance, steps=steps,
                                      sampler=sampler, seed=seed + start)
            generated.append(pixels)
            scores += [score_generated(image, scene, model.config.conditioning)
                       for image, (_, scene) in zip(to_pil(pixels), chunk)]
        for key in scores[0]:
            metrics[f"{column}/{key}"] = float(np.mean([s[key] for s in scores]))
        if wfd and n >= 2:  # a covariance needs two images
            from polymodal.eval.world_features import world_frechet_distance

            fake = torch.cat(generated)
            real = scene_pixels([scene for _, scene in pairs], fake.shape[-1])
            metrics[f"{column}/wfd"] = world_frechet_distance(fake, real)
    return metrics


def evaluate(model, tokenizer, data: str = "world", split: str = "val", n: int = 50,
             progress: bool = True) -> dict[str, float]:
    """The `polymodal eval` suite of the generator families: `evaluate_generation` on the world."""
    if data != "world":
        raise UsageError(f"--data: generators are evaluated on 'world' only, got {data!r}")
    return evaluate_generation(model, tokenizer, split=split, n=n, progress=progress)
