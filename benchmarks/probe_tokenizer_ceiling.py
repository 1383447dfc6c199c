"""Probe: the ceiling an image tokenizer puts on any model that draws through it.

Encodes real val scenes of the shapes world, decodes the codes back to pixels and scores the
reconstructions with the exact scorer (`polymodal.eval.generation.score_generated`), beside the
originals (which score 100%). A model generating codes cannot beat its tokenizer's own
reconstructions, so a low figure here is the tokenizer's, not the language model's.

    python benchmarks/probe_tokenizer_ceiling.py runs/image-vq-world/final [--n 100]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

KEYS = ("color", "shape", "position", "count", "color_shape_position")


def main(argv: list[str] | None = None) -> dict:
    """Print and return {objects: {metric: mean}} for one- and two-object val scenes."""
    from polymodal.api import load
    from polymodal.data.dual_encoder import scene_pixels
    from polymodal.data.world import World
    from polymodal.eval.generation import score_generated
    from polymodal.infer.images import to_pil

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="an image_vq checkpoint folder")
    parser.add_argument("--n", type=int, default=100, help="val scenes per column (default 100)")
    args = parser.parse_args(argv)
    tokenizer = load(args.checkpoint).model.eval()
    size = tokenizer.config.image_size
    out = {}
    for objects in (1, 2):
        scenes = list(World("val", image_size=size, num_objects=(objects, objects)).scenes(args.n))
        with torch.no_grad():
            reconstructions = tokenizer.decode(tokenizer.encode(scene_pixels(scenes, size))).clamp(-1, 1)
        scores = [score_generated(image, scene, "text") for image, scene in zip(to_pil(reconstructions), scenes)]
        out[objects] = {key: float(np.mean([s[key] for s in scores])) for key in KEYS}
        print(f"{objects} object(s): " + ", ".join(f"{key} {value:.0%}" for key, value in out[objects].items()))
    return out


if __name__ == "__main__":
    main()
