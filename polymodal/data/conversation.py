"""Chat conversations with images -> `Document`s for training and prompt ids for inference.

One rendering serves both sides: the messages go through the tokenizer's chat template
(`apply_chat_template`), the rendered text is cut at every `<image>` marker and at the
boundaries of the assistant turns, and each piece is encoded on its own. Because an inference
prompt ends exactly where a training assistant span begins (right after the generation prompt),
`prompt_ids` yields the same ids as the prefix of the training document: what the model learns
to continue is exactly what it is asked to continue.

Each `<image>` becomes K = `image_tokens` copies of `image_token_id` (HF-LLaVA placeholders)
carrying the pixels, which `MultimodalLM` replaces with projected image features.

Assistant spans are found HF-style, by rendering growing prefixes of the conversation: the text
between `render(messages[:i], add_generation_prompt=True)` and `render(messages[:i + 1])` is
assistant turn i (its content plus the template's end-of-turn token and trailing newline). A
template whose renderings are not prefixes of each other (e.g. one that rewrites history) is
reported as an error rather than masked wrongly.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from polymodal.data.image import Preprocess, load_image, select_grid, tile_image
from polymodal.sequence import NEXT_TOKEN, Document, Segment

IMAGE_MARKER = "<image>"
TRAIN_ON = ("assistant", "all")


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def _assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the character span [start, end) of each assistant turn's loss text."""
    full = _render(tokenizer, messages, add_generation_prompt=False)
    eos = tokenizer.eos_token
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ValueError(
                f"conversation_document: the chat template does not render message {i} (assistant) as a "
                "prefix-stable turn, so its loss span cannot be located; use train_on='all'"
            )
        end = len(upto)
        # The loss covers the content and the end-of-turn token, not the newline after it.
        if eos and eos in upto[len(before):]:
            end = upto.rindex(eos) + len(eos)
        spans.append((len(before), end))
    return full, spans


def _check_messages(messages: Sequence[dict], images: int | None) -> int:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    markers = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be {{'role': 'system'|'user'|'assistant', 'content': str}}, got {m!r}")
        markers += m["content"].count(IMAGE_MARKER)
    if images is not None and markers != images:
        raise ValueError(f"messages hold {markers} '{IMAGE_MARKER}' markers but {images} images were given")
    return markers


def _pieces(text: str, cuts: list[tuple[int, int]]) -> list[tuple[str, bool]]:
    """Split `text` into (piece, in_a_cut_span) pieces at the span boundaries."""
    out, cursor = [], 0
    for start, end in cuts:
        if start > cursor:
            out.append((text[cursor:start], False))
        out.append((text[start:end], True))
        cursor = end
    if cursor < len(text):
        out.append((text[cursor:], False))
    return out


def conversation_document(tokenizer, messages: list[dict], images: list, image_token_id: int,
                          image_tokens: int, train_on: str = "assistant",
                          image_segment: Callable[[object, bool], Segment] | None = None) -> Document:
    """A chat with images as one `Document` for `pack_documents` / `MultimodalLM`.

    messages: [{"role": "system"|"user"|"assistant", "content": str}]; each "<image>" in the
        contents marks where the next image of `images` goes.
    images: pixels (3, H, W) per marker, in order (see `ImageProcessor`).
    Each image becomes Segment("image", tokens=[image_token_id] * image_tokens, data=pixels,
    target=None). train_on: "assistant" makes the assistant turns' content and their
    end-of-turn token the next-token targets; "all" every text token.
    image_segment(image, trained): builds an image's segment instead, for models that read images
        as tokens (`unified`: the image's code span, a next-token target when `trained`, i.e. when
        it lies in a trained span, as an assistant's drawn image does); `images` are then whatever
        it takes.
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    _check_messages(messages, len(images))
    if train_on == "assistant":
        full, spans = _assistant_spans(tokenizer, messages)
        if not spans:
            raise ValueError("conversation_document: train_on='assistant' but messages have no assistant turn")
    else:
        full, spans = _render(tokenizer, messages, add_generation_prompt=False), []
    segments: list[Segment] = []
    image_iter = iter(images)
    for piece, in_span in _pieces(full, spans):
        target = NEXT_TOKEN if in_span or train_on == "all" else None
        for j, chunk in enumerate(piece.split(IMAGE_MARKER)):
            if j and image_segment is not None:
                segments.append(image_segment(next(image_iter), target == NEXT_TOKEN))
            elif j:
                pixels = next(image_iter)
                if not torch.is_tensor(pixels) or pixels.dim() != 3:
                    raise ValueError(f"images must be (3, H, W) tensors, got {getattr(pixels, 'shape', type(pixels))}")
                segments.append(Segment("image", tokens=[image_token_id] * image_tokens, data=pixels, target=None))
            ids = tokenizer.encode(chunk) if chunk else []
            if ids:
                segments.append(Segment("text", tokens=ids, target=target))
    return Document(segments)


def prompt_ids(tokenizer, messages: list[dict], image_token_id: int, image_tokens: int,
               add_generation_prompt: bool = True) -> list[int]:
    """The inference prompt: messages rendered as in training, each "<image>" expanded to
    `image_tokens` copies of `image_token_id`. Returns a list of T ids."""
    _check_messages(messages, None)
    text = _render(tokenizer, messages, add_generation_prompt)
    ids: list[int] = []
    for j, chunk in enumerate(text.split(IMAGE_MARKER)):
        if j:
            ids += [image_token_id] * image_tokens
        if chunk:
            ids += tokenizer.encode(chunk)
    return ids


class ImageProcessor:
    """Images (PIL, uint8 array (H, W, 3), or a file path) -> vision-tower pixels.

    size / preset: the `polymodal.data.image.Preprocess` recipe ("clip", "siglip", "llava").
    anyres_grids: when set (e.g. [(1, 2), (2, 1), (2, 2)]), each image becomes a base view plus
    the tiles of its best-fitting grid (LLaVA-NeXT), i.e. several (3, size, size) tensors.
    root: the folder relative paths are resolved under (paths may not escape it).
    """

    def __init__(self, size: int, preset: str = "clip", anyres_grids: Sequence[tuple[int, int]] | None = None,
                 root: str | Path | None = None):
        self.size = size
        self.preset = preset
        self.anyres_grids = [tuple(g) for g in anyres_grids] if anyres_grids else None
        self.root = root
        self._preprocess = Preprocess.preset(preset, size)

    @classmethod
    def for_model(cls, config, preset: str | None = None, **kwargs) -> "ImageProcessor":
        """The processor for an `MMLLMConfig`: its vision tower's native resolution and, unless
        `preset` overrides it, its `image_preset`."""
        return cls(config.image_size, preset or config.image_preset, **kwargs)

    def _to_pil(self, image) -> Image.Image:
        if isinstance(image, Image.Image):
            return image
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"ImageProcessor: arrays must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
            return Image.fromarray(image, mode="RGB")
        if isinstance(image, (str, Path)):
            return load_image(image, root=self.root)
        raise TypeError(f"ImageProcessor: expected a PIL image, a uint8 array or a path, got {type(image).__name__}")

    def views(self, image) -> list[torch.Tensor]:
        """All views of one image: [pixels (3, size, size)], or base + tiles with `anyres_grids`."""
        pil = self._to_pil(image)
        if not self.anyres_grids:
            return [self._preprocess(pil)]
        grid = select_grid(pil.size, self.anyres_grids, self.size)
        return [self._preprocess(view) for view in tile_image(pil, grid, self.size)]

    def __call__(self, image) -> torch.Tensor:
        """One image -> (3, size, size); with anyres, (1 + rows * cols, 3, size, size)."""
        views = self.views(image)
        return views[0] if not self.anyres_grids else torch.stack(views)

    def batch(self, images: Sequence) -> torch.Tensor:
        """Several images (no anyres) -> (N, 3, size, size)."""
        if self.anyres_grids:
            raise ValueError("ImageProcessor.batch: anyres images have varying view counts; call views() per image")
        return torch.stack([self._preprocess(self._to_pil(im)) for im in images])
