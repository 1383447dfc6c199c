"""`polymodal generate CHECKPOINT PROMPT [PROMPT ...] --out IMAGE.png`: images from a generator.

n images per prompt. One image goes to --out itself; several go to OUT-0.png, OUT-1.png, ...
(prompt-major), or with --grid to one PNG of all of them, each labelled with its prompt. An
existing file is never replaced without --overwrite. A tqdm bar runs over the denoising steps.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from polymodal.errors import DestinationExistsError, UsageError


def _at_least(low: float, convert):
    def parse(text: str):
        value = convert(text)  # a ValueError here becomes argparse's "invalid int value: 'x'"
        if not value >= low or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite number >= {low}, got {text!r}")
        return value

    parse.__name__ = convert.__name__  # argparse names the type in its "invalid ... value" message
    return parse


def add_cli(subparsers) -> None:
    """Register `polymodal generate` on an argparse subparsers object."""
    from polymodal.generators.diffusion.samplers import SAMPLERS

    p = subparsers.add_parser("generate", help="generate images from a diffusion model: prompts -> PNG files",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="polymodal checkpoint of an image generator (or a diffusers folder)")
    p.add_argument("prompts", nargs="+", metavar="PROMPT",
                   help="a caption (text models) or a class name / id (class-conditional models)")
    p.add_argument("--out", required=True, metavar="IMAGE.png", help="output PNG (several: OUT-0.png, ...)")
    p.add_argument("--n", type=_at_least(1, int), default=1, help="images per prompt")
    p.add_argument("--seed", type=_at_least(0, int), default=0, help="same seed, same images")
    p.add_argument("--steps", type=_at_least(1, int), default=None, help="denoising steps (default: the model's)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=None,
                   help="ddpm/ddim for DDPM models, euler/heun for flow models (default: the model's)")
    p.add_argument("--guidance", type=_at_least(0, float), default=None,
                   help="classifier-free guidance scale; 1 = none (default: the model's)")
    p.add_argument("--size", type=_at_least(1, int), default=None,
                   help="side of what the denoiser samples (default: its training size)")
    p.add_argument("--grid", action="store_true", help="write all images into one labelled PNG at --out")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=run_generate_cli)


def output_paths(out: str | Path, count: int, grid: bool) -> list[Path]:
    """The files `generate` writes: --out for one image or a grid, else OUT-0.png ... OUT-(count-1).png."""
    out = Path(out)
    if grid or count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(count)]


def run_generate_cli(args: argparse.Namespace) -> None:
    """Load, check the outputs are free, generate, save; prints the written paths on stdout."""
    from polymodal.api import load_verbose
    from polymodal.eval.grids import labelled_grid
    from polymodal.infer.cli_common import warnings_as_lines
    from polymodal.infer.images import generate_images
    from polymodal.models.registry import require_task

    paths = output_paths(args.out, len(args.prompts) * args.n, args.grid)
    taken = [str(p) for p in paths if p.exists()]
    if taken and not args.overwrite:
        raise DestinationExistsError(f"{', '.join(taken)} already exist(s); pass --overwrite to replace")
    if not paths[0].parent.is_dir():
        raise UsageError(f"--out: folder {paths[0].parent} does not exist")
    model, tokenizer = load_verbose(args.model, stream=sys.stderr)
    require_task(model, "generate_image")
    with warnings_as_lines("generate", sys.stderr):
        images = generate_images(model, args.prompts, tokenizer, n=args.n, seed=args.seed, steps=args.steps,
                                 sampler=args.sampler, guidance=args.guidance, size=args.size, progress=True)
    if args.grid:
        labels = [[prompt] for prompt in args.prompts for _ in range(args.n)]
        labelled_grid(images, labels, paths[0], columns=min(len(images), max(args.n, 4)), tile=128)
    else:
        for image, path in zip(images, paths):
            image.save(path)
    for path in paths:
        print(path)
