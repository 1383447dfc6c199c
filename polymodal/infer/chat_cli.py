"""`polymodal chat`: one-shot, interactive, or a JSONL batch, on top of the API in `polymodal.infer.chat`.

    polymodal chat MODEL --image scene.png "What color is the star?"   # one-shot: the reply on stdout
    polymodal chat MODEL                                                # interactive session
    polymodal chat MODEL --batch requests.jsonl --out answers.jsonl     # see polymodal.infer.chat_requests

stdout carries replies only; loading progress, the session banner, command output, warnings
and errors go to stderr. Options and the prompt may come in any order.
"""
from __future__ import annotations

import argparse
import sys
from typing import TextIO

from polymodal.errors import PolymodalError, UsageError
from polymodal.infer.chat import ChatSession, is_multimodal
from polymodal.api import parameter_count
from polymodal.infer.cli_common import load_for_task, warnings_as_lines
from polymodal.infer.generate import add_context_arguments, add_sampling_arguments

COMMANDS = (
    ("/image PATH", "attach an image to your next message"),
    ("/reset", "start the conversation over"),
    ("/help", "show these commands"),
    ("/quit", "end the session (or Ctrl-D)"),
)
# What a failed turn raises: a bad request or image, reported in the session, which goes on.
TURN_ERRORS = (PolymodalError, ValueError, OSError)


def _positive_int(text: str) -> int:
    value = int(text)  # a ValueError here becomes argparse's "invalid int value: 'x'"
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


_positive_int.__name__ = "int"  # argparse names the type in its "invalid ... value" message


def add_cli(subparsers) -> None:
    """Register `polymodal chat` on an argparse subparsers object."""
    p = subparsers.add_parser("chat", help="chat with a (multimodal) model: one-shot, interactive, or a JSONL batch",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="polymodal checkpoint, HF folder or .gguf file")
    prompt = p.add_argument("prompt", metavar="[PROMPT]", help="one-shot prompt; without it, an interactive session")
    # The prompt is optional, yet declared with nargs=None rather than "?": argparse before Python
    # 3.12.7 (CPython gh-59317) fills an optional positional with nothing as soon as an option
    # follows the model, so `chat MODEL --image X "prompt"` failed with "unrecognized arguments".
    # A positional that needs one word waits for it wherever it comes; required=False lets it be absent.
    prompt.required = False
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="image file for the prompt (repeatable); in a session, attached to the first message")
    p.add_argument("--system", default=None, metavar="TEXT", help="system message")
    p.add_argument("--batch", default=None, metavar="REQUESTS.jsonl",
                   help="answer a JSONL file of requests, {'messages', 'images'} or {'prompt', 'image'} per line")
    p.add_argument("--out", default=None, metavar="ANSWERS.jsonl", help="where --batch writes its answers")
    p.add_argument("--image-root", default=None, metavar="DIR",
                   help="folder the --batch images must stay inside; None = the batch file's folder")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="requests generated together in --batch")
    add_sampling_arguments(p, max_new_tokens=128)
    add_context_arguments(p)
    p.set_defaults(func=run_chat_cli)


def _check_modes(args: argparse.Namespace) -> None:
    """Refuse option combinations that mean nothing, before the (slow) model load."""
    if args.batch:
        if not args.out:
            raise UsageError("--batch needs --out ANSWERS.jsonl")
        given = [name for name, value in (("a prompt", args.prompt is not None), ("--image", args.image),
                                          ("--system", args.system is not None)) if value]
        if given:
            raise UsageError(f"give either --batch or a prompt/--image/--system, not both "
                             f"(got --batch and {', '.join(given)})")
    else:
        for option, value in (("--out", args.out), ("--image-root", args.image_root)):
            if value is not None:
                raise UsageError(f"{option} only applies to --batch")


def run_chat_cli(args: argparse.Namespace, stdin: TextIO | None = None, out: TextIO | None = None,
                 err: TextIO | None = None) -> None:
    """Handler of `polymodal chat` (stdin/out/err default to the process's streams)."""
    out, err = out or sys.stdout, err or sys.stderr
    _check_modes(args)
    gen = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
           "top_p": args.top_p, "seed": args.seed, "stop_strings": tuple(args.stop), "truncate": args.truncate}
    with warnings_as_lines("chat", err):
        requests = None
        if args.batch:
            from polymodal.infer.chat_requests import read_requests

            requests = read_requests(args.batch, args.image_root)  # a malformed file fails before the load
        model, tokenizer = load_for_task(args.model, "chat", err)
        if requests is not None:
            _answer_batch(model, tokenizer, requests, args, gen, err)
            return
        session = ChatSession(model, tokenizer, system=args.system, **gen)
        if args.prompt is None:
            for image in args.image:
                session.attach(image)
            interactive(session, stdin, out, err, banner=banner(args.model, model))
            return
        for piece in session.stream(args.prompt, images=args.image):
            out.write(piece)
            out.flush()
        out.write("\n")


def _answer_batch(model, tokenizer, requests, args: argparse.Namespace, gen: dict, err: TextIO) -> None:
    """Answer a read batch, write it to --out and sum it up on `err`."""
    from tqdm import tqdm

    from polymodal.infer.chat_requests import answer_requests, write_answers

    todo = sum(r.error is None for r in requests)
    with tqdm(total=todo, desc="chat", unit="req", file=err, disable=not todo) as bar:
        records = answer_requests(model, tokenizer, requests, batch_size=args.batch_size, on_progress=bar.update,
                                  **gen)
    write_answers(args.out, records)
    errors = [r for r in records if "error" in r]
    summary = f"wrote {_count(len(records) - len(errors), 'answer')} and {_count(len(errors), 'error')} to {args.out}"
    if errors:
        summary += f" (first: {args.batch}:{errors[0]['line']}: {errors[0]['error']})"
    print(summary, file=err, flush=True)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def banner(model_path: str, model) -> str:
    """The lines an interactive session opens with: the model, what it can do, the commands."""
    from polymodal.models.registry import tasks_of

    family = getattr(model, "family", type(model).__name__)
    reads = "reads images" if is_multimodal(model) else "text only"
    lines = [f"polymodal chat: {model_path} ({family} model, {parameter_count(model)}; can: "
             f"{', '.join(tasks_of(model))}; {reads})", help_text(), "Type a message and press Enter."]
    return "\n".join(lines) + "\n"


def help_text() -> str:
    """The session commands, one per line."""
    width = max(len(name) for name, _ in COMMANDS)
    rows = [f"  {name:<{width}}  {what}" for name, what in COMMANDS]
    rows.append(f"  {'//text':<{width}}  send a message that starts with '/'")
    return "commands:\n" + "\n".join(rows)


def interactive(session: ChatSession, stdin: TextIO | None = None, out: TextIO | None = None,
                err: TextIO | None = None, banner: str | None = None) -> None:
    """Read user turns from `stdin` until EOF, /quit or Ctrl-C and stream each reply to `out`.

    Commands (see `COMMANDS`) are handled here and never sent to the model, an unknown
    `/command` included. The banner, a "> " prompt (when stdin is a terminal), command output and
    errors go to `err`; a failed turn is reported and the session goes on.
    """
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    if banner:
        err.write(banner)
    prompt = stdin.isatty()
    while True:
        if prompt:
            err.write("> ")
            err.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            err.write("\n")
            return
        text = line.strip()
        if not line:
            return
        if text.startswith("/") and not text.startswith("//"):
            if text.split()[0] in ("/quit", "/exit"):
                return
            _command(session, text, err)
        elif text:
            _turn(session, text[1:] if text.startswith("//") else text, out, err)
        err.flush()


def _command(session: ChatSession, text: str, err: TextIO) -> None:
    """Run one session command (not /quit) and report on `err`."""
    name, _, argument = text.partition(" ")
    argument = argument.strip()
    if name == "/help":
        err.write(help_text() + "\n")
    elif name == "/reset":
        session.reset()
        err.write("[conversation reset]\n")
    elif name == "/image":
        if not argument:
            err.write("[usage: /image PATH]\n")
            return
        try:
            session.attach(argument)
            err.write(f"[attached {argument}]\n")
        except TURN_ERRORS as error:
            err.write(f"[error: {error}]\n")
    else:
        err.write(f"[unknown command {name}; /help lists the commands, //text sends a message starting with '/']\n")


def _turn(session: ChatSession, text: str, out: TextIO, err: TextIO) -> None:
    """Stream the reply to one user message to `out`; report a failure on `err`."""
    try:
        pieces = session.stream(text)
    except TURN_ERRORS as error:  # e.g. a prompt longer than the model's context: report, keep chatting
        err.write(f"[error: {error}]\n")
        return
    try:
        for piece in pieces:
            out.write(piece)
            out.flush()
    except TURN_ERRORS as error:
        err.write(f"[error: {error}]\n")
    except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
        err.write("[interrupted]\n")
    out.write("\n")
    out.flush()
