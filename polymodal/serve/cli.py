"""`polymodal serve CHECKPOINT`: an OpenAI-compatible HTTP server for one model (see `polymodal.serve`)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from polymodal.serve.config import DEFAULT_HOST, DEFAULT_PORT, ServeConfig

MB = 1024 * 1024


def _int_at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)  # a ValueError here becomes argparse's "invalid int value: 'x'"
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = "int"  # argparse names the type in its "invalid ... value" message
    return parse


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


_positive_float.__name__ = "float"


def add_cli(subparsers) -> None:
    """Register `polymodal serve` on an argparse subparsers object."""
    defaults = ServeConfig()
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API, with a web page at /",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", metavar="CHECKPOINT", help="polymodal checkpoint, HF folder or .gguf file")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address to listen on; the default answers this machine only (0.0.0.0: every interface)")
    p.add_argument("--port", type=_int_at_least(0), default=DEFAULT_PORT, help="TCP port (0: any free port)")
    p.add_argument("--api-key", default=os.environ.get("POLYMODAL_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 routes and /metrics (default: the "
                        "POLYMODAL_API_KEY environment variable, which keeps the key out of ps and shell history; "
                        "unset = no key)")
    p.add_argument("--model-name", default=None, metavar="ID",
                   help="the model id clients send; None = the checkpoint's folder name")
    p.add_argument("--max-batch", type=_int_at_least(1), default=defaults.max_batch,
                   help="most sequences decoded together; 1 turns batching off")
    p.add_argument("--max-queue", type=_int_at_least(1), default=defaults.max_queue,
                   help="most requests waiting; more are answered 429 at once")
    p.add_argument("--timeout", type=_positive_float, default=defaults.timeout_s,
                   help="seconds a request may take, waiting included (then 504)")
    p.add_argument("--max-body-mb", type=_positive_float, default=defaults.max_body_bytes / MB,
                   help="largest request body in MiB (413 above)")
    p.add_argument("--max-image-pixels", type=_int_at_least(1), default=defaults.max_image_pixels,
                   help="largest width*height of an input image, checked before decoding (400 above)")
    p.add_argument("--max-images", type=_int_at_least(0), default=defaults.max_images,
                   help="most images in one request")
    p.add_argument("--image-root", default=None, metavar="DIR",
                   help="allow file:// image URLs inside this folder; None = refuse them")
    p.add_argument("--max-tokens", type=_int_at_least(1), default=defaults.default_max_tokens,
                   help="reply length when a request gives no max_tokens")
    p.set_defaults(func=run_serve_cli)


def model_name(path: str) -> str:
    """The default model id: the checkpoint's folder (or file stem); a recipe's `final/` is named by its run."""
    path = Path(path).resolve()
    name = path.stem if path.is_file() else path.name
    return path.parent.name if name == "final" and path.parent.name else name


def run_serve_cli(args: argparse.Namespace) -> None:
    """Load the model, then serve until Ctrl-C (handler of `polymodal serve`)."""
    import uvicorn

    from polymodal.api import load_verbose
    from polymodal.serve.app import create_app

    config = ServeConfig(model_name=args.model_name or model_name(args.model), api_key=args.api_key,
                         max_batch=args.max_batch, max_queue=args.max_queue, timeout_s=args.timeout,
                         max_body_bytes=int(args.max_body_mb * MB), max_image_pixels=args.max_image_pixels,
                         max_images=args.max_images, image_root=Path(args.image_root) if args.image_root else None,
                         default_max_tokens=args.max_tokens)
    model, tokenizer = load_verbose(args.model, stream=sys.stderr)
    app = create_app(model, tokenizer, config)
    configure_logging()
    tasks = ", ".join(app.state.served.tasks) or "nothing servable"
    print(f"polymodal serve: {config.model_name} can: {tasks}; open http://{args.host}:{args.port}/ "
          f"(Ctrl-C stops)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning")


def configure_logging() -> None:
    """Request log lines (JSON) and server errors on stderr, one per line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("polymodal.serve.requests", "polymodal.serve"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not logger.handlers:
            logger.addHandler(handler)
        logger.propagate = False
