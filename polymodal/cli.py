"""The `polymodal` command line: a thin argparse layer over the public API.

Each subcommand lives with the code it drives; this file declares the top-level commands,
dispatches, and is the one error boundary: every user error (a `polymodal.errors.PolymodalError`,
a missing or unreadable file, a bad value) ends as one line `polymodal <command>: error: <what>`
on stderr with exit code 2, a stopped training run with exit code 1, never a traceback — unless
`--debug` (anywhere on the line) or `POLYMODAL_DEBUG=1` asks for it. Heavy modules are imported
lazily so `polymodal --help` is instant.
"""
from __future__ import annotations

import argparse
import os
import sys

from polymodal.errors import PolymodalError, TrainingStopped

DEBUG_FLAG = "--debug"
EXIT_USER_ERROR, EXIT_STOPPED, EXIT_INTERNAL = 2, 1, 3


def _convert(args: argparse.Namespace) -> None:
    from polymodal.interop.convert import convert

    convert(args.src, args.out, to=args.to, dtype=args.dtype, overwrite=args.overwrite)


def _complete(args: argparse.Namespace) -> None:
    from polymodal.infer.complete import complete

    complete(args.model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
             top_k=args.top_k, top_p=args.top_p, seed=args.seed, chat=args.chat, stop=args.stop,
             truncate=args.truncate)


def _train(args: argparse.Namespace) -> None:
    if args.nproc is not None:
        from polymodal.distributed.env import check_nproc, run_torchrun
        from polymodal.recipes.runner import load_recipe_config

        check_nproc(args.nproc)
        load_recipe_config(args.config, args.overrides)  # a bad config is one line here, not one per rank
        status = run_torchrun(args.nproc, ["train", args.config, *args.overrides])
        if status:
            raise TrainingStopped(f"torchrun exited with status {status} (the ranks' messages are above)")
        return
    from polymodal.recipes import run_recipe

    run_recipe(args.config, args.overrides)


def _quickstart(args: argparse.Namespace) -> None:
    from polymodal.quickstart import quickstart

    quickstart(out=args.out, overwrite=args.overwrite, eval_scenes=args.eval_scenes, overrides=args.overrides)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for tests and docs)."""
    from polymodal.infer.generate import add_sampling_arguments  # torch comes in with the chat parser anyway

    parser = argparse.ArgumentParser(prog="polymodal", description=__doc__.splitlines()[0],
                                     epilog=f"{DEBUG_FLAG} (anywhere) or POLYMODAL_DEBUG=1 shows tracebacks.")
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("quickstart", help="train, evaluate and demo a small multimodal LM end to end on the CPU",
                       formatter_class=defaults)
    p.add_argument("--out", default="runs/quickstart", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier quickstart run in --out")
    p.add_argument("--eval-scenes", type=int, default=100, help="held-out scenes per evaluation column")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to both stages, e.g. train.steps=50")
    p.set_defaults(func=_quickstart)

    p = sub.add_parser("convert", help="HF folder or GGUF -> polymodal checkpoint (or --to hf for the way back)",
                       formatter_class=defaults)
    p.add_argument("src", help="polymodal checkpoint, HF folder or .gguf file")
    p.add_argument("out", help="output folder (new, empty, or an earlier convert output with --overwrite)")
    p.add_argument("--to", choices=["polymodal", "hf"], default="polymodal",
                   help="polymodal: a polymodal checkpoint folder; hf: a folder transformers' from_pretrained loads")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="cast floating-point weights (default: as stored; GGUF is dequantized to float32)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier convert output in OUT")
    p.set_defaults(func=_convert)

    p = sub.add_parser("complete", help="plain-text completion from a language model (streamed)",
                       formatter_class=defaults)
    p.add_argument("model", help="polymodal checkpoint, HF folder or .gguf file")
    p.add_argument("prompt", help="the text to continue")
    add_sampling_arguments(p, max_new_tokens=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--truncate", action="store_true",
                   help="keep the end of a prompt longer than the model's context instead of refusing it")
    p.set_defaults(func=_complete)

    p = sub.add_parser("train", help="run a training recipe: polymodal train CONFIG.yaml [key=value ...]",
                       formatter_class=defaults)
    p.add_argument("config", help="a recipe YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, nested keys with dots (train.lr=1e-3)")
    p.add_argument("--nproc", type=int, default=None,
                   help="train on N local processes: runs `torchrun --standalone --nproc-per-node N -m polymodal "
                        "train ...` (put it before CONFIG; multi-node: call torchrun yourself, see "
                        "docs/notes/scale_out.md)")
    p.set_defaults(func=_train)

    from polymodal.data.export import add_cli as add_world_cli
    from polymodal.eval.cli import add_cli as add_eval_cli
    from polymodal.infer.chat_cli import add_cli as add_chat_cli
    from polymodal.infer.images_cli import add_cli as add_generate_cli
    from polymodal.serve.cli import add_cli as add_serve_cli

    add_world_cli(sub)
    add_eval_cli(sub)
    add_chat_cli(sub)
    add_generate_cli(sub)
    add_serve_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `polymodal` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get("POLYMODAL_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except TrainingStopped as err:
        return _report(args.command, err, debug, EXIT_STOPPED, "stopped")
    except KeyboardInterrupt:
        return _report(args.command, "interrupted", debug, EXIT_STOPPED, "stopped")
    except (PolymodalError, OSError, ValueError, KeyError) as err:
        return _report(args.command, err, debug, EXIT_USER_ERROR, "error")
    except Exception as err:  # a bug, not a user error: still one line, and how to see more
        if debug:
            raise
        message = f"internal error {type(err).__name__}: {_one_line(err)} (run with {DEBUG_FLAG} for the traceback)"
        return _report(args.command, message, debug, EXIT_INTERNAL, "error")
    return 0


def _report(command: str, err: BaseException | str, debug: bool, code: int, kind: str) -> int:
    """Print `polymodal <command>: <kind>: <message>` on stderr (re-raise under --debug); return `code`."""
    if debug and isinstance(err, BaseException):
        raise err
    message = err if isinstance(err, str) else _one_line(err)
    if isinstance(err, OSError) and not isinstance(err, PolymodalError) and err.filename:
        message = f"{err.strerror or message}: {err.filename}"
    print(f"polymodal {command}: {kind}: {message}", file=sys.stderr)
    return code


def _one_line(err: BaseException) -> str:
    """The exception's message on one line (a KeyError's without the repr quotes)."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
