"""Chat with a language or multimodal model: messages in, a reply (or a stream of pieces) out, batched.

A chat is a list of messages [{"role": "system"|"user"|"assistant", "content": str}] plus the
images it mentions: each "<image>" in a content marks where the next image goes (LLaVA style).
When images are given but no message holds a marker, the first user message is prefixed with
one "<image>\\n" per image. Prompts are rendered exactly as in training
(`polymodal.data.conversation.prompt_ids`), so a fine-tuned model is asked what it learned to
answer. Text-only (`lm`) models take the same calls without images.

This module is the library side, shared by `polymodal chat` (`polymodal.infer.chat_cli`) and a
server: it never prints or reads a terminal, and reports problems as exceptions from
`polymodal.errors` (a prompt longer than the model's context is a `UsageError` unless
`truncate=True`; then its oldest tokens go, whole images with them, and a warning says so).
Streams check their request when called, before the first piece.

    from polymodal.infer.chat import ChatSession
    session = ChatSession(model, tokenizer)
    session.send("What color is the circle?", images=["scene.png"])
    for piece in session.stream("And its size?"): print(piece, end="")
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from polymodal.data.conversation import IMAGE_MARKER, ImageProcessor, prompt_ids
from polymodal.errors import UsageError
from polymodal.infer.generate import DEFAULT_MAX_NEW_TOKENS, cut_at_stop, generate, stream_text
from polymodal.infer.limits import check_sampling, context_length, truncation_start, warn_truncated


@dataclass
class ChatPrompt:
    """One encoded request: prompt ids (T,) and its images' pixels (N, 3, H, W), or None."""

    ids: list[int]
    pixels: torch.Tensor | None


def is_multimodal(model) -> bool:
    """Whether `model` reads images: it has `<image>` slots (`image_tokens` positions per image)
    that its `embed(ids, pixels)` fills, from a vision tower or an image tokenizer."""
    return hasattr(model, "image_tokens") and hasattr(model, "embed")


def default_processor(model) -> ImageProcessor | None:
    """The `ImageProcessor` at the model's vision resolution (None for text-only models)."""
    return ImageProcessor.for_model(model.config) if is_multimodal(model) else None


def with_image_markers(messages: Sequence[dict], num_images: int) -> list[dict]:
    """`messages`, with "<image>\\n" x num_images put before the first user message when no message has a marker."""
    messages = [dict(m) for m in messages]
    if num_images and not any(IMAGE_MARKER in str(m.get("content", "")) for m in messages):
        first_user = next((m for m in messages if m.get("role") == "user"), None)
        if first_user is None:
            raise UsageError("images were given but messages have no user message to attach them to")
        first_user["content"] = (IMAGE_MARKER + "\n") * num_images + str(first_user.get("content", ""))
    return messages


def encode_chat(model, tokenizer, messages: Sequence[dict], images: Sequence = (),
                processor: ImageProcessor | None = None) -> ChatPrompt:
    """Render and tokenize one chat for generation (with the assistant generation prompt).

    images: PIL images, uint8 arrays (H, W, 3), file paths, or already processed (3, H, W) tensors.
    """
    if images and not is_multimodal(model):
        raise UsageError(f"{type(model).__name__} is a text-only model; it cannot read the {len(images)} image(s) "
                         "given")
    messages = with_image_markers(messages, len(images))
    if not is_multimodal(model):
        return ChatPrompt(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True), None)
    markers = sum(m["content"].count(IMAGE_MARKER) for m in messages if isinstance(m.get("content"), str))
    if markers != len(images):
        raise UsageError(f"messages hold {markers} '{IMAGE_MARKER}' markers but {len(images)} images were given")
    ids = prompt_ids(tokenizer, messages, model.config.image_token_id, model.image_tokens)
    if not images:
        return ChatPrompt(ids, None)
    processor = processor or default_processor(model)
    pixels = torch.stack([im if torch.is_tensor(im) else processor(im) for im in images])  # (N, 3, H, W)
    return ChatPrompt(ids, pixels)


def fit_chat_prompt(model, prompt: ChatPrompt, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                    truncate: bool = False) -> ChatPrompt:
    """`prompt` checked against the model's context: as is when it fits, else a `UsageError`
    naming both lengths, or with `truncate` its last tokens (see `polymodal.infer.limits`).

    A cut never splits an image: an image whose placeholders the cut reaches is dropped whole,
    with its pixels, so the ids and the pixels still agree.
    """
    context = context_length(model)
    start = truncation_start(len(prompt.ids), context, max_new_tokens, truncate)
    if not start:
        return prompt
    pixels = prompt.pixels
    if pixels is not None:
        per_image = model.image_tokens
        slots = [i for i, token in enumerate(prompt.ids) if token == model.config.image_token_id]
        if len(slots) != per_image * len(pixels):
            raise UsageError(f"cannot truncate this prompt: its {len(slots)} image placeholders are not "
                             f"{per_image} per image for its {len(pixels)} images")
        dropped = -(-sum(slot < start for slot in slots) // per_image)  # images the cut reaches, rounded up
        if dropped:
            start = max(start, slots[dropped * per_image - 1] + 1)
            pixels = pixels[dropped:] if dropped < len(pixels) else None
    if start >= len(prompt.ids):
        raise UsageError(f"cannot truncate the prompt of {len(prompt.ids)} tokens to fit the model's context of "
                         f"{context} tokens: its last image alone does not fit")
    warn_truncated(len(prompt.ids), len(prompt.ids) - start, context, max_new_tokens)
    return ChatPrompt(prompt.ids[start:], pixels)


def end_of_turn_ids(model, tokenizer) -> set[int]:
    """The ids that end a reply: the model config's eos id(s) (a MultimodalLM or unified model keeps
    its LM's settings in config.lm) and the tokenizer's."""
    config = getattr(model, "config", None)
    eos = getattr(getattr(config, "lm", config), "eos_token_id", None)
    ids = set([eos] if isinstance(eos, int) else eos or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _generation_kwargs(model, tokenizer, gen: dict) -> tuple[dict, bool]:
    """(gen checked, plus defaults: stop at the model's and the tokenizer's end-of-turn ids; truncate)."""
    gen = dict(gen)
    truncate = bool(gen.pop("truncate", False))
    check_sampling(**{name: gen[name] for name in ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
                      if name in gen})
    if gen.get("eos_token_id") is None:
        gen["eos_token_id"] = sorted(end_of_turn_ids(model, tokenizer)) or None
    gen["stop_strings"] = tuple(gen.get("stop_strings", ()))
    return gen, truncate


def generate_replies(model, tokenizer, prompts: Sequence[ChatPrompt], **gen) -> list[str]:
    """Generate one reply per prompt in a single batch.

    gen: as `polymodal.infer.generate.generate` (max_new_tokens, temperature, top_k, top_p, seed,
    stop_strings, ...) plus `truncate` (see `fit_chat_prompt`).
    """
    gen, truncate = _generation_kwargs(model, tokenizer, gen)
    max_new = gen.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    prompts = [fit_chat_prompt(model, p, max_new, truncate) for p in prompts]
    ids = [p.ids for p in prompts]
    pixels = [p.pixels for p in prompts if p.pixels is not None]
    if is_multimodal(model):
        outs = model.generate(ids, torch.cat(pixels) if pixels else None, tokenizer=tokenizer, **gen)
    else:
        outs = generate(model, ids, tokenizer=tokenizer, **gen)
    return [cut_at_stop(tokenizer.decode(o, skip_special_tokens=True), gen["stop_strings"]) for o in outs]


def stream_reply(model, tokenizer, prompt: ChatPrompt, **gen) -> Iterator[str]:
    """The reply to one prompt as an iterator of pieces that join to `generate_replies`' text.

    The request is checked (and the prompt fitted to the context) when called, before the first piece.
    """
    gen, truncate = _generation_kwargs(model, tokenizer, gen)
    prompt = fit_chat_prompt(model, prompt, gen.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS), truncate)
    if prompt.pixels is not None:
        device = next(model.parameters()).device
        ids = torch.tensor([prompt.ids], device=device)  # (1, T)
        with torch.no_grad():  # generation never backpropagates; keep no graph through the vision tower
            gen["inputs_embeds"] = model.embed(ids, prompt.pixels.to(device))  # (1, T, D)
        gen["attention_mask"] = torch.ones_like(ids)
        if hasattr(model, "image_slots"):  # models with image-position weights (image LoRA, a visual expert)
            gen["prefill_inputs"] = {"image_mask": model.image_slots(ids)}
    if is_multimodal(model):
        gen["suppress_tokens"] = model.generation_suppressed_tokens()
    return stream_text(model, tokenizer, prompt.ids, **gen)


def chat(model, tokenizer, messages: Sequence[dict], images: Sequence = (), processor: ImageProcessor | None = None,
         **gen) -> str:
    """The model's reply to `messages` (+ `images`).

    gen: max_new_tokens, temperature, top_k, top_p, seed, stop_strings, truncate (see `generate_replies`).
    """
    return generate_replies(model, tokenizer, [encode_chat(model, tokenizer, messages, images, processor)], **gen)[0]


def stream_chat(model, tokenizer, messages: Sequence[dict], images: Sequence = (),
                processor: ImageProcessor | None = None, **gen) -> Iterator[str]:
    """`chat`, streamed: an iterator of text pieces whose concatenation is `chat`'s reply."""
    return stream_reply(model, tokenizer, encode_chat(model, tokenizer, messages, images, processor), **gen)


def chat_batch(model, tokenizer, requests: Sequence[tuple[Sequence[dict], Sequence]],
               processor: ImageProcessor | None = None, batch_size: int = 8,
               on_progress: Callable[[int], None] | None = None, **gen) -> list[str]:
    """Replies to many (messages, images) requests, generated `batch_size` at a time, in order.

    on_progress(n): called after each batch with the number of requests it answered.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"chat_batch: batch_size must be an integer >= 1, got {batch_size!r}")
    replies: list[str] = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        prompts = [encode_chat(model, tokenizer, m, ims, processor) for m, ims in chunk]
        replies += generate_replies(model, tokenizer, prompts, **gen)
        if on_progress is not None:
            on_progress(len(chunk))
    return replies


class ChatSession:
    """A multi-turn conversation: keeps the messages and images, appends each reply.

    system: optional system message. gen: generation settings for every turn (see `chat`);
    with truncate=True a long conversation keeps its latest tokens.
    Images attached with `attach` (or passed to `send`/`stream`) go with the next user message.
    A turn that fails (a bad image, a prompt too long) leaves the conversation as it was.
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
            raise UsageError(f"{type(self.model).__name__} is a text-only model; it cannot read images")
        self.pending.append(self.processor(image))

    def _user_turn(self, text: str, images: Sequence) -> tuple[ChatPrompt, Callable[[], None]]:
        """The prompt for a new user turn, and the function that adds the turn to the conversation
        (called once its reply has started, so a failed turn leaves no trace)."""
        if images and not is_multimodal(self.model):
            raise UsageError(f"{type(self.model).__name__} is a text-only model; it cannot read images")
        pending = self.pending + [self.processor(image) for image in images]
        content = text if IMAGE_MARKER in text else (IMAGE_MARKER + "\n") * len(pending) + text
        messages = self.messages + [{"role": "user", "content": content}]
        prompt = encode_chat(self.model, self.tokenizer, messages, self.images + pending, self.processor)

        def commit() -> None:
            self.messages, self.images, self.pending = messages, self.images + pending, []

        return prompt, commit

    def send(self, text: str, images: Sequence = ()) -> str:
        """Add a user message (+ images), generate the reply, remember it and return it."""
        prompt, commit = self._user_turn(text, images)
        reply = generate_replies(self.model, self.tokenizer, [prompt], **self.gen)[0]
        commit()
        self.messages.append({"role": "assistant", "content": reply})
        return reply

    def stream(self, text: str, images: Sequence = ()) -> Iterator[str]:
        """`send`, streamed: an iterator of reply pieces; the reply is remembered once the stream ends
        (or what was streamed of it, when the stream is closed early)."""
        prompt, commit = self._user_turn(text, images)
        return self._remembered(stream_reply(self.model, self.tokenizer, prompt, **self.gen), commit)

    def _remembered(self, pieces: Iterator[str], commit: Callable[[], None]) -> Iterator[str]:
        # The turn joins the conversation when its reply starts streaming, not before: a stream
        # never read leaves the conversation as it was.
        commit()
        streamed = []
        try:
            for piece in pieces:
                streamed.append(piece)
                yield piece
        finally:
            # A stream closed early still leaves user/assistant turns alternating.
            self.messages.append({"role": "assistant", "content": "".join(streamed)})
