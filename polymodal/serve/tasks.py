"""From OpenAI request bodies to model work: prompts for the engine, embeddings, images.

Everything here runs off the event loop (a thread pool for encoding, the engine's worker for
the model), and reports a request the model cannot serve as `APIError` 400 naming the field.
What a model can do is asked of its task declaration (`polymodal.models.registry.tasks_of`),
never of its family name.
"""
from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass

import numpy as np
import torch

from polymodal.data.conversation import IMAGE_MARKER
from polymodal.errors import PolymodalError
from polymodal.infer.chat import encode_chat
from polymodal.infer.limits import context_length
from polymodal.models.registry import tasks_of
from polymodal.serve.config import ServeConfig
from polymodal.serve.errors import APIError
from polymodal.serve.images import read_image_url
from polymodal.serve.schemas import ChatCompletionRequest, EmbeddingRequest, ImageGenerationRequest, Message

ROLES = {"developer": "system"}  # OpenAI's newer name for the system role


def require(model, task: str, route: str) -> None:
    """400 unless the model declares `task` (what `route` needs)."""
    tasks = tasks_of(model)
    if task not in tasks:
        can = ", ".join(tasks) or "nothing servable"
        raise APIError(400, f"{route} needs a model that can {task}; this {getattr(model, 'family', 'model')!r} "
                       f"model can: {can}", "model", "unsupported_task")


@dataclass
class Prompt:
    """An encoded text request: prompt ids, its images' pixels (N, 3, H, W) or None, the reply length."""

    ids: list[int]
    pixels: torch.Tensor | None
    max_tokens: int
    images: int = 0


def chat_messages(messages: list[Message], config: ServeConfig) -> tuple[list[dict], list]:
    """OpenAI messages -> (polymodal messages with "<image>" markers where image parts stand, PIL images)."""
    out, images = [], []
    for i, message in enumerate(messages):
        if isinstance(message.content, str):
            out.append({"role": ROLES.get(message.role, message.role), "content": message.content})
            continue
        pieces = []
        for j, part in enumerate(message.content):
            param = f"messages[{i}].content[{j}]"
            if part.type == "text":
                pieces.append(part.text)
                continue
            if message.role != "user":
                raise APIError(400, f"{param}: only user messages may hold images", param, "invalid_value")
            if len(images) >= config.max_images:
                raise APIError(400, f"{param}: more than {config.max_images} images in one request (--max-images)",
                               param, "too_many_images")
            images.append(read_image_url(part.image_url.url, f"{param}.image_url", config.max_image_pixels,
                                         config.image_root))
            pieces.append(IMAGE_MARKER)
        out.append({"role": ROLES.get(message.role, message.role), "content": "\n".join(pieces)})
    return out, images


def encode_chat_request(model, tokenizer, request: ChatCompletionRequest, config: ServeConfig) -> Prompt:
    """The prompt of a chat request, its images processed at the model's resolution, its length checked."""
    require(model, "chat", "/v1/chat/completions")
    messages, images = chat_messages(request.messages, config)
    try:
        prompt = encode_chat(model, tokenizer, messages, images)
    except (PolymodalError, ValueError) as err:
        raise APIError(400, str(err), "messages", "invalid_value") from err
    max_tokens = request.max_completion_tokens or request.max_tokens
    return Prompt(prompt.ids, prompt.pixels, fit_reply(model, len(prompt.ids), max_tokens, config, "messages"),
                  len(images))


def encode_completion_prompt(model, tokenizer, text: str, max_tokens: int | None, config: ServeConfig,
                             param: str) -> Prompt:
    """A plain-text prompt for /v1/completions (the tokenizer's own special tokens added, as `polymodal complete`)."""
    ids = tokenizer.encode(text, add_special_tokens=True)
    if not ids:
        raise APIError(400, f"{param}: the prompt is empty after tokenization", param, "invalid_value")
    if IMAGE_MARKER in text and hasattr(model, "image_tokens"):
        raise APIError(400, f"{param}: {IMAGE_MARKER} has no image behind it here; send images to "
                       "/v1/chat/completions", param, "invalid_value")
    return Prompt(ids, None, fit_reply(model, len(ids), max_tokens, config, param))


UNKNOWN_CONTEXT_MAX_TOKENS = 4096  # the reply cap when a model's config gives no max_position_embeddings


def fit_reply(model, prompt_tokens: int, max_tokens: int | None, config: ServeConfig, param: str) -> int:
    """The reply length: max_tokens (default `config.default_max_tokens`, cut to the context left);
    400 when the prompt plus the asked max_tokens do not fit the model's context."""
    context = context_length(model)
    if context is None:  # no context to bound the KV cache by: a client may not size it freely
        if max_tokens is not None and max_tokens > UNKNOWN_CONTEXT_MAX_TOKENS:
            raise APIError(400, f"max_tokens: at most {UNKNOWN_CONTEXT_MAX_TOKENS} for a model that does not state its "
                           f"context length, got {max_tokens}", "max_tokens", "invalid_value")
        return max_tokens or config.default_max_tokens
    room = context - prompt_tokens
    if max_tokens is None:
        if room < 1:
            raise APIError(400, f"the prompt is {prompt_tokens} tokens; this model's context is {context} tokens, "
                           "which leaves no room for a reply", param, "context_length_exceeded")
        return min(config.default_max_tokens, room)
    if max_tokens > room:
        raise APIError(400, f"this model's maximum context length is {context} tokens; you asked for "
                       f"{prompt_tokens + max_tokens} ({prompt_tokens} in the prompt, {max_tokens} for the reply): "
                       "shorten the prompt or lower max_tokens", param, "context_length_exceeded")
    return max_tokens


def embedding_inputs(request: EmbeddingRequest, config: ServeConfig) -> list:
    """The request's items: text strings stay, image parts become checked PIL images."""
    items, images = [], 0
    for i, item in enumerate(request.input):
        if isinstance(item, str):
            items.append(item)
            continue
        images += 1
        if images > config.max_images:
            raise APIError(400, f"input[{i}]: more than {config.max_images} images in one request (--max-images)",
                           f"input[{i}]", "too_many_images")
        items.append(read_image_url(item.image_url.url, f"input[{i}].image_url", config.max_image_pixels,
                                    config.image_root))
    return items


def embed_items(model, tokenizer, items: list, dimensions: int | None) -> tuple[np.ndarray, int]:
    """(L2-normalised embeddings (N, E) of texts and images, in order; prompt tokens read).

    The model's `embed` task contract: `encode_text` and/or `encode_image` (a contrastive dual
    encoder: texts through its text tower, images at its tower's resolution).
    """
    from polymodal.data.dual_encoder import image_array, pixels_from_uint8
    from polymodal.eval.contrastive import embed_token_rows, encode_images, text_inputs

    config = model.config
    texts = [(i, item) for i, item in enumerate(items) if isinstance(item, str)]
    pictures = [(i, item) for i, item in enumerate(items) if not isinstance(item, str)]
    out: list = [None] * len(items)
    tokens = 0
    if texts:
        if not hasattr(model, "encode_text"):
            raise APIError(400, "this model embeds images only; give image_url items", "input", "invalid_value")
        ids, mask, needed, limit = text_inputs(model, tokenizer, [t for _, t in texts])
        for (i, _), count in zip(texts, needed):
            if count > limit:
                raise APIError(400, f"input[{i}] is {count} tokens; this model's text tower reads at most {limit}",
                               f"input[{i}]", "context_length_exceeded")
            tokens += count
        for (i, _), vector in zip(texts, embed_token_rows(model, ids, mask)):
            out[i] = vector
    if pictures:
        if not hasattr(model, "encode_image"):
            raise APIError(400, "this model embeds text only", "input", "invalid_value")
        channels = config.cnn.num_channels if getattr(config, "image_tower", "") == "cnn" else 3
        arrays = np.stack([image_array(image, config.image_size, channels) for _, image in pictures])
        for (i, _), vector in zip(pictures, encode_images(model, pixels_from_uint8(arrays))):
            out[i] = vector
    vectors = torch.stack(out).numpy().astype(np.float32)
    if dimensions is not None and dimensions != vectors.shape[1]:
        raise APIError(400, f"dimensions={dimensions}: this model's embeddings have {vectors.shape[1]} dimensions "
                       "and cannot be shortened", "dimensions", "invalid_value")
    return vectors, tokens


def embedding_json(vector: np.ndarray, encoding: str):
    """One embedding as OpenAI sends it: a list of floats, or base64 of little-endian float32."""
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def native_image_side(model) -> int | None:
    """The side of the images a generator draws by default: a token model's `config.image_size`, or
    a diffusion model's denoiser sample decoded to pixels; None when it cannot be told."""
    config = model.config
    side = getattr(config, "image_size", None)
    if isinstance(side, int):
        return side
    try:
        sample = torch.zeros(1, config.sample_channels, config.sample_size, config.sample_size,
                             device=next(model.parameters()).device)
        with torch.no_grad():
            return int(model.to_pixels(sample).shape[-1])
    except (AttributeError, PolymodalError, ValueError, RuntimeError):
        return None


def image_size_argument(request: ImageGenerationRequest, native: int | None, model) -> int | None:
    """The `size=` to pass `generate_images` for the request's "WxH" size (None: the model's own).

    Square sizes only. Another side than the native one is passed to models that sample at any
    size (diffusion: the denoiser's side scales with the pixels), up to twice the native side.
    """
    if request.size in (None, "auto"):
        return None
    width, _, height = request.size.lower().partition("x")
    if not (width.isdigit() and height.isdigit()) or width != height:
        raise APIError(400, f"size must be 'auto' or a square 'NxN', got {request.size!r}"
                       + (f"; this model draws {native}x{native}" if native else ""), "size", "invalid_value")
    side = int(width)
    if side == native:
        return None
    sample = getattr(model.config, "sample_size", None) if native else None
    if native is None or not isinstance(sample, int) or side > 2 * native or side % (native // sample):
        shown = f"{native}x{native}" if native else "its own size"
        raise APIError(400, f"size {request.size} is not supported by this model; it draws {shown}", "size",
                       "unsupported_size")
    return side // (native // sample)


def draw(model, tokenizer, prompt: str, n: int, seed: int | None, size: int | None):
    """n PIL images for `prompt` (runs on the engine's worker); a refused size or prompt is a 400."""
    from polymodal.infer.images import generate_images

    try:
        return generate_images(model, [prompt], tokenizer, n=n, seed=secrets.randbits(31) if seed is None else seed,
                               size=size)
    except PolymodalError as err:  # a refused prompt or size; anything else is the server's 500
        raise APIError(400, str(err), "size" if size is not None else "prompt", "invalid_value") from err
