"""The `polymodal` command line: a thin argparse layer over the public API.

Each subcommand lives with the code it drives; this file only declares arguments and dispatches,
importing heavy modules lazily so `polymodal --help` is instant.
"""
from __future__ import annotations

import argparse
import sys


def _convert(args: argparse.Namespace) -> None:
    from polymodal.api import load
    from polymodal.checkpoint import save_checkpoint
    from polymodal.interop import export_hf

    model, tokenizer = load(args.src, dtype=_dtype(args.dtype))
    if args.to == "hf":
        out = export_hf(model, args.out, tokenizer=tokenizer)
    else:
        out = save_checkpoint(model, args.out, tokenizer=tokenizer)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.to} checkpoint of {type(model).__name__} ({params / 1e6:.1f}M parameters) to {out}")


def _complete(args: argparse.Namespace) -> None:
    from polymodal.infer.complete import complete

    complete(args.model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
             top_k=args.top_k, top_p=args.top_p, seed=args.seed, chat=args.chat, stop=args.stop)


def _train(args: argparse.Namespace) -> None:
    from polymodal.recipes import run_recipe

    run_recipe(args.config, args.overrides)


def _quickstart(args: argparse.Namespace) -> None:
    from polymodal.quickstart import quickstart

    quickstart(minutes=args.minutes, out=args.out, overwrite=args.overwrite)


def _dtype(name: str | None):
    import torch

    return {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for tests and docs)."""
    from polymodal.infer.generate import add_sampling_arguments  # torch comes in with the chat parser anyway

    parser = argparse.ArgumentParser(prog="polymodal", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("quickstart", help="train, evaluate and demo a small multimodal LM end to end on the CPU")
    p.add_argument("--minutes", type=float, default=9.5, help="time budget for training and evaluation")
    p.add_argument("--out", default="runs/quickstart", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier quickstart run in --out")
    p.set_defaults(func=_quickstart)

    p = sub.add_parser("convert", help="HF folder or GGUF -> polymodal checkpoint (or --to hf for the way back)")
    p.add_argument("src", help="polymodal checkpoint, HF folder or .gguf file")
    p.add_argument("out", help="output folder")
    p.add_argument("--to", choices=["polymodal", "hf"], default="polymodal")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.set_defaults(func=_convert)

    p = sub.add_parser("complete", help="plain-text completion from a language model (streamed)")
    p.add_argument("model", help="polymodal checkpoint, HF folder or .gguf file")
    p.add_argument("prompt")
    add_sampling_arguments(p, max_new_tokens=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.set_defaults(func=_complete)

    p = sub.add_parser("train", help="run a training recipe: polymodal train CONFIG.yaml [key=value ...]")
    p.add_argument("config", help="a recipe YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, nested keys with dots")
    p.set_defaults(func=_train)

    from polymodal.data.export import add_cli as add_world_cli
    from polymodal.eval.cli import add_cli as add_eval_cli
    from polymodal.infer.chat import add_cli as add_chat_cli

    add_world_cli(sub)
    add_eval_cli(sub)
    add_chat_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `polymodal` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"polymodal {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
