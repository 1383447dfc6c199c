"""The `clip` family: dual-encoder contrastive models — CLIP, SigLIP, LiT and CoCa.

    image tower (ViT | small CNN | EfficientNet-Lite0 | extras) -> pooled (B, Dv) -> visual_projection -> (B, E)
    text tower (CLIP/SigLIP transformer | BERT)       -> pooled (B, Dt) -> text_projection   -> (B, E)
    loss: "clip" (InfoNCE, learnable temperature) or "siglip" (sigmoid, learnable temperature + bias)
    CoCa: `caption_layers > 0` adds a causal decoder that reads the (causal) text tower's states and
    cross-attends to the image tower's tokens; its next-token loss is added with `caption_loss_weight`.

Module names follow transformers' CLIPModel / SiglipModel so checkpoint name maps stay short:
`vision_model`, `text_model`, `visual_projection`, `text_projection` (bias-free Linear, or Identity
with `projection=False` as in SigLIP), `logit_scale`, `logit_bias` (present for every loss, used
by "siglip"), `caption_decoder` (CoCa only). `encode_image` / `encode_text` return the unnormalised
projected features, the values of transformers' get_image_features / get_text_features.

Speed: contrastive training and `encode_*` only read each tower's pooled token, so the last block
of the ViT (class-token pooling) and of the text tower (one-token pooling) is computed for that
token alone (`last_block_at`) — identical features, and on a 4-layer tower about a fifth less
work. CoCa needs every token and runs the full towers.

Towers come from the shared encoder table (`polymodal.encoders.table`): `image_tower` and
`text_tower` name encoders that give a pooled feature, whose configs sit in the fields the table
names (`vision` for the ViT, `cnn`, `efficientnet`, `text` for the transformer, `bert`). Built
towers may also be passed in (`ContrastiveModel(config, vision_model=..., text_model=...)`, e.g.
LiT's pretrained text tower), torchtune style.

Every image tower takes the same pixels: (B, C, H, W) in [-1, 1] (`polymodal.data.pixels.pixels_from_uint8`).
The EfficientNet tower (`EfficientNetTower`) converts them to what its ImageNet weights expect.

A frozen text tower is a pure function of its tokens, so duplicate captions in a batch (class-name
templates repeat constantly: 40 distinct Fashion-MNIST captions in a batch of 256) are encoded once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from polymodal.bounds import MAX_LAYERS, MAX_WIDTH, check_float, check_int
from polymodal.encoders.bert import BertConfig
from polymodal.encoders.convnet import ConvNetConfig
from polymodal.encoders.efficientnet import EfficientNetConfig
from polymodal.encoders.table import build_encoder, encoder_spec
from polymodal.encoders.text import TextEncoderConfig, TextTransformer, last_block_at
from polymodal.encoders.vit import ViTConfig, ViTOutput, VisionTransformer
from polymodal.models.registry import Family, Recipe, register
from polymodal.nn.transformer import TransformerStack, build_block

LOSSES = ("clip", "siglip")


@dataclass
class ContrastiveConfig:
    """A dual encoder. image_tower: an image encoder of the shared table with a pooled output
    ("vit" -> `vision`, "cnn" -> `cnn`, "efficientnet_lite0" -> `efficientnet`); text_tower: a
    text encoder ("transformer" -> `text`, "bert" -> `bert`). embed_dim: width of the shared space (ignored with
    projection=False, where both towers must already output the same width). patch_dropout:
    fraction of ViT patches dropped per image while training (FLIP-style speed-up/regulariser).
    freeze_text / freeze_image: keep that tower's weights fixed (LiT locks a pretrained tower).
    caption_layers > 0: CoCa captioning decoder with that many cross-attention layers."""

    image_tower: str = "vit"
    vision: ViTConfig = field(default_factory=ViTConfig)
    cnn: ConvNetConfig = field(default_factory=ConvNetConfig)
    efficientnet: EfficientNetConfig = field(default_factory=lambda: EfficientNetConfig(num_classes=0))
    text_tower: str = "transformer"
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    bert: BertConfig = field(default_factory=BertConfig)
    embed_dim: int = 512
    projection: bool = True
    loss: str = "clip"
    logit_scale_init: float = math.log(1 / 0.07)
    logit_bias_init: float = -10.0
    max_logit_scale: float = 100.0
    freeze_text: bool = False
    freeze_image: bool = False
    patch_dropout: float = 0.0
    caption_layers: int = 0
    caption_loss_weight: float = 2.0

    def __post_init__(self) -> None:
        encoder_spec(self.image_tower, "image", "ContrastiveConfig.image_tower", needs="pooled")
        encoder_spec(self.text_tower, "text", "ContrastiveConfig.text_tower", needs="pooled")
        if self.loss not in LOSSES:
            raise ValueError(f"ContrastiveConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"ContrastiveConfig.patch_dropout must be in [0, 1), got {self.patch_dropout}")
        if self.caption_layers < 0:
            raise ValueError(f"ContrastiveConfig.caption_layers must be >= 0, got {self.caption_layers}")
        check_int("ContrastiveConfig", "caption_layers", self.caption_layers, 0, MAX_LAYERS)
        check_int("ContrastiveConfig", "embed_dim", self.embed_dim, 1, MAX_WIDTH)
        for name in ("logit_scale_init", "logit_bias_init"):
            check_float("ContrastiveConfig", name, getattr(self, name), -1e4, 1e4)
        check_float("ContrastiveConfig", "max_logit_scale", self.max_logit_scale, 0.0, 1e6, low_open=True)
        check_float("ContrastiveConfig", "caption_loss_weight", self.caption_loss_weight, 0.0, 1e6)

    @property
    def image_size(self) -> int:
        """The resolution the image tower is trained and evaluated at."""
        return getattr(self, encoder_spec(self.image_tower, "image", "image_tower").field).image_size

    @property
    def max_text_tokens(self) -> int:
        """The longest text the text tower takes."""
        return self.text.max_positions if self.text_tower == "transformer" else self.bert.max_position_embeddings


@dataclass
class ContrastiveOutput:
    """logits_per_image (B, B) / logits_per_text (B, B) on this rank's pairs; image_embeds,
    text_embeds (B, E) normalised; caption_logits (B, T', vocab) of the CoCa decoder (None
    otherwise). The loss is `polymodal.train.objectives.contrastive_loss`."""

    logits_per_image: torch.Tensor
    logits_per_text: torch.Tensor
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    caption_logits: torch.Tensor | None = None


def vit_tokens(vit: VisionTransformer, pixel_values: torch.Tensor, keep: float = 1.0) -> torch.Tensor:
    """The ViT's encoder input (B, [1+]K, D): patch + position embeddings, class token, pre-norm.

    keep < 1 keeps a random `keep` fraction of each image's patches (patch dropout, Li et al.,
    2023, FLIP); they are dropped after their position embedding is added, so the kept ones still
    know where they are. The class token is always kept.
    """
    c = vit.config
    x = vit.patch_embed(pixel_values)  # (B, N, D)
    b, n, d = x.shape
    table = vit.position_embeddings_for(pixel_values.shape[-2] // c.patch_size, pixel_values.shape[-1] // c.patch_size)
    cls = int(c.class_token)
    x = x + table[cls:].to(x.dtype)
    if keep < 1.0:
        kept = torch.rand(b, n, device=x.device).argsort(dim=1)[:, :max(1, int(round(n * keep)))]  # (B, K)
        x = x.gather(1, kept.unsqueeze(-1).expand(-1, -1, d))  # (B, K, D)
    if cls:
        first = (vit.class_embedding + table[0]).to(x.dtype).expand(b, 1, -1)
        x = torch.cat([first, x], dim=1)  # (B, 1+K, D)
    return vit.pre_norm(x) if vit.pre_norm is not None else x


def vit_features(vit: VisionTransformer, pixel_values: torch.Tensor, keep: float = 1.0,
                 pooled_only: bool = False) -> ViTOutput:
    """`vit(pixel_values)` with patch dropout (`keep` < 1) and a pooled-only fast path.

    pooled_only with class-token pooling computes the last block for the class token alone
    (`last_block_at`): the same pooled feature, with last_hidden_state holding the tokens
    entering the last block. Other poolings run every token.
    """
    c = vit.config
    x = vit_tokens(vit, pixel_values, keep)
    layers = vit.encoder.layers
    if pooled_only and c.pool == "cls" and len(layers):
        for i, block in enumerate(layers[:-1]):
            x = block(x, layer_idx=i)
        pooled = last_block_at(layers[-1], x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device), None)
        return ViTOutput(x, vit.post_norm(pooled) if vit.post_norm is not None else pooled)
    x = vit.encoder(x)
    if c.post_norm == "all":
        x = vit.post_norm(x)
    pooled = None
    if c.pool == "cls":
        pooled = x[:, 0] if c.post_norm != "pooled" else vit.post_norm(x[:, 0])
    elif c.pool == "map":
        pooled = vit.head(x)
    elif c.pool == "mean":
        pooled = x[:, int(c.class_token):].mean(1)
    return ViTOutput(x, pooled)


class CaptionDecoder(nn.Module):
    """CoCa's multimodal decoder: causal self-attention over text states + cross-attention to image tokens.

    text_states (B, T, D) from a causal text tower, image_tokens (B, N, Dv) -> logits (B, T, vocab).
    Module names: `layers` (TransformerStack), `norm`, `lm_head`.
    """

    def __init__(self, text: TextEncoderConfig, image_width: int, num_layers: int):
        super().__init__()
        self.layers = TransformerStack([
            build_block(text.hidden_size, text.num_heads, text.intermediate_size, norm="layer", norm_eps=text.norm_eps,
                        mlp="gelu", act=text.act, qkv_bias=True, out_bias=True, mlp_bias=True, cross_dim=image_width)
            for _ in range(num_layers)
        ])
        self.norm = nn.LayerNorm(text.hidden_size, eps=text.norm_eps)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)

    def forward(self, text_states: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        # Causal self-attention: padding sits after the real tokens, so no real token sees it.
        x = self.layers(text_states, mask="causal", context=image_tokens)
        return self.lm_head(self.norm(x))  # (B, T, vocab)


def _tower(config: ContrastiveConfig, modality: str, name: str, given: nn.Module | None) -> tuple[nn.Module, int]:
    """(tower, feature width): the given tower, or one built from the encoder table."""
    spec = encoder_spec(name, modality, f"ContrastiveConfig.{modality}_tower", needs="pooled")
    if given is None:
        return build_encoder(config, spec)
    return given, spec.width(getattr(config, spec.field))


class ContrastiveModel(nn.Module):
    """CLIP / SigLIP / LiT / CoCa dual encoder (see the module docstring for the layout and names).

    vision_model / text_model: built towers to use instead of building them from the config (they
    must match its `image_tower` / `text_tower` entry: a pretrained tower passed in, LiT style).
    """

    family = "clip"

    def __init__(self, config: ContrastiveConfig, vision_model: nn.Module | None = None,
                 text_model: nn.Module | None = None):
        super().__init__()
        self.config = c = config
        self.vision_model, image_width = _tower(c, "image", c.image_tower, vision_model)
        self.text_model, text_width = _tower(c, "text", c.text_tower, text_model)
        if c.projection:
            self.visual_projection = nn.Linear(image_width, c.embed_dim, bias=False)
            self.text_projection = nn.Linear(text_width, c.embed_dim, bias=False)
        elif image_width != text_width:
            raise ValueError(f"ContrastiveConfig.projection=False needs equal tower widths, got image "
                             f"{image_width} and text {text_width}")
        else:
            self.visual_projection, self.text_projection = nn.Identity(), nn.Identity()
        self.logit_scale = nn.Parameter(torch.tensor(float(c.logit_scale_init)))
        self.logit_bias = nn.Parameter(torch.tensor(float(c.logit_bias_init)))
        if c.patch_dropout and c.image_tower != "vit":
            raise ValueError(f"ContrastiveConfig.patch_dropout needs image_tower 'vit', got {c.image_tower!r}")
        self.caption_decoder = None
        if c.caption_layers:
            if c.text_tower != "transformer" or not c.text.causal:
                raise ValueError("ContrastiveConfig.caption_layers (CoCa) needs text_tower 'transformer' with "
                                 "text.causal=True: the decoder predicts tokens from causal text states")
            self.caption_decoder = CaptionDecoder(c.text, image_width, c.caption_layers)
        for tower, frozen in ((self.text_model, c.freeze_text), (self.vision_model, c.freeze_image)):
            if frozen:
                tower.requires_grad_(False)

    def train(self, mode: bool = True) -> ContrastiveModel:
        """Set training mode; frozen towers stay in eval mode (no dropout / norm statistics updates)."""
        super().train(mode)
        if self.config.freeze_text:
            self.text_model.eval()
        if self.config.freeze_image:
            self.vision_model.eval()
        return self

    def _image_tower(self, pixel_values: torch.Tensor, pooled_only: bool = False):
        """The image tower's output; the ViT takes patch dropout (training) and the pooled-only path."""
        if isinstance(self.vision_model, VisionTransformer):
            keep = 1.0 - self.config.patch_dropout if self.training else 1.0
            out = vit_features(self.vision_model, pixel_values, keep, pooled_only)
        else:
            out = self.vision_model(pixel_values)
        if out.pooler_output is None:
            raise ValueError("the image tower returned no pooled feature; configure a pooling (vision.pool)")
        return out

    def _text_pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The text tower's pooled feature (B, Dt); a frozen tower encodes each distinct row once."""
        if self.config.freeze_text:
            t = input_ids.shape[1]
            rows = input_ids if attention_mask is None else torch.cat([input_ids, attention_mask.to(input_ids)], 1)
            distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)  # (U, T[*2]), (B,)
            if len(distinct) < len(rows):
                mask = None if attention_mask is None else distinct[:, t:].to(attention_mask.dtype)
                return self._tower_pooled(distinct[:, :t], mask)[inverse]  # (B, Dt)
        return self._tower_pooled(input_ids, attention_mask)

    def _tower_pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The text tower's pooled feature (B, Dt), by the pooled-only path when the tower has one."""
        if isinstance(self.text_model, TextTransformer):
            return self.text_model.pooled(input_ids, attention_mask)
        return self.text_model(input_ids, attention_mask=attention_mask).pooler_output

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, C, H, W) -> projected, unnormalised image features (B, E)."""
        return self.visual_projection(self._image_tower(pixel_values, pooled_only=True).pooler_output)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T), attention_mask (B, T) | None -> projected, unnormalised text features (B, E)."""
        return self.text_projection(self._text_pooled(input_ids, attention_mask))

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), capped at `max_logit_scale` (CLIP caps the temperature at 1/100)."""
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Scaled (and, for SigLIP, biased) cosine logits (N_img, N_txt) of unnormalised features."""
        logits = self.scale() * F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).t()
        return logits + self.logit_bias if self.config.loss == "siglip" else logits

    @torch.no_grad()
    def similarity(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """logits_per_image (N_img, N_txt) between every image and every text (as transformers reports)."""
        return self.logits(self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask))

    @torch.no_grad()
    def zero_shot_classify(self, pixel_values: torch.Tensor, class_input_ids: torch.Tensor,
                           class_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class probabilities (B, C) for one prompt per class: softmax for "clip", sigmoid for "siglip"."""
        logits = self.similarity(pixel_values, class_input_ids, class_attention_mask)
        return torch.sigmoid(logits) if self.config.loss == "siglip" else logits.softmax(dim=-1)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                captions: torch.Tensor | None = None, caption_mask: torch.Tensor | None = None) -> ContrastiveOutput:
        """Embeddings and logits of B pairs (image i, text i).

        pixel_values (B, C, H, W); input_ids, attention_mask (B, T). CoCa: `captions` (B, T')
        (with `caption_mask`) are the tokens to caption; None reuses input_ids / attention_mask.
        """
        if self.caption_decoder is None:  # only pooled features are needed: skip the last layers' other tokens
            image_pooled = self._image_tower(pixel_values, pooled_only=True).pooler_output
            text_pooled = self._text_pooled(input_ids, attention_mask)
        else:
            image_out = self._image_tower(pixel_values)
            text_out = self.text_model(input_ids, attention_mask=attention_mask)
            image_pooled, text_pooled = image_out.pooler_output, text_out.pooler_output
        image_embeds = F.normalize(self.visual_projection(image_pooled), dim=-1)  # (B, E)
        text_embeds = F.normalize(self.text_projection(text_pooled), dim=-1)  # (B, E)
        logits_per_image = self.logits(image_embeds, text_embeds)
        caption_logits = None
        if self.caption_decoder is not None:
            if captions is None:
                states = text_out.last_hidden_state
            else:
                states = self.text_model(captions, attention_mask=caption_mask).last_hidden_state
            caption_logits = self.caption_decoder(states, image_out.last_hidden_state)  # (B, T', vocab)
        return ContrastiveOutput(logits_per_image, logits_per_image.t(), image_embeds, text_embeds, caption_logits)


def clip_tiny() -> ContrastiveConfig:
    """A 2-layer 32 px ViT + 2-layer causal text tower, 32-d shared space, for unit tests."""
    return ContrastiveConfig(
        vision=ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
        text=TextEncoderConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                               max_positions=16, eos_token_id=127),
        embed_dim=32)


def _example_batch(model: ContrastiveModel) -> dict:
    c = model.config
    size = c.image_size
    ids = torch.randint(0, c.text.vocab_size - 1, (3, 10))
    ids[:, -1] = c.text.eos_token_id
    return {"pixel_values": torch.randn(3, 3, size, size), "input_ids": ids}


CLIP = register(Family(
    "clip", ContrastiveConfig, ContrastiveModel, clip_tiny, _example_batch,
    objective="polymodal.train.objectives:contrastive_loss",
    tasks=("embed",),
    recipes=(Recipe("clip", "polymodal.recipes.clip:ClipRecipeConfig", "polymodal.recipes.clip:clip_job",
                   outputs=("eval.json",)),),
    evaluate="polymodal.eval.contrastive:evaluate",
    converters=("polymodal.interop.hf_clip:HF_CLIP_CONVERTER",),
))
