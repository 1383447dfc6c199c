"""The `mmllm` family: vision encoder -> input projector -> decoder LM (LLaVA, Qwen-VL, BLIP-2, MiniGPT-4).

Images enter the token stream HF-LLaVA style: the prompt holds K copies of the `<image>` token
id per image (K = the projector's token count), and the projected image features replace those
positions' embeddings, image by image in reading order. The same rule serves plain (B, T)
batches, packed rows (`PackedBatch`, whose image segments carry the pixels) and generation.
With `image_lora`, the LM carries LoRA adapters that act on those image positions only.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from polymodal.backbones.decoder import DecoderConfig, DecoderLM, LMOutput
from polymodal.bounds import MAX_VOCAB, check_int
from polymodal.data.conversation import IMAGE_MARKER
from polymodal.encoders.convnet import ConvNetConfig
from polymodal.encoders.gridpool import GridPoolConfig
from polymodal.encoders.table import build_encoder, encoder_config, encoder_spec
from polymodal.encoders.vit import ViTConfig
from polymodal.models.registry import Family, Recipe, register
from polymodal.nn.lora import LoRAConfig, apply_lora, lora_parameters, token_gated_lora
from polymodal.projectors import ProjectorConfig, build_projector
from polymodal.sequence import Document, PackedBatch, Segment, pack_documents


@dataclass
class MMLLMConfig:
    """vision / lm / projector sub-configs; which ViT layer feeds the projector and whether its
    class token is dropped (LLaVA: layer -2, patches only); the `<image>` placeholder token id.

    vision_tower: an image encoder of the shared table (`polymodal.encoders.table`) that gives a
    token grid: "vit" (`vision`, the ViT / CLIP / SigLIP layout), "cnn" (`cnn`, the
    contrastive family's convolutional tower, whose final feature map is the token grid) or
    "gridpool" (`gridpool`, one convolution pooled into a token per grid cell; the quickstart's
    fixed-feature tower). The convolutional towers have no layers to select, so
    `vision_feature_layer` must then be -1.
    image_preset: the pixel preprocessing the vision tower expects (`polymodal.data.image`
    presets: "clip" mean/std, "siglip" = [-1, 1], "llava" = clip on a padded square); training,
    evaluation and chat all read it from here, so they cannot disagree.
    image_lora: LoRA adapters on the LM that act on the image positions only (Partial LoRA, as
    in InternLM-XComposer2); rank 0 = none. Text positions keep the base LM's weights, so
    text-only chats get exactly the base LM's answers. They cannot be merged, so the model holds them.
    """

    vision: ViTConfig = field(default_factory=ViTConfig)
    lm: DecoderConfig = field(default_factory=DecoderConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    vision_feature_layer: int = -2
    drop_class_token: bool = True
    image_token_id: int = 0
    vision_tower: str = "vit"
    cnn: ConvNetConfig = field(default_factory=ConvNetConfig)
    gridpool: GridPoolConfig = field(default_factory=GridPoolConfig)
    image_preset: str = "clip"
    image_lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        from polymodal.data.image import PRESETS

        if self.image_preset not in PRESETS:
            raise ValueError(f"MMLLMConfig.image_preset must be one of {PRESETS}, got {self.image_preset!r}")
        encoder_config(self, encoder_spec(self.vision_tower, "image", "MMLLMConfig.vision_tower", needs="tokens"))
        if self.vision_tower != "vit" and self.vision_feature_layer != -1:
            raise ValueError(f"MMLLMConfig: the {self.vision_tower} vision tower only has its final feature map; "
                             f"set vision_feature_layer to -1 (got {self.vision_feature_layer})")
        check_int("MMLLMConfig", "image_token_id", self.image_token_id, 0, MAX_VOCAB)
        states = self.vision.num_layers + 1  # the embeddings, then each layer's output
        if self.vision_tower == "vit" and not -states <= self.vision_feature_layer < states:
            raise ValueError(f"MMLLMConfig.vision_feature_layer={self.vision_feature_layer} is out of range for a "
                             f"{self.vision.num_layers}-layer ViT (valid: {-states} .. {states - 1})")

    @property
    def tower(self) -> ViTConfig | ConvNetConfig | GridPoolConfig:
        """The config of the selected vision tower."""
        return encoder_config(self, encoder_spec(self.vision_tower, "image", "MMLLMConfig.vision_tower"))

    @property
    def image_size(self) -> int:
        """Native input resolution of the vision tower."""
        return self.tower.image_size

    @property
    def vision_width(self) -> int:
        """Width of the vision tower's output tokens (the projector's input)."""
        return self.tower.hidden_size

    @property
    def vision_patches(self) -> int:
        """Tokens the vision tower hands the projector per image at its native resolution."""
        extra = self.vision_tower == "vit" and self.vision.class_token and not self.drop_class_token
        return self.tower.grid ** 2 + int(extra)


class MultimodalLM(nn.Module):
    """Encoder + projector + LM. Call like transformers' LLaVA: (input_ids (B, T), pixel_values (N, C, H, W)) -> logits (B, T, V).

    vision / lm / projector: built parts to use instead of building them from the config
    (torchtune style: a recipe passes in an imported LM or a trained tower); each must match the
    config (`config.lm` describes the LM passed in).
    """

    family = "mmllm"

    def __init__(self, config: MMLLMConfig, vision: nn.Module | None = None, lm: DecoderLM | None = None,
                 projector: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.vision = vision if vision is not None else build_vision_tower(config)
        self.lm = lm if lm is not None else DecoderLM(config.lm)
        self.projector = projector if projector is not None else build_projector(
            config.projector, config.vision_width, config.lm.hidden_size)
        lora = config.image_lora
        if lora.rank:
            apply_lora(self.lm, lora.targets, lora.rank, lora.alpha, lora.dropout, freeze_base=False)

    def add_image_lora(self, lora: LoRAConfig) -> None:
        """Put image-position adapters (see `MMLLMConfig.image_lora`) on the LM, unless it has them,
        and make them the LM's only trainable parameters."""
        if not self.config.image_lora.rank:
            apply_lora(self.lm, lora.targets, lora.rank, lora.alpha, lora.dropout)
            self.config.image_lora = replace(lora, image_tokens_only=True)
        self.lm.requires_grad_(False)
        for param in lora_parameters(self.lm):
            param.requires_grad_(True)

    def image_slots(self, input_ids: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """Bool (B, T): the `<image>` placeholder positions; `padding` (B, T, 1 = real token) rules out padding."""
        slots = input_ids == self.config.image_token_id
        return slots & padding.bool() if padding is not None else slots

    @property
    def image_tokens(self) -> int:
        """LM positions one image occupies at the vision tower's native resolution."""
        return self.projector.num_tokens(self.config.vision_patches)

    def encode_images(self, pixel_values: torch.Tensor, **projector_inputs) -> torch.Tensor:
        """pixel_values (N, C, H, W) -> image embeddings in LM space (N, K, D_lm)."""
        return self.projector(tower_features(self.vision, self.config, pixel_values), **projector_inputs)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              attention_mask: torch.Tensor | None = None, **projector_inputs) -> torch.Tensor:
        """Token embeddings (B, T, D) with every `<image>` position replaced by image features, in order.

        attention_mask (B, T): padding positions (0) are never image slots, whatever their id.
        """
        slots = self.image_slots(input_ids, attention_mask)
        # The placeholder id may lie outside the LM vocabulary (as in some LLaVA exports).
        embeds = self.lm.embed_tokens(input_ids.masked_fill(slots, 0))  # (B, T, D)
        num_slots = int(slots.sum())
        if pixel_values is None or len(pixel_values) == 0:
            if num_slots:
                raise ValueError(f"input_ids hold {num_slots} image placeholder tokens but no pixel_values were given")
            return embeds
        images = self.encode_images(pixel_values, **projector_inputs)  # (N, K, D)
        if images.shape[0] * images.shape[1] != num_slots:
            raise ValueError(
                f"{images.shape[0]} images x {images.shape[1]} tokens each need {images.shape[0] * images.shape[1]} "
                f"image placeholder tokens (id {self.config.image_token_id}), input_ids hold {num_slots}"
            )
        return embeds.masked_scatter(slots.unsqueeze(-1), images.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                packed: PackedBatch | None = None, kv_cache=None, logits_to_keep: int = 0, logits: bool = True,
                inputs_embeds: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None, **projector_inputs) -> LMOutput:
        """Run the model; see `DecoderLM.forward` for the LM arguments.

        With `packed`, ids come from the batch and pixels from its image placements (layout order).
        image_mask (B, T): the image positions, for `image_lora` when only `inputs_embeds` are
        given (otherwise they are read from the ids).
        """
        padding = None
        if packed is not None:
            input_ids = packed.token_ids
            images = [p.segment.data for p in packed.placements if p.segment.modality == "image"]
            pixel_values = torch.stack(images).to(input_ids.device) if images else None
            padding = packed.document_ids >= 0  # tail padding may share the placeholder's id
        elif input_ids is not None and attention_mask is not None and attention_mask.shape == input_ids.shape:
            padding = attention_mask
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, padding, **projector_inputs)
        lm_inputs = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, "positions": positions,
                     "packed": packed, "kv_cache": kv_cache, "logits_to_keep": logits_to_keep, "logits": logits}
        if not self.treats_image_positions_apart:
            return self.lm(**lm_inputs)
        if image_mask is None:
            if input_ids is None:
                raise ValueError(f"{type(self).__name__} gives image positions their own weights: give input_ids or "
                                 "image_mask with inputs_embeds, so the LM knows the image positions")
            image_mask = self.image_slots(input_ids, padding)
        with self.image_position_weights(image_mask):
            return self.lm(**lm_inputs)

    @property
    def treats_image_positions_apart(self) -> bool:
        """Whether the LM runs image positions with weights of their own (here: `image_lora`)."""
        return bool(self.config.image_lora.rank)

    def image_position_weights(self, image_mask: torch.Tensor):
        """A context in which the LM's forwards give the `image_mask` (B, T) positions their own
        weights (here: the image-position adapters); families that route otherwise override it."""
        return token_gated_lora(self.lm, image_mask)

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head: hidden states (..., D) -> logits (..., V). The positions it scores are text
        positions, which image-position adapters never touch, so any adapters stay off here."""
        if not self.config.image_lora.rank:
            return self.lm.output_logits(hidden)
        with token_gated_lora(self.lm, torch.zeros(hidden.shape[:-1], dtype=torch.bool, device=hidden.device)):
            return self.lm.output_logits(hidden)

    def new_kv_cache(self, batch_size: int, max_len: int):
        """An empty KV cache for the LM."""
        return self.lm.new_kv_cache(batch_size, max_len)

    @torch.no_grad()
    def generate(self, input_ids, pixel_values: torch.Tensor | None = None, projector_inputs: dict | None = None,
                 **kwargs) -> list[list[int]]:
        """Generate from prompts holding image placeholders; kwargs as `polymodal.infer.generate.generate`.

        projector_inputs: extra projector arguments, e.g. InstructBLIP's `qformer_input_ids` /
        `qformer_attention_mask` (one row per image).
        """
        from polymodal.infer.generate import generate, left_pad

        ids, mask = left_pad(input_ids, pad_id=0)
        device = self.lm.embed_tokens.weight.device
        embeds = self.embed(ids.to(device), None if pixel_values is None else pixel_values.to(device),
                            attention_mask=mask.to(device),
                            **{k: v.to(device) for k, v in (projector_inputs or {}).items()})
        return generate(self, ids, inputs_embeds=embeds, attention_mask=mask,
                        prefill_inputs={"image_mask": self.image_slots(ids.to(device), mask.to(device))},
                        suppress_tokens=self.generation_suppressed_tokens(), **kwargs)

    def generation_suppressed_tokens(self) -> tuple[int, ...]:
        """Ids a reply must never contain: the `<image>` placeholder (a reply carries no pixels)."""
        placeholder = self.config.image_token_id
        return (placeholder,) if 0 <= placeholder < self.config.lm.vocab_size else ()


def build_vision_tower(config: MMLLMConfig) -> nn.Module:
    """The vision tower `config.vision_tower` selects, freshly initialised."""
    return build_encoder(config, encoder_spec(config.vision_tower, "image", "MMLLMConfig.vision_tower"))[0]


def tower_features(tower: nn.Module, config: MMLLMConfig, pixel_values: torch.Tensor) -> torch.Tensor:
    """The tokens a vision tower hands the projector, as `config` selects them: pixel_values
    (N, C, H, W) -> (N, config.vision_patches, config.vision_width)."""
    if config.vision_tower != "vit":
        # The ViT casts pixels in its patch embedding; the convolutions need it done here.
        return tower(pixel_values.to(next(tower.parameters()).dtype)).last_hidden_state
    return tower.patch_features(pixel_values, config.vision_feature_layer, drop_class_token=config.drop_class_token)


def mmllm_tiny() -> MMLLMConfig:
    """A tiny LLaVA-1.5-layout model for tests: 32 px ViT (16 patches), 2-layer LM, MLP projector."""
    from polymodal.models.lm import lm_tiny
    from polymodal.models.vit import vit_tiny

    return MMLLMConfig(vision=vit_tiny(), lm=lm_tiny(), projector=ProjectorConfig(kind="mlp"), image_token_id=255)


def size_to_tokenizer(config: MMLLMConfig, tokenizer) -> MMLLMConfig:
    """Set `config`'s LM vocabulary size and eos id and its `<image>` placeholder id from
    `tokenizer` (in place; returns `config`). The tokenizer must already hold the placeholder."""
    image_id = tokenizer.token_to_id(IMAGE_MARKER)
    if image_id is None:
        raise ValueError(f"the tokenizer has no {IMAGE_MARKER!r} token; add it with "
                         f"tokenizer.add_special_tokens([{IMAGE_MARKER!r}])")
    config.lm.vocab_size = tokenizer.vocab_size
    config.lm.eos_token_id = tokenizer.eos_token_id
    config.image_token_id = image_id
    return config


def mmllm_tiny_for(tokenizer) -> MMLLMConfig:
    """`mmllm_tiny` sized to a tokenizer: its vocabulary, eos id and `<image>` placeholder id."""
    return size_to_tokenizer(mmllm_tiny(), tokenizer)


def _example_batch(model: MultimodalLM) -> PackedBatch:
    """Two chats (prompt, image, answer) packed into one row; the answers are the targets."""
    c = model.config
    size, docs = c.image_size, []
    for prompt, answer in ((2, 4), (3, 2)):
        docs.append(Document([
            Segment("text", tokens=torch.randint(0, c.lm.vocab_size - 1, (prompt,)), target=None),
            Segment("image", tokens=[c.image_token_id] * model.image_tokens, data=torch.randn(3, size, size),
                    target=None),
            Segment("text", tokens=torch.randint(0, c.lm.vocab_size - 1, (answer,)))]))
    return pack_documents(docs, max_tokens=2 * (model.image_tokens + 8))


MMLLM = register(Family(
    "mmllm", MMLLMConfig, MultimodalLM, mmllm_tiny, _example_batch,
    objective="polymodal.train.objectives:sequence_loss",
    tasks=("complete", "chat"),
    recipes=(Recipe("mmllm", "polymodal.recipes.mmllm:MMLLMRecipeConfig", "polymodal.recipes.mmllm:mmllm_job",
                   outputs=("base_text_answers.json", "retention.json")),),
    evaluate="polymodal.eval.mmllm:evaluate",
    converters=("polymodal.interop.hf_llava:HF_LLAVA_CONVERTER", "polymodal.interop.hf_blip2:HF_BLIP2_CONVERTER"),
))
