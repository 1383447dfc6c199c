"""Family `flamingo`: a frozen decoder LM that reads images through gated cross-attention (arXiv:2204.14198).

Flamingo keeps a pretrained LM and a vision encoder frozen and learns two things between them:
a Perceiver resampler that turns each image's features into a few latent tokens, and *gated
cross-attention dense* layers inserted before every k-th decoder layer (open_flamingo's
`cross_attn_every_n_layers`: before layer i when (i + 1) % k == 0):

    y = y + tanh(alpha_xattn) * CrossAttn(LN(y), media)      # text queries, image latents as keys/values
    y = y + tanh(alpha_ffw)   * FFW(LN(y))

with both alphas initialised to 0, so the wrapped LM computes exactly what it did before training.
Images sit in the text stream as one `<image>` marker token each (interleaved documents, e.g.
"<image>\\nQ: ...\\nA: red\\n<image>\\nQ: ..."); every text position cross-attends only to the
latents of the most recent image at or before it in its document (the paper's "only attend to
the immediately preceding image"), which is what lets a model trained on interleaved data answer
after a few shots of (image, answer) pairs. A position with no image before it skips the gated
layers entirely (the paper still applies the gated feed-forward there): so text before the first
image, and text-only prompts, get exactly the frozen LM's output, packed or not.

Parts: the vision tower of the shared encoder table and its feature selection (as `mmllm`, whose
config this extends), the `resampler` projector (`num_layers` > 1 is Perceiver-style) into the
LM's width, the unchanged `DecoderLM`, and `xattn` (the gated layers), which run as forward
pre-hooks on the chosen decoder layers: the decoder is not forked, its checkpoint names stay its own.

Shapes: input_ids (B, T) holding one marker per image, pixel_values (N, C, H, W) in reading order
-> logits (B, T, V); packed batches carry the pixels in their image segments (length 1).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from polymodal.backbones.decoder import DecoderLM, LMOutput
from polymodal.bounds import MAX_INTERMEDIATE, MAX_LAYERS, check_int
from polymodal.errors import ConfigError
from polymodal.models.mmllm import MMLLMConfig, build_vision_tower, tower_features
from polymodal.models.registry import Family, Recipe, register
from polymodal.nn.attention import Attention
from polymodal.nn.kv_cache import KVCache
from polymodal.nn.mlp import GeluMLP
from polymodal.projectors import ProjectorConfig, build_projector
from polymodal.sequence import Document, PackedBatch, Segment, pack_documents


@dataclass
class FlamingoConfig(MMLLMConfig):
    """An `MMLLMConfig` (vision tower, LM, projector, `<image>` id, pixel preset) for Flamingo.

    cross_attention_every: k, a gated cross-attention layer before every k-th decoder layer.
    xattn_intermediate: the gated feed-forward's hidden width (0: 4 x the LM width).
    The projector must be the "resampler" (the Perceiver resampler); `image_token_id` is a real
    token of the LM's vocabulary (the marker is embedded like text); `image_lora` stays off.
    """

    projector: ProjectorConfig = field(default_factory=lambda: ProjectorConfig(
        kind="resampler", num_queries=8, num_layers=2, num_heads=8))
    cross_attention_every: int = 1
    xattn_intermediate: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = "FlamingoConfig"
        check_int(owner, "cross_attention_every", self.cross_attention_every, 1, min(MAX_LAYERS, self.lm.num_layers))
        check_int(owner, "xattn_intermediate", self.xattn_intermediate, 0, MAX_INTERMEDIATE)
        if self.projector.kind != "resampler":
            raise ConfigError(f"{owner}.projector.kind must be 'resampler' (the Perceiver resampler), "
                              f"got {self.projector.kind!r}")
        check_int(owner, "image_token_id", self.image_token_id, 0, self.lm.vocab_size - 1)
        if self.image_lora.rank:
            raise ConfigError(f"{owner}.image_lora: Flamingo reads images by cross-attention, not at image "
                              "positions; set image_lora.rank to 0")

    @property
    def fused_layers(self) -> list[int]:
        """Indices of the decoder layers a gated cross-attention layer runs before."""
        k = self.cross_attention_every
        return [i for i in range(self.lm.num_layers) if (i + 1) % k == 0]


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's gated xattn-dense layer. x (B, T, D), media (B, S, D_m), mask (B, 1, T, S) bool,
    has_media (B, T, 1) -> (B, T, D); tanh gates start at 0 (the identity)."""

    def __init__(self, dim: int, media_dim: int, num_heads: int, intermediate: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, kv_dim=media_dim)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ffw_norm = nn.LayerNorm(dim)
        self.ffw = GeluMLP(dim, intermediate, bias=False)
        self.ffw_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, media: torch.Tensor, mask: torch.Tensor, has_media: torch.Tensor) -> torch.Tensor:
        attended = self.attn(self.attn_norm(x), context=media, mask=mask)  # (B, T, D)
        x = x + self.attn_gate.tanh() * attended * has_media
        return x + self.ffw_gate.tanh() * self.ffw(self.ffw_norm(x)) * has_media


class MediaKVCache(KVCache):
    """A KV cache that also keeps the prompt's image latents (N, K, D) and each row's most recent
    image (B,), so decoding steps (text only) keep attending to that image."""

    media: torch.Tensor | None = None
    last_image: torch.Tensor | None = None


def media_index_from_ids(input_ids: torch.Tensor, image_token_id: int, valid: torch.Tensor) -> torch.Tensor:
    """(B, T) long: the reading-order index of the most recent image marker at or before each
    position (images counted row by row over the valid positions), -1 where there is none."""
    slots = (input_ids == image_token_id) & valid
    seen = slots.long().cumsum(1)  # (B, T) markers so far in the row
    per_row = slots.long().sum(1)
    offset = per_row.cumsum(0) - per_row  # images in earlier rows
    return torch.where(seen > 0, offset[:, None] + seen - 1, torch.full_like(seen, -1))


def media_index_from_packed(packed: PackedBatch) -> torch.Tensor:
    """(R, L) long: the index (layout order) of the most recent image segment at or before each
    position within its own document, -1 where there is none."""
    images = [p for p in packed.placements if p.segment.modality == "image"]
    marks = torch.full_like(packed.document_ids, -1)
    for j, p in enumerate(images):
        marks[p.row, p.start] = j
    latest = marks.cummax(dim=1).values  # layout order rises along a row: the running max is the latest
    if not images:
        return latest
    image_document = torch.tensor([p.document for p in images], device=latest.device)
    same = image_document[latest.clamp(min=0)] == packed.document_ids
    return torch.where((latest >= 0) & same, latest, torch.full_like(latest, -1))


class Flamingo(nn.Module):
    """Vision tower -> Perceiver resampler -> gated cross-attention into a frozen `DecoderLM` (module docstring).

    vision / lm / projector: built parts to use instead of building them from the config.
    """

    family = "flamingo"

    def __init__(self, config: FlamingoConfig, vision: nn.Module | None = None, lm: DecoderLM | None = None,
                 projector: nn.Module | None = None):
        super().__init__()
        self.config = config
        c = config.lm
        self.vision = vision if vision is not None else build_vision_tower(config)
        self.lm = lm if lm is not None else DecoderLM(c)
        self.projector = projector if projector is not None else build_projector(
            config.projector, config.vision_width, c.hidden_size)
        hidden = config.xattn_intermediate or 4 * c.hidden_size
        self.xattn = nn.ModuleList(GatedCrossAttentionBlock(c.hidden_size, c.hidden_size, c.num_heads, hidden)
                                   for _ in config.fused_layers)
        # Set for the duration of one forward: (media (B, S, D), mask (B, 1, T, S), has_media (B, T, 1)).
        self._media: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        for slot, index in enumerate(config.fused_layers):
            self.lm.layers.layers[index].register_forward_pre_hook(functools.partial(self._fuse, slot),
                                                                   with_kwargs=True)

    def _fuse(self, slot: int, _layer: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook of a fused decoder layer: its input goes through gated layer `slot` first."""
        if self._media is None:
            return None
        return (self.xattn[slot](args[0], *self._media), *args[1:]), kwargs

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, C, H, W) -> resampled latents in LM width (N, K, D)."""
        return self.projector(tower_features(self.vision, self.config, pixel_values))

    def _media_inputs(self, media: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The gated layers' inputs from latents (N, K, D) and a (B, T) most-recent-image index."""
        n, k, d = media.shape
        b = index.shape[0]
        key_image = torch.arange(n, device=index.device).repeat_interleave(k)  # (N * K,)
        has = index >= 0  # (B, T)
        # A position without an image would see no key (softmax of nothing is NaN): it may see
        # all of them, and `has_media` zeroes what it reads.
        mask = (index[:, :, None] == key_image) | ~has[:, :, None]  # (B, T, N * K)
        keys = media.reshape(1, n * k, d).expand(b, -1, -1)
        return keys, mask.unsqueeze(1), has.unsqueeze(-1).to(media.dtype)

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                packed: PackedBatch | None = None, kv_cache: KVCache | None = None, logits_to_keep: int = 0,
                logits: bool = True, inputs_embeds: torch.Tensor | None = None) -> LMOutput:
        """Run the model; see `DecoderLM.forward` for the LM arguments. With `packed`, ids come from
        the batch and pixels from its image segments; with a `MediaKVCache`, decoding steps reuse
        the prompt's images. inputs_embeds: refused (the image markers are found in the ids; it is
        accepted so `polymodal.infer.generate` can call every model alike)."""
        if inputs_embeds is not None:
            raise ValueError("Flamingo takes input_ids (the image markers are read from them), not inputs_embeds")
        if packed is not None:
            input_ids = packed.token_ids
            images = [p.segment.data for p in packed.placements if p.segment.modality == "image"]
            pixel_values = torch.stack(images).to(input_ids.device) if images else None
            index = media_index_from_packed(packed)
        else:
            valid = torch.ones_like(input_ids, dtype=torch.bool)
            if attention_mask is not None and attention_mask.shape == input_ids.shape:
                valid = attention_mask.bool()
            index = media_index_from_ids(input_ids, self.config.image_token_id, valid)
        media = None
        markers = int(index.max()) + 1 if index.numel() else 0  # indices count the markers from 0
        if pixel_values is not None and len(pixel_values):
            if markers != len(pixel_values):
                raise ValueError(f"{len(pixel_values)} images were given but the input holds image markers "
                                 f"(id {self.config.image_token_id}) for {markers}")
            media = self.encode_images(pixel_values)  # (N, K, D)
            if isinstance(kv_cache, MediaKVCache):
                kv_cache.media, kv_cache.last_image = media, index[:, -1]
        elif markers:
            raise ValueError(f"the input holds image markers (id {self.config.image_token_id}) but no pixel_values")
        elif isinstance(kv_cache, MediaKVCache) and kv_cache.media is not None:
            media, index = kv_cache.media, kv_cache.last_image[:, None].expand_as(input_ids)
        self._media = None if media is None else self._media_inputs(media, index)
        try:
            return self.lm(input_ids, attention_mask=attention_mask, positions=positions, packed=packed,
                           kv_cache=kv_cache, logits_to_keep=logits_to_keep, logits=logits)
        finally:
            self._media = None

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head: hidden states (..., D) -> logits (..., V)."""
        return self.lm.output_logits(hidden)

    def new_kv_cache(self, batch_size: int, max_len: int) -> MediaKVCache:
        """An empty cache for the LM that also holds the prompt's images."""
        c, p = self.config.lm, self.lm.embed_tokens.weight
        return MediaKVCache(c.num_layers, batch_size, c.num_kv_heads, max_len, c.resolved_head_dim, p.dtype, p.device)

    @torch.no_grad()
    def generate(self, input_ids, pixel_values: torch.Tensor | None = None, **kwargs) -> list[list[int]]:
        """Continue prompts (ragged id lists holding one marker per image; images (N, C, H, W) in
        reading order); kwargs as `polymodal.infer.generate.generate`. The marker is never generated."""
        from polymodal.infer.generate import generate

        prefill = {} if pixel_values is None else {"pixel_values": pixel_values.to(self.lm.embed_tokens.weight.device)}
        return generate(self, input_ids, prefill_inputs=prefill, suppress_tokens=(self.config.image_token_id,),
                        **kwargs)


def flamingo_tiny() -> FlamingoConfig:
    """`mmllm_tiny`'s tower and LM with a 2-layer Perceiver resampler of 4 latents, xattn before every layer."""
    from polymodal.models.mmllm import mmllm_tiny

    fields = {f.name: getattr(mmllm_tiny(), f.name) for f in dataclasses.fields(MMLLMConfig)}
    fields["projector"] = ProjectorConfig(kind="resampler", num_queries=4, num_layers=2, num_heads=4)
    fields["image_token_id"] = 250
    return FlamingoConfig(**fields)


def _example_batch(model: Flamingo) -> PackedBatch:
    """Two interleaved documents (image, prompt, answer, image, prompt, answer) in one row; the
    answers are the targets."""
    c = model.config
    docs = []
    for lengths in ((3, 2), (2, 4)):
        segments = []
        for prompt, answer in (lengths, lengths[::-1]):
            segments += [Segment("image", tokens=[c.image_token_id], data=torch.randn(3, c.image_size, c.image_size),
                                 target=None),
                         Segment("text", tokens=torch.randint(0, c.image_token_id, (prompt,)), target=None),
                         Segment("text", tokens=torch.randint(0, c.image_token_id, (answer,)))]
        docs.append(Document(segments))
    return pack_documents(docs, max_tokens=64)


FLAMINGO = register(Family(
    "flamingo", FlamingoConfig, Flamingo, flamingo_tiny, _example_batch,
    objective="polymodal.train.objectives:sequence_loss",
    tasks=("complete",),
    recipes=(Recipe("flamingo", "polymodal.recipes.flamingo:FlamingoRecipeConfig",
                    "polymodal.recipes.flamingo:flamingo_job"),),
    evaluate="polymodal.eval.flamingo:evaluate",
))
