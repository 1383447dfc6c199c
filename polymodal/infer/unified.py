"""Any-to-any generation with a `unified` model: text -> image, and interleaved text and images.

Images are drawn token by token inside an image span by a constrained decoder: at a code
position only the K code ids are candidates (the logits are cut to those columns before
sampling), at a row end the row-end token is written, and after exactly h * w codes the end
marker closes the span, so a text id never lands inside an image and every image has its full
grid. Classifier-free guidance runs each prompt twice in one batch, with its caption and with
the empty caption the model was trained on (`condition_dropout`), and samples from
uncond + s * (cond - uncond) on the logits (as Make-A-Scene / LlamaGen do for token models);
s = 1 skips the second half of the batch.

    from polymodal.infer.unified import generate_images, generate_interleaved
    images = generate_images(model, tokenizer, ["a red star above a blue circle"], n=4, seed=0)
    parts = generate_interleaved(model, tokenizer, [{"role": "user", "content": "Draw a green square."}])
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from polymodal.data.conversation import prompt_ids
from polymodal.errors import UsageError
from polymodal.infer.generate import left_pad, sample_next_token
from polymodal.infer.images import to_pil
from polymodal.infer.limits import check_sampling, context_length

DEFAULT_GUIDANCE = 3.0
DEFAULT_IMAGE_TEMPERATURE = 1.0
DEFAULT_BATCH = 16


class _CachedDecoder:
    """Cached decoding of a batch of left-padded prompts, one token per row per `feed`.

    `logits` (R, V) float32: the next-token logits of every row after the prompt / last feed.
    """

    def __init__(self, model, prompts: Sequence[Sequence[int]], max_new: int):
        context = context_length(model)
        longest = max(len(p) for p in prompts)
        if context is not None and longest + max_new > context:
            raise UsageError(f"a prompt of {longest} tokens plus {max_new} new ones exceeds the model's context of "
                             f"{context} tokens")
        self.model = model
        device = next(model.parameters()).device
        ids, mask = left_pad(prompts)
        self.padded = bool((mask == 0).any())
        self.mask = mask.to(device)
        self.cache = model.new_kv_cache(len(prompts), ids.shape[1] + max_new)
        self._run(ids.to(device))

    def _run(self, ids: torch.Tensor) -> None:
        out = self.model(ids, attention_mask=self.mask if self.padded else None, kv_cache=self.cache, logits_to_keep=1)
        self.logits = out.logits[:, -1].float()

    def feed(self, next_ids: torch.Tensor) -> None:
        """Append next_ids (R,) to every row and compute the following logits."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.mask), 1)], dim=1)
        self._run(next_ids[:, None])


def _guided(logits: torch.Tensor, rows: int, guidance: float | None) -> torch.Tensor:
    """Logits (R, V) of the conditional rows, guided by the unconditional rows after them."""
    if guidance is None:
        return logits
    cond, uncond = logits[:rows], logits[rows:]
    return uncond + guidance * (cond - uncond)


def draw_span(model, decoder: _CachedDecoder, rows: int, guidance: float | None, temperature: float, top_k: int,
              top_p: float, generator: torch.Generator | None, progress: bool = False) -> torch.Tensor:
    """Decode one image span for `rows` rows (the decoder has just read each row's start marker;
    with guidance its batch is those rows then their unconditional twins). Returns codes
    (rows, h, w); the decoder has then read the span but not the end marker."""
    c = model.config
    h, w = c.grid
    width = w + int(c.row_end)
    code_ids = model.code_ids
    codes = torch.empty(rows, h * w, dtype=torch.long, device=code_ids.device)
    copies = 1 if guidance is None else 2
    written = 0
    for j in tqdm(range(c.span_tokens), desc="image tokens", disable=not progress, leave=False):
        if c.row_end and j % width == w:
            next_ids = torch.full((rows,), c.row_end_id, dtype=torch.long, device=code_ids.device)
        else:
            logits = _guided(decoder.logits, rows, guidance)[:, code_ids]  # (rows, K): codes only
            code = sample_next_token(logits, temperature, top_k, top_p, generator)
            codes[:, written] = code
            written += 1
            next_ids = code_ids[code]
        decoder.feed(next_ids.repeat(copies))
    return codes.view(rows, h, w)


def image_prompt(model, tokenizer, caption: str) -> list[int]:
    """The ids that ask for an image of `caption`: the chat turn the recipe trains on (user: the
    caption; assistant: the image), up to and including the assistant's image start marker."""
    messages = [{"role": "user", "content": caption}]
    return prompt_ids(tokenizer, messages, model.config.image_token_id, model.image_tokens) + [model.config.image_start_id]


def _check_image_request(n: int, guidance: float, temperature: float, top_k: int, top_p: float, seed: int,
                         batch_size: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"n must be an integer >= 1, got {n!r}")
    if not isinstance(guidance, (int, float)) or not guidance >= 0 or guidance == float("inf"):
        raise UsageError(f"guidance must be a finite number >= 0, got {guidance!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)


@torch.no_grad()
def generate_image_codes(model, tokenizer, prompts: Sequence[str], *, n: int = 1, seed: int = 0,
                         guidance: float = DEFAULT_GUIDANCE, temperature: float = DEFAULT_IMAGE_TEMPERATURE,
                         top_k: int = 0, top_p: float = 1.0, batch_size: int = DEFAULT_BATCH,
                         progress: bool = False) -> torch.Tensor:
    """Codes (len(prompts) * n, h, w) of n images per prompt (prompt-major).

    guidance: classifier-free guidance scale on the logits (1 = none). temperature 0 is greedy.
    Batches run in order from one generator seeded with `seed`: same seed and batch size, same codes.
    """
    _check_image_request(n, guidance, temperature, top_k, top_p, seed, batch_size)
    if isinstance(prompts, str):
        raise UsageError("prompts must be a list of strings (one image set per prompt), got a single string")
    if model.image_tokenizer.config.has_decoder is False:
        raise UsageError("this model's image tokenizer has no decoder (an imported Chameleon checkpoint carries the "
                         "encoder only): it reads images but cannot draw them")
    expanded = [p for p in prompts for _ in range(n)]
    if not expanded:
        raise UsageError("give at least one prompt")
    device = model.code_ids.device
    generator = torch.Generator(device=device).manual_seed(seed)
    guided = None if guidance == 1 else float(guidance)
    unconditional = image_prompt(model, tokenizer, "")
    out = []
    for start in tqdm(range(0, len(expanded), batch_size), desc="images", disable=not progress or len(expanded) <= batch_size):
        chunk = [image_prompt(model, tokenizer, p) for p in expanded[start:start + batch_size]]
        rows = len(chunk)
        batch = chunk + [unconditional] * rows if guided is not None else chunk
        decoder = _CachedDecoder(model, batch, model.config.span_tokens)
        out.append(draw_span(model, decoder, rows, guided, temperature, top_k, top_p, generator, progress))
    return torch.cat(out)


def generate_image_tensors(model, tokenizer, prompts: Sequence[str], *, steps: int | None = None,
                           sampler: str | None = None, size: int | None = None, guidance: float | None = None,
                           **kwargs) -> torch.Tensor:
    """Pixels (len(prompts) * n, 3, S, S) in [-1, 1]; keywords as `generate_image_codes`. steps /
    sampler / size belong to diffusion models (`polymodal generate` passes them through): a token
    model draws exactly its grid of codes at its own size, so setting them is an error."""
    for name, value in (("steps", steps), ("sampler", sampler), ("size", size)):
        if value is not None:
            raise UsageError(f"--{name} applies to diffusion models; a unified token model draws "
                             f"{model.config.grid[0]}x{model.config.grid[1]} codes at {model.config.image_size} px")
    codes = generate_image_codes(model, tokenizer, prompts, guidance=DEFAULT_GUIDANCE if guidance is None else guidance,
                                 **kwargs)
    return model.decode_codes(codes).float().cpu()


def generate_images(model, tokenizer, prompts: Sequence[str], **kwargs) -> list[Image.Image]:
    """n images per prompt (prompt-major) as PIL images; keywords as `generate_image_tensors`."""
    return to_pil(generate_image_tensors(model, tokenizer, prompts, **kwargs))


@torch.no_grad()
def generate_interleaved(model, tokenizer, messages: Sequence[dict], images: Sequence = (), *,
                         max_new_tokens: int = 256, temperature: float = 0.0,
                         image_temperature: float = DEFAULT_IMAGE_TEMPERATURE, top_k: int = 0, top_p: float = 1.0,
                         max_images: int = 4, seed: int = 0) -> list[str | Image.Image]:
    """The model's reply to a chat as an ordered list of text pieces and PIL images.

    The reply is decoded freely (text sampling by `temperature`, codes and row ends excluded);
    when the model writes an image start marker the span is drawn with the constrained decoder
    (`image_temperature`, no guidance), its end marker written, and decoding goes on. Stops at the
    end-of-turn token, after `max_new_tokens` text tokens, or when `max_images` are drawn and
    the model asks for another. images: the chat's input images (as `polymodal.infer.chat`).
    """
    from polymodal.infer.chat import encode_chat, end_of_turn_ids

    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    check_sampling(temperature=image_temperature)
    c = model.config
    prompt = encode_chat(model, tokenizer, messages, images)
    ids = torch.tensor([prompt.ids])
    ids = model.with_images(ids, prompt.pixels)[0].tolist()
    room = max_new_tokens + max_images * (c.span_tokens + 1)
    decoder = _CachedDecoder(model, [ids], room)
    generator = torch.Generator(device=model.code_ids.device).manual_seed(seed)
    may_draw = model.image_tokenizer.config.has_decoder is not False
    banned = torch.tensor([i for i in model.generation_suppressed_tokens()
                           if not (may_draw and i == c.image_start_id)], device=model.code_ids.device)
    eos = end_of_turn_ids(model, tokenizer)
    parts: list[str | Image.Image] = []
    text: list[int] = []
    drawn = 0
    for _ in range(max_new_tokens):
        logits = decoder.logits.index_fill(-1, banned, float("-inf"))
        token = sample_next_token(logits, temperature, top_k, top_p, generator)
        if int(token) in eos:
            break
        decoder.feed(token)
        if int(token) != c.image_start_id:
            text.append(int(token))
            continue
        if drawn == max_images:
            break
        if text:
            parts.append(tokenizer.decode(text, skip_special_tokens=True))
            text = []
        codes = draw_span(model, decoder, 1, None, image_temperature, top_k, top_p, generator)
        parts.extend(to_pil(model.decode_codes(codes).float().cpu()))
        drawn += 1
        decoder.feed(torch.tensor([c.image_end_id], device=model.code_ids.device))
    if text:
        parts.append(tokenizer.decode(text, skip_special_tokens=True))
    return parts

