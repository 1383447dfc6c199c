"""Family `unified`: one decoder LM that reads and writes text and images as discrete tokens.

Chameleon (arXiv:2405.09818), Emu3 (arXiv:2409.18869), AnyGPT and DALL-E 1 share one layout: an
image tokenizer turns pixels into a grid of codebook ids, the ids join the text vocabulary, and
a single next-token transformer is trained over documents that interleave both. Here that is a
`DecoderLM` (the same backbone as the `lm` family) plus a frozen `ImageVQ` part.

Vocabulary layout (our own models): ids [0, T) are the text tokenizer's (its special tokens
`<|image_start|>`, `<|image_end|>` and the prompt placeholder `<image>` included); code c is
id T + c; with `row_end` the id T + K ends every row of codes, Emu3-style, so the h x w layout is
explicit in the sequence. An image is the span

    <|image_start|> c(0,0) .. c(0,w-1) [row_end] ... c(h-1,w-1) [row_end] <|image_end|>

Imported Chameleon checkpoints map codes through an explicit table instead (`code_table`: their
image tokens sit inside the BPE vocabulary), without row ends.

Shapes: an image span holds `span_tokens = h * (w + row_end)` tokens between its two markers,
`image_tokens = span_tokens + 2` in all (what one `<image>` in a chat prompt expands to).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from polymodal.backbones.decoder import DecoderConfig, DecoderLM, LMOutput
from polymodal.bounds import MAX_IMAGE_SIZE, MAX_VOCAB, check_int, check_token_id
from polymodal.errors import ConfigError, UsageError
from polymodal.models.registry import Family, Recipe, register
from polymodal.sequence import Document, PackedBatch, Segment, pack_documents
from polymodal.tokenizers.image_vq import ImageVQ, ImageVQConfig, image_vq_tiny


@dataclass
class UnifiedConfig:
    """The LM, the image tokenizer (a part) and where image codes live in the vocabulary.

    text_vocab_size: ids below it are text (the text tokenizer's vocabulary with its specials).
    image_start_id / image_end_id: the markers around every image span; image_token_id: the
        `<image>` placeholder of chat prompts (never generated). row_end: a row-end token after
        each row of codes. code_table: explicit code -> token id map (imported Chameleon); None
        puts code c at text_vocab_size + c. image_size: the side images are tokenized at;
        image_preset: the `polymodal.data.image.Preprocess` recipe for chat images (pixels in [-1, 1]).
    """

    lm: DecoderConfig = field(default_factory=DecoderConfig)
    image_tokenizer: ImageVQConfig = field(default_factory=ImageVQConfig)
    text_vocab_size: int = 0
    image_start_id: int = 0
    image_end_id: int = 0
    image_token_id: int = 0
    row_end: bool = True
    code_table: list[int] | None = None
    image_size: int = 64
    image_preset: str = "siglip"

    def __post_init__(self) -> None:
        """Check the vocabulary layout against the LM and the tokenizer before anything is built."""
        owner = "UnifiedConfig"
        vocab = self.lm.vocab_size
        check_int(owner, "text_vocab_size", self.text_vocab_size, 1, vocab)
        for name in ("image_start_id", "image_end_id", "image_token_id"):
            check_token_id(owner, name, getattr(self, name), self.text_vocab_size)
        check_int(owner, "image_size", self.image_size, 1, MAX_IMAGE_SIZE)
        factor = self.image_tokenizer.downsample_factor
        if self.image_size % factor:
            raise ConfigError(f"{owner}.image_size {self.image_size} is not a multiple of the image tokenizer's "
                              f"downsampling factor {factor}")
        codes = self.codebook_size
        if self.code_table is not None:
            if self.row_end:
                raise ConfigError(f"{owner}.row_end: an explicit code_table layout has no row-end token")
            if len(self.code_table) != codes:
                raise ConfigError(f"{owner}.code_table maps {len(self.code_table)} codes but the image tokenizer's "
                                  f"codebook has {codes}")
            for i, token in enumerate(self.code_table):
                check_token_id(owner, f"code_table[{i}]", token, vocab)
            markers = {self.image_start_id, self.image_end_id, self.image_token_id}
            if len(set(self.code_table)) != codes or markers & set(self.code_table):
                raise ConfigError(f"{owner}.code_table must map each code to its own token id, apart from the "
                                  f"image markers {sorted(markers)}")
        elif self.text_vocab_size + codes + self.row_end > vocab:
            raise ConfigError(f"{owner}: the LM's vocabulary ({vocab}) has no room for the image codebook: "
                              f"{self.text_vocab_size} text ids + {codes} codes"
                              f"{' + 1 row end' if self.row_end else ''} are needed")
        check_int(owner, "codebook_size", codes, 1, MAX_VOCAB)

    @property
    def codebook_size(self) -> int:
        """Codes in the image tokenizer's codebook."""
        return self.image_tokenizer.codebook_size

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w): codes per column and per row of one image at `image_size`."""
        side = self.image_size // self.image_tokenizer.downsample_factor
        return side, side

    @property
    def span_tokens(self) -> int:
        """Tokens between an image's start and end markers: h * w codes plus h row ends."""
        h, w = self.grid
        return h * (w + int(self.row_end))

    @property
    def conditioning(self) -> str:
        """How image generation is conditioned (read by `polymodal.eval.generation`): on text."""
        return "text"

    @property
    def row_end_id(self) -> int | None:
        """The row-end token id (None without row ends)."""
        return self.text_vocab_size + self.codebook_size if self.row_end else None

    def code_ids(self) -> torch.Tensor:
        """(K,) long: the token id of every code."""
        if self.code_table is not None:
            return torch.tensor(self.code_table, dtype=torch.long)
        return torch.arange(self.codebook_size) + self.text_vocab_size


class UnifiedModel(nn.Module):
    """A decoder LM over text and image tokens plus its frozen image tokenizer.

    forward(input_ids (B, T) | packed, ...) -> `LMOutput` (logits over the whole vocabulary),
    exactly the `DecoderLM` call styles. Images enter as tokens: `image_span(pixels)` gives the
    ids of one image's span, `images_from_spans(ids)` decodes generated spans back to pixels.
    Generation (text, images, both interleaved) lives in `polymodal.infer.unified`.
    """

    family = "unified"

    def __init__(self, config: UnifiedConfig):
        super().__init__()
        self.config = config
        self.lm = DecoderLM(config.lm)
        self.image_tokenizer = ImageVQ(config.image_tokenizer).requires_grad_(False)
        code_ids = config.code_ids()
        token_to_code = torch.full((config.lm.vocab_size,), -1, dtype=torch.long)
        token_to_code[code_ids] = torch.arange(config.codebook_size)
        # Derived from the config, so not saved: a checkpoint holds weights only.
        self.register_buffer("code_ids", code_ids, persistent=False)
        self.register_buffer("token_to_code", token_to_code, persistent=False)

    # --- the LM contract (`polymodal.infer.generate`, chat, objectives) ---

    def forward(self, input_ids: torch.Tensor | None = None, **kwargs) -> LMOutput:
        """The LM's forward; see `DecoderLM.forward`."""
        return self.lm(input_ids, **kwargs)

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head: hidden (..., D) -> logits (..., V)."""
        return self.lm.output_logits(hidden)

    def new_kv_cache(self, batch_size: int, max_len: int):
        """An empty KV cache for the LM."""
        return self.lm.new_kv_cache(batch_size, max_len)

    @property
    def image_tokens(self) -> int:
        """Prompt positions one image takes: start marker, codes (+ row ends), end marker."""
        return self.config.span_tokens + 2

    # --- images <-> tokens ---

    def codes_to_span(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> span ids (B, span_tokens + 2), markers included."""
        c = self.config
        b, h, w = codes.shape
        if (h, w) != c.grid:
            raise ValueError(f"codes of a {h}x{w} grid given; this model's images are {c.grid[0]}x{c.grid[1]} codes")
        ids = self.code_ids[codes]  # (B, h, w)
        if c.row_end:
            ids = torch.cat([ids, ids.new_full((b, h, 1), c.row_end_id)], dim=2)  # (B, h, w + 1)
        ids = ids.reshape(b, -1)
        start, end = ids.new_full((b, 1), c.image_start_id), ids.new_full((b, 1), c.image_end_id)
        return torch.cat([start, ids, end], dim=1)

    def span_to_codes(self, span: torch.Tensor) -> torch.Tensor:
        """span ids (B, span_tokens) between the markers -> codes (B, h, w); a non-code id where a
        code belongs is an error naming it."""
        c = self.config
        h, w = c.grid
        grid = span.reshape(span.shape[0], h, -1)[:, :, :w]  # (B, h, w): row ends dropped
        codes = self.token_to_code[grid]
        if bool((codes < 0).any()):
            bad = grid[codes < 0][0].item()
            raise ValueError(f"token id {bad} stands where an image code belongs (codes are ids "
                             f"{int(self.code_ids.min())}..{int(self.code_ids.max())})")
        return codes

    def interleaved_ids(self, parts: list) -> list[int]:
        """Token ids of an interleaved document: parts are text id lists and code grids (h, w)."""
        ids: list[int] = []
        for part in parts:
            ids += self.codes_to_span(part[None])[0].tolist() if torch.is_tensor(part) else list(part)
        return ids

    def parse_interleaved(self, ids: list[int]) -> list:
        """The inverse of `interleaved_ids`: ids -> [text id list | codes (h, w), ...] in order.
        An image span must be whole (start marker, span_tokens ids, end marker)."""
        c = self.config
        parts: list = []
        text: list[int] = []
        i = 0
        while i < len(ids):
            if ids[i] != c.image_start_id:
                text.append(ids[i])
                i += 1
                continue
            end = i + 1 + c.span_tokens
            if end >= len(ids) or ids[end] != c.image_end_id:
                raise ValueError(f"the image span starting at position {i} is not {c.span_tokens} tokens closed by "
                                 f"the end marker {c.image_end_id}")
            if text:
                parts.append(text)
                text = []
            parts.append(self.span_to_codes(torch.tensor([ids[i + 1:end]], device=self.code_ids.device))[0])
            i = end + 1
        if text:
            parts.append(text)
        return parts

    @torch.no_grad()
    def image_codes(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S) in [-1, 1], S = image_size -> codes (B, h, w)."""
        size = self.config.image_size
        if pixels.shape[-2:] != (size, size):
            raise ValueError(f"images must be {size}x{size} pixels for this model, got "
                             f"{pixels.shape[-2]}x{pixels.shape[-1]}")
        return self.image_tokenizer.encode(pixels)

    def image_span(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S) -> span ids (B, image_tokens)."""
        return self.codes_to_span(self.image_codes(pixels))

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> pixels (B, 3, S, S) in [-1, 1]."""
        return self.image_tokenizer.decode(codes).clamp(-1, 1)

    def with_images(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """ids (B, T) whose `<image>` placeholder runs (image_tokens each) become the images' spans,
        in order; pixel_values (N, 3, S, S) for the N runs."""
        input_ids = input_ids.to(self.code_ids.device)
        placeholder = input_ids == self.config.image_token_id
        runs = int(placeholder.sum()) // self.image_tokens
        given = 0 if pixel_values is None else len(pixel_values)
        if runs * self.image_tokens != int(placeholder.sum()) or runs != given:
            raise UsageError(f"the prompt holds {int(placeholder.sum())} image placeholders ({self.image_tokens} per "
                             f"image) but {given} image(s) were given")
        if not runs:
            return input_ids
        ids = input_ids.clone()
        ids[placeholder] = self.image_span(pixel_values.to(self.code_ids.device)).reshape(-1).to(ids.dtype)
        return ids

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, D) of ids whose `<image>` runs hold `pixel_values`' spans."""
        return self.lm.embed_tokens(self.with_images(input_ids, pixel_values))

    def generation_suppressed_tokens(self) -> tuple[int, ...]:
        """Ids a text reply never holds: every code, the row end, the image markers and the placeholder."""
        c = self.config
        extra = [c.image_start_id, c.image_end_id, c.image_token_id] + ([c.row_end_id] if c.row_end else [])
        return tuple(sorted(set(self.code_ids.tolist()) | set(extra)))

    @torch.no_grad()
    def generate(self, input_ids, pixel_values: torch.Tensor | None = None, **kwargs) -> list[list[int]]:
        """Text replies (chat, captioning, VQA) to prompts with `<image>` placeholder runs; kwargs as
        `polymodal.infer.generate.generate`. Image tokens are suppressed: a reply is text only here
        (`polymodal.infer.unified.generate_interleaved` lets the model draw)."""
        from polymodal.infer.generate import generate, left_pad

        ids, mask = left_pad(input_ids, pad_id=0)
        device = self.code_ids.device
        embeds = self.embed(ids.to(device), None if pixel_values is None else pixel_values.to(device))
        return generate(self, ids, inputs_embeds=embeds, attention_mask=mask,
                        suppress_tokens=self.generation_suppressed_tokens(), **kwargs)

    def generate_image_tensors(self, prompts, tokenizer=None, **kwargs) -> torch.Tensor:
        """Pixels of images drawn for text prompts (`polymodal generate`, `polymodal.infer.images`):
        see `polymodal.infer.unified.generate_image_tensors`."""
        from polymodal.infer.unified import generate_image_tensors

        if tokenizer is None:
            raise UsageError("a unified model needs its text tokenizer to read prompts")
        return generate_image_tensors(self, tokenizer, prompts, **kwargs)


def unified_tiny() -> UnifiedConfig:
    """A 2-layer LM over 40 text ids + the tiny tokenizer's codes, 16 px images (tests)."""
    tokenizer = image_vq_tiny()
    grid = tokenizer.image_size // tokenizer.downsample_factor
    lm = DecoderConfig(vocab_size=40 + tokenizer.codebook_size + 1, hidden_size=64, intermediate_size=128,
                       num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=4 * (grid * (grid + 1) + 2) + 64)
    return UnifiedConfig(lm=lm, image_tokenizer=tokenizer, text_vocab_size=40, image_start_id=1, image_end_id=2,
                         image_token_id=3, image_size=tokenizer.image_size)


def _example_batch(model: UnifiedModel) -> PackedBatch:
    """Two documents: caption -> image, and image -> caption, packed in one row."""
    c = model.config
    h, w = c.grid
    span = model.codes_to_span(torch.randint(0, c.codebook_size, (1, h, w)))[0]
    text = torch.randint(4, c.text_vocab_size, (6,))
    docs = [Document([Segment("text", tokens=text, target=None), Segment("image", tokens=span)]),
            Document([Segment("image", tokens=span, target=None), Segment("text", tokens=text)])]
    return pack_documents(docs, max_tokens=2 * (len(span) + 6))


UNIFIED = register(Family(
    "unified", UnifiedConfig, UnifiedModel, unified_tiny, _example_batch,
    objective="polymodal.train.objectives:sequence_loss",
    tasks=("complete", "chat", "generate_image"),
    recipes=(Recipe("unified", "polymodal.recipes.unified:UnifiedRecipeConfig", "polymodal.recipes.unified:unified_job",
                    outputs=("eval.json", "samples.png")),),
    evaluate="polymodal.eval.unified:evaluate",
    converters=("polymodal.interop.hf_chameleon:CHAMELEON_CONVERTER",),
    parts=("image_tokenizer",),
))
