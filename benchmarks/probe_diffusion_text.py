"""Probe: how much a text-to-image flow model uses its caption at each noise level.

For n one-object val scenes, noise each image to time t (x_t = (1 - t) x0 + t noise) and measure
the velocity MSE of the model given the scene's own caption, the empty caption, and another
scene's caption. Where the own caption does not beat the empty one, the model decides the
image without reading the text; sampling passes through those times first, so the layout is
then left to the noise. With --grid, also saves the x0 predictions (x_t - t v) of four scenes.

    python benchmarks/probe_diffusion_text.py runs/diffusion-world-t2i/final [--n 256] [--grid x0.png]
"""
from __future__ import annotations

import argparse

import torch

from polymodal.api import load
from polymodal.data.dual_encoder import scene_pixels
from polymodal.data.world import World
from polymodal.data.world.text import captions_of
from polymodal.infer.images import prompt_tokens, to_pil

TIMES = (0.3, 0.5, 0.7, 0.9, 0.97)


def main(argv: list[str] | None = None) -> dict:
    """Print (and return) {t: {caption kind: velocity MSE}}."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--style", default="located")
    parser.add_argument("--grid", default=None, help="save x0 predictions of four scenes to this PNG")
    args = parser.parse_args(argv)
    loaded = load(args.checkpoint)
    model, tokenizer = loaded.model, loaded.tokenizer
    if model.config.process.kind != "flow" or model.config.conditioning != "text":
        raise SystemExit("the probe reads text-conditioned flow models")
    size, length = model.config.sample_size, model.config.text.max_positions
    scenes = list(World("val", image_size=size, num_objects=(1, 1)).scenes(args.n))
    x0 = scene_pixels(scenes)
    captions = [captions_of(s, [args.style])[0] for s in scenes]
    kinds = {"own": captions, "empty": [""] * len(captions), "other": captions[1:] + captions[:1]}
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    results, grid = {}, [to_pil(x0[:4])]
    with torch.no_grad():
        conds = {kind: model.encode_text(*prompt_tokens(tokenizer, texts, length)) for kind, texts in kinds.items()}
        for t in TIMES:
            x_t = (1 - t) * x0 + t * noise
            time = torch.full((len(x0),), float(model.process.model_time(t)))
            results[t] = {}
            for kind, cond in conds.items():
                velocity = model.predict(x_t, time, **cond)
                results[t][kind] = float(((velocity - (noise - x0)) ** 2).mean())
                if kind == "own":
                    grid.append(to_pil((x_t - t * velocity)[:4]))
            row = results[t]
            print(f"t={t:<5} velocity MSE  own caption {row['own']:.4f}  empty {row['empty']:.4f}  "
                  f"another scene's {row['other']:.4f}  (own / empty {row['own'] / row['empty']:.3f})")
    if args.grid:
        from polymodal.eval.grids import labelled_grid

        labels = [["truth"]] * 4 + [[f"x0 from t={t}"] for t in TIMES for _ in range(4)]
        labelled_grid([image for row in grid for image in row], labels, args.grid, tile=96)
    return results


if __name__ == "__main__":
    main()
