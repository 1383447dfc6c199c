"""Chat with a language or multimodal model: Python API, streaming, batches, and `polymodal chat`.

A chat is a list of messages [{"role": "system"|"user"|"assistant", "content": str}] plus the
images it mentions: each "<image>" in a content marks where the next image goes (LLaVA style).
When images are given but no message holds a marker, the first user message is prefixed with
one "<image>\\n" per image. Prompts are rendered exactly as in training
(`polymodal.data.conversation.prompt_ids`), so a fine-tuned model is asked what it learned to
answer. Text-only (`lm`) models take the same calls without images.

    from polymodal.infer.chat import ChatSession
    session = ChatSession(model, tokenizer)
    session.send("What color is the circle?", images=["scene.png"])
    for piece in session.stream("And its size?"): print(piece, end="")
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from polymodal.data.conversation import IMAGE_MARKER, ImageProcessor, prompt_ids
from polymodal.infer.generate import add_sampling_arguments, cut_at_stop, generate, stream_text


@dataclass
class ChatPrompt:
    """One encoded request: prompt ids (T,) and its images' pixels (N, 3, H, W), or None."""

    ids: list[int]
    pixels: torch.Tensor | None


def is_multimodal(model) -> bool:
    """Whether `model` reads images (it has `<image>` slots and a vision tower)."""
    return hasattr(model, "image_tokens") and hasattr(model, "encode_images")


def default_processor(model) -> ImageProcessor | None:
    """The `ImageProcessor` at the model's vision resolution (None for text-only models)."""
    return ImageProcessor.for_model(model.config) if is_multimodal(model) else None


def with_image_markers(messages: Sequence[dict], num_images: int) -> list[dict]:
    """`messages`, with "<image>\\n" x num_images put before the first user message when no message has a marker."""
    messages = [dict(m) for m in messages]
    if num_images and not any(IMAGE_MARKER in str(m.get("content", "")) for m in messages):
        first_user = next((m for m in messages if m.get("role") == "user"), None)
        if first_user is None:
            raise ValueError("images were given but messages have no user message to attach them to")
        first_user["content"] = (IMAGE_MARKER + "\n") * num_images + str(first_user.get("content", ""))
    return messages


def encode_chat(model, tokenizer, messages: Sequence[dict], images: Sequence = (),
                processor: ImageProcessor | None = None) -> ChatPrompt:
    """Render and tokenize one chat for generation (with the assistant generation prompt).

    images: PIL images, uint8 arrays (H, W, 3), file paths, or already processed (3, H, W) tensors.
    """
    if images and not is_multimodal(model):
        raise ValueError(f"{type(model).__name__} is a text-only model; it cannot read the {len(images)} image(s) given")
    messages = with_image_markers(messages, len(images))
    if not is_multimodal(model):
        return ChatPrompt(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True), None)
    markers = sum(m["content"].count(IMAGE_MARKER) for m in messages if isinstance(m.get("content"), str))
    if markers != len(images):
        raise ValueError(f"messages hold {markers} '{IMAGE_MARKER}' markers but {len(images)} images were given")
    ids = prompt_ids(tokenizer, messages, model.config.image_token_id, model.image_tokens)
    if not images:
        return ChatPrompt(ids, None)
    processor = processor or default_processor(model)
    pixels = torch.stack([im if torch.is_tensor(im) else processor(im) for im in images])  # (N, 3, H, W)
    return ChatPrompt(ids, pixels)



def _generation_kwargs(model, tokenizer, gen: dict) -> dict:
    """gen plus defaults: stop at the model's and the tokenizer's end-of-turn ids."""
    gen = dict(gen)
    if gen.get("eos_token_id") is None:
        config = getattr(model, "config", None)
        # A MultimodalLM keeps its LM's settings in config.lm.
        eos = getattr(getattr(config, "lm", config), "eos_token_id", None)
        ids = set([eos] if isinstance(eos, int) else eos or [])
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        gen["eos_token_id"] = sorted(ids) or None
    gen["stop_strings"] = tuple(gen.get("stop_strings", ()))
    return gen


def generate_replies(model, tokenizer, prompts: Sequence[ChatPrompt], **gen) -> list[str]:
    """Generate one reply per prompt in a single batch; kwargs as `polymodal.infer.generate.generate`."""
    gen = _generation_kwargs(model, tokenizer, gen)
    ids = [p.ids for p in prompts]
    pixels = [p.pixels for p in prompts if p.pixels is not None]
    if is_multimodal(model):
        outs = model.generate(ids, torch.cat(pixels) if pixels else None, tokenizer=tokenizer, **gen)
    else:
        outs = generate(model, ids, tokenizer=tokenizer, **gen)
    return [cut_at_stop(tokenizer.decode(o, skip_special_tokens=True), gen["stop_strings"]) for o in outs]


def stream_reply(model, tokenizer, prompt: ChatPrompt, **gen) -> Iterator[str]:
    """Yield the reply to one prompt piece by piece; the pieces join to `generate_replies`' text."""
    gen = _generation_kwargs(model, tokenizer, gen)
    if prompt.pixels is not None:
        device = next(model.parameters()).device
        ids = torch.tensor([prompt.ids], device=device)  # (1, T)
        with torch.no_grad():  # generation never backpropagates; keep no graph through the vision tower
            gen["inputs_embeds"] = model.embed(ids, prompt.pixels.to(device))  # (1, T, D)
        gen["attention_mask"] = torch.ones_like(ids)
    if is_multimodal(model):
        gen["suppress_tokens"] = model.generation_suppressed_tokens()
    yield from stream_text(model, tokenizer, prompt.ids, **gen)


def chat(model, tokenizer, messages: Sequence[dict], images: Sequence = (), processor: ImageProcessor | None = None,
         **gen) -> str:
    """The model's reply to `messages` (+ `images`); gen: max_new_tokens, temperature, top_k, top_p, seed, stop_strings."""
    return generate_replies(model, tokenizer, [encode_chat(model, tokenizer, messages, images, processor)], **gen)[0]


def stream_chat(model, tokenizer, messages: Sequence[dict], images: Sequence = (),
                processor: ImageProcessor | None = None, **gen) -> Iterator[str]:
    """`chat`, streamed: yields text pieces whose concatenation is `chat`'s reply."""
    yield from stream_reply(model, tokenizer, encode_chat(model, tokenizer, messages, images, processor), **gen)


def chat_batch(model, tokenizer, requests: Sequence[tuple[Sequence[dict], Sequence]],
               processor: ImageProcessor | None = None, batch_size: int = 8, progress: bool = False,
               **gen) -> list[str]:
    """Replies to many (messages, images) requests, generated `batch_size` at a time, in order."""
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"chat_batch: batch_size must be >= 1, got {batch_size}")
    replies: list[str] = []
    with tqdm(total=len(requests), desc="chat", unit="req", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(requests), batch_size):
            chunk = requests[start:start + batch_size]
            prompts = [encode_chat(model, tokenizer, m, ims, processor) for m, ims in chunk]
            replies += generate_replies(model, tokenizer, prompts, **gen)
            bar.update(len(chunk))
    return replies


class ChatSession:
    """A multi-turn conversation: keeps the messages and images, appends each reply.

    system: optional system message. gen: generation settings for every turn (see `chat`).
    Images attached with `attach` (or passed to `send`/`stream`) go with the next user message.
    """

    def __init__(self, model, tokenizer, processor: ImageProcessor | None = None, system: str | None = None, **gen):
        self.model, self.tokenizer = model, tokenizer
        self.processor = processor or default_processor(model)
        self.system = system
        self.gen = gen
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (keeps the system message)."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.images: list[torch.Tensor] = []
        self.pending: list[torch.Tensor] = []

    def attach(self, image) -> None:
        """Attach an image (PIL, uint8 array, path) to the next user message; it is processed now."""
        if not is_multimodal(self.model):
            raise ValueError(f"{type(self.model).__name__} is a text-only model; it cannot read images")
        self.pending.append(self.processor(image))

    def _user_turn(self, text: str, images: Sequence) -> ChatPrompt:
        for image in images:
            self.attach(image)
        content = text if IMAGE_MARKER in text else (IMAGE_MARKER + "\n") * len(self.pending) + text
        messages = self.messages + [{"role": "user", "content": content}]
        prompt = encode_chat(self.model, self.tokenizer, messages, self.images + self.pending, self.processor)
        self.messages, self.images, self.pending = messages, self.images + self.pending, []
        return prompt

    def send(self, text: str, images: Sequence = ()) -> str:
        """Add a user message (+ images), generate the reply, remember it and return it."""
        reply = generate_replies(self.model, self.tokenizer, [self._user_turn(text, images)], **self.gen)[0]
        self.messages.append({"role": "assistant", "content": reply})
        return reply

    def stream(self, text: str, images: Sequence = ()) -> Iterator[str]:
        """`send`, streamed: yields reply pieces; the reply is remembered once the stream ends."""
        prompt = self._user_turn(text, images)
        pieces = []
        try:
            for piece in stream_reply(self.model, self.tokenizer, prompt, **self.gen):
                pieces.append(piece)
                yield piece
        finally:
            # A stream closed early still leaves user/assistant turns alternating.
            self.messages.append({"role": "assistant", "content": "".join(pieces)})


def interactive(session: ChatSession, stdin=None, out=None) -> None:
    """Read user turns from `stdin` until EOF or /quit and stream each reply to `out`.

    Commands: `/image PATH` attaches an image to the next message, `/reset` starts over,
    `/quit` ends. A "> " prompt is shown when stdin is a terminal.
    """
    stdin, out = stdin or sys.stdin, out or sys.stdout
    prompt = stdin.isatty()
    while True:
        if prompt:
            out.write("> ")
            out.flush()
        line = stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/image"):
            path = text[len("/image"):].strip()
            try:
                session.attach(path)
                out.write(f"[attached {path}]\n")
            except (ValueError, OSError) as err:
                out.write(f"[error: {err}]\n")
        elif text == "/reset":
            session.reset()
            out.write("[conversation reset]\n")
        else:
            try:
                for piece in session.stream(text):
                    out.write(piece)
                    out.flush()
            except ValueError as err:  # e.g. a prompt longer than the model's context: report, keep chatting
                out.write(f"[error: {err}]")
            out.write("\n")
        out.flush()


REQUEST_ROLES = ("system", "user", "assistant")


def read_requests(path: str | Path) -> list[tuple[list[dict], list[str], object]]:
    """Requests of a JSONL file: per line {"messages": [...], "images": [paths]} or {"prompt": str, "image": path},
    each with an optional "id" that is copied to the answer.

    Relative image paths are read from the JSONL file's folder. Returns [(messages, image paths, id or None)].
    """
    path = Path(path)
    requests = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err})") from None
        if isinstance(record, dict) and isinstance(record.get("messages"), list):
            messages, images, field = record["messages"], record.get("images", []), "images"
            for i, message in enumerate(messages):
                if not (isinstance(message, dict) and message.get("role") in REQUEST_ROLES
                        and isinstance(message.get("content"), str)):
                    raise ValueError(f"{path}:{number}: messages[{i}] must be an object with a 'role' "
                                     f"({', '.join(REQUEST_ROLES)}) and a string 'content', got {message!r}")
        elif isinstance(record, dict) and isinstance(record.get("prompt"), str):
            messages = [{"role": "user", "content": record["prompt"]}]
            images, field = ([record["image"]] if record.get("image") else []), "image"
        else:
            raise ValueError(f"{path}:{number}: expected an object with 'messages' (+ 'images') or 'prompt' (+ 'image')")
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            kind = "a list of file paths" if field == "images" else "a file path"
            raise ValueError(f"{path}:{number}: '{field}' must be {kind}")
        requests.append((messages, [str(path.parent / p) for p in images], record.get("id")))
    return requests


def run_batch(model, tokenizer, requests_path: str | Path, out_path: str | Path, batch_size: int = 8, **gen) -> int:
    """Answer every request of a JSONL file; write {"index", ["id",] "answer"} lines to `out_path`.

    Returns the number of answers written.
    """
    from polymodal.atomic import write_text_atomic

    requests = read_requests(requests_path)
    replies = chat_batch(model, tokenizer, [(m, ims) for m, ims, _ in requests], batch_size=batch_size,
                         progress=True, **gen)
    lines = []
    for index, (reply, (_, _, rid)) in enumerate(zip(replies, requests)):
        record = {"index": index, **({"id": rid} if rid is not None else {}), "answer": reply}
        lines.append(json.dumps(record, ensure_ascii=False))
    write_text_atomic(out_path, "\n".join(lines) + ("\n" if lines else ""))
    return len(lines)


def add_cli(subparsers) -> None:
    """Register `polymodal chat`."""
    p = subparsers.add_parser("chat", help="chat with a (multimodal) model: one-shot, interactive, or a JSONL batch")
    p.add_argument("model", help="polymodal checkpoint, HF folder or .gguf file")
    p.add_argument("prompt", nargs="?", default=None, help="one-shot prompt; without it, an interactive session")
    p.add_argument("--image", action="append", default=[], help="image file for the prompt (repeatable)")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--batch", default=None, help="requests JSONL: {'messages', 'images'} or {'prompt', 'image'} per line")
    p.add_argument("--out", default=None, help="answers JSONL (with --batch)")
    p.add_argument("--batch-size", type=int, default=8)
    add_sampling_arguments(p, max_new_tokens=128)
    p.set_defaults(func=run_chat_cli)


def run_chat_cli(args: argparse.Namespace, stdin=None, out=None) -> None:
    """Handler of `polymodal chat` (stdin/out default to the process's streams)."""
    from polymodal.api import load

    out = out or sys.stdout
    if args.batch and not args.out:
        raise ValueError("polymodal chat --batch needs --out ANSWERS.jsonl")
    if args.batch and (args.prompt or args.image):
        raise ValueError("polymodal chat: give either --batch or a prompt/--image, not both")
    model, tokenizer = load(args.model)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer; `chat` needs one")
    gen = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
           "top_p": args.top_p, "seed": args.seed, "stop_strings": tuple(args.stop)}
    if args.batch:
        count = run_batch(model, tokenizer, args.batch, args.out, batch_size=args.batch_size, **gen)
        print(f"wrote {count} answers to {args.out}", file=sys.stderr)
        return
    session = ChatSession(model, tokenizer, system=args.system, **gen)
    if args.prompt is None:
        for image in args.image:
            session.attach(image)
        interactive(session, stdin, out)
        return
    for piece in session.stream(args.prompt, images=args.image):
        out.write(piece)
        out.flush()
    out.write("\n")
