"""Shapes-world throughput and scorer accuracy, on one core.

    python benchmarks/bench_world.py [--quick] [--json out.json]

Sections:
1. generate: scenes/s for sampling + rendering alone, and for sampling + rendering + all text
   (every caption, every QA pair, a 3-turn conversation), at 32, 64 and 128 px; mixed
   backgrounds, 1-3 objects (the default world).
2. score: `score_image` on rendered ground truth, images/s and the all_correct rate per image
   size (32-128 px, mixed backgrounds, 1-9 objects), upright and with rotations up to 30 degrees.
3. degrade: all_correct under additive gaussian noise and gaussian blur (64 px, 1-5 objects).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import numpy as np
from common import machine_info
from PIL import Image, ImageFilter

from polymodal.data.world import World, score_image


@dataclass
class BenchSizes:
    """How many scenes each section uses."""

    generate: int = 2000
    score: int = 300
    degrade: int = 150


QUICK = BenchSizes(generate=200, score=40, degrade=30)
IMAGE_SIZES = (32, 64, 128)
SCORE_SIZES = (32, 48, 64, 96, 128)
NOISE_STDS = (0, 10, 20, 30, 40, 50, 60, 80)
BLUR_RADII = (0.0, 0.5, 0.8, 1.0, 1.5, 2.0)


def _rate(n: int, fn) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def bench_generate(n: int) -> dict:
    """Scenes per second, render only and render + text, per image size."""
    out = {}
    for size in IMAGE_SIZES:
        world = World("train", image_size=size, background="mixed")
        world[0].render()  # warm the raster cache, as any long run would be

        def render_only(world=world):
            for scene in world.scenes(n):
                scene.render()

        def render_and_text(world=world):
            for scene in world.scenes(n, start=n):
                scene.render()
                scene.captions()
                scene.questions()
                scene.conversation(3)

        out[size] = {"render_per_s": _rate(n, render_only), "render_text_per_s": _rate(n, render_and_text)}
    return out


def bench_score(n: int, max_rotation: float = 0.0) -> dict:
    """Scorer images/s and all_correct rate on ground truth, per image size and overall."""
    out, correct, total = {}, 0, 0
    for size in SCORE_SIZES:
        world = World("test", image_size=size, num_objects=(1, 9), background="mixed", max_rotation=max_rotation)
        scenes = list(world.scenes(n))
        images = [scene.render() for scene in scenes]
        start = time.perf_counter()
        ok = [score_image(image, scene)["all_correct"] for scene, image in zip(scenes, images)]
        seconds = time.perf_counter() - start
        out[size] = {"images_per_s": n / seconds, "all_correct": float(np.mean(ok))}
        correct, total = correct + sum(ok), total + n
    out["overall"] = {"all_correct": correct / total, "scenes": total}
    return out


def bench_degrade(n: int) -> dict:
    """all_correct under gaussian noise (std in gray levels) and gaussian blur (radius in px)."""
    world = World("test", image_size=64, num_objects=(1, 5), background="mixed")
    scenes = list(world.scenes(n))
    images = [scene.render() for scene in scenes]
    rng = np.random.default_rng(0)

    def accuracy(transform) -> float:
        return float(np.mean([score_image(transform(im), s)["all_correct"] for s, im in zip(scenes, images)]))

    noise = {
        std: accuracy(lambda im, std=std: np.clip(im + rng.normal(0, std, im.shape), 0, 255).astype(np.uint8))
        for std in NOISE_STDS
    }
    blur = {
        r: accuracy(lambda im, r=r: np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(r))))
        for r in BLUR_RADII
    }
    return {"noise_std": noise, "blur_radius": blur}


def format_report(results: dict) -> str:
    """A plain-text table of the results."""
    lines = ["generate (scenes/s, one core)", "  size   render   render+text"]
    for size, r in results["generate"].items():
        lines.append(f"  {size:>4}   {r['render_per_s']:>6.0f}   {r['render_text_per_s']:>11.0f}")
    for key, title in (("score", "score, upright"), ("score_rotated", "score, rotations <= 30 deg")):
        lines += [f"{title} (ground truth)", "  size   images/s   all_correct"]
        for size, r in results[key].items():
            if size != "overall":
                lines.append(f"  {size:>4}   {r['images_per_s']:>8.0f}   {r['all_correct']:>11.4f}")
        overall = results[key]["overall"]
        lines.append(f"  all    {overall['scenes']:>5} scenes   {overall['all_correct']:.4f}")
    for key, unit in (("noise_std", "noise std"), ("blur_radius", "blur radius")):
        curve = results["degrade"][key]
        lines.append(f"degrade by {unit}: " + "  ".join(f"{k}: {v:.3f}" for k, v in curve.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run every section, print the table, optionally write JSON; returns the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small workloads (a smoke run)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else BenchSizes()
    results = {
        "machine": machine_info("cpu"),
        "generate": bench_generate(sizes.generate),
        "score": bench_score(sizes.score),
        "score_rotated": bench_score(max(sizes.score // 3, 1), max_rotation=30.0),
        "degrade": bench_degrade(sizes.degrade),
    }
    print(format_report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
