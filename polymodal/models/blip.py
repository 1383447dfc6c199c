"""The `blip` family: BLIP's multimodal mixture of encoder-decoder (MED) with ITC, ITM and captioning.

Li et al., 2022, "BLIP: Bootstrapping Language-Image Pre-training" (weight roles as in transformers'
`BlipForImageTextRetrieval` / `BlipForConditionalGeneration`):

    image tower (ViT | CNN of the shared encoder table) -> tokens (B, N, Dv), pooled (B, Dv)
    MED text transformer (BERT-style post-norm layers), three ways of running it:
      text encoder     bidirectional self-attention                    -> [CLS] -> text_proj  (ITC)
      image-grounded   + cross-attention to the image tokens           -> [ENC] -> itm_head   (ITM)
      image decoder    causal self-attention + cross-attention         -> lm_head             (captions)

The decoder shares everything but its self-attention with the encoder, as the paper does: the
embeddings, every cross-attention and feed-forward (and their norms) are one set of weights;
each layer holds two self-attentions, `encoder_attn` and `decoder_attn`, and a run picks one.
`retrieval=False` drops the encoder's self-attention and the ITC/ITM heads, `captioning=False`
the decoder's self-attention and the LM head (an imported transformers folder holds one side).

Training (`forward`, read by `polymodal.train.objectives.blip.blip_loss`): one tokenization per caption,
"[CLS] caption [SEP]", whose first token is swapped per task as BLIP does: `enc_token_id` for
ITM, `bos_token_id` ([DEC]) for the decoder. ITM sees each positive pair and two negatives mined
from the contrastive similarities (`mine_hard_negatives`): a text for every image and an image
for every text, drawn with probability softmax(similarity) over the pairs that are not positives.
BLIP's momentum encoder and its distillation targets are not built.

Shapes: pixel_values (B, C, H, W) in [-1, 1]; input_ids / attention_mask (B, T), right-padded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from polymodal.bounds import (
    MAX_POSITIONS,
    MAX_VOCAB,
    MAX_WIDTH,
    check_float,
    check_int,
    check_token_id,
    check_transformer_sizes,
)
from polymodal.encoders.convnet import ConvNetConfig
from polymodal.encoders.table import build_encoder, encoder_spec
from polymodal.encoders.vit import ViTConfig
from polymodal.errors import ConfigError
from polymodal.models.registry import Family, Recipe, register
from polymodal.nn.attention import Attention
from polymodal.nn.mlp import GeluMLP, activation


@dataclass
class MEDConfig:
    """The MED text transformer (defaults: BLIP base). bos_token_id: [DEC], the decoder's first
    token; eos_token_id: [SEP], ends a caption; enc_token_id: [ENC], replaces the first token of
    ITM inputs (None keeps it); cls_token_id: [CLS], put first by `polymodal.recipes.blip.blip_tokenize`
    when the tokenizer adds no special tokens itself (None: it does, as BERT's); pad_token_id:
    padding (right side)."""

    vocab_size: int = 30524
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 512
    act: str = "gelu"
    norm_eps: float = 1e-12
    pad_token_id: int = 0
    bos_token_id: int = 30522
    eos_token_id: int = 102
    enc_token_id: int | None = None
    cls_token_id: int | None = None

    def __post_init__(self) -> None:
        owner = "MEDConfig"
        check_int(owner, "vocab_size", self.vocab_size, 1, MAX_VOCAB)
        check_transformer_sizes(owner, self)
        check_int(owner, "max_positions", self.max_positions, 2, MAX_POSITIONS)
        check_float(owner, "norm_eps", self.norm_eps, 0, 1, low_open=True)
        activation(self.act)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            check_token_id(owner, name, getattr(self, name), self.vocab_size)
        for name in ("enc_token_id", "cls_token_id"):
            if getattr(self, name) is not None:
                check_token_id(owner, name, getattr(self, name), self.vocab_size)


def _blip_vit() -> ViTConfig:
    """BLIP's ViT-B/16 at 384 px: class token, no pre-norm, LayerNorm on every output token."""
    return ViTConfig(image_size=384, patch_size=16, act="gelu", pre_norm=False, post_norm="all", pool="cls",
                     patch_bias=True)


@dataclass
class BlipConfig:
    """A BLIP model. image_tower: an image encoder of the shared table giving tokens and a pooled
    feature ("vit" -> `vision`, "cnn" -> `cnn`); text: the MED transformer; embed_dim: the ITC
    space; retrieval / captioning: which sides exist (module docstring); itc_weight, itm_weight,
    caption_weight: the three losses' weights; hard_negatives: ITM negatives drawn by similarity
    (False: uniformly among the non-positives, for comparison); fused_share: the share of each
    batch's pairs (the first ceil(share * B)) that ITM and captioning train on, ITC always
    taking all B: the image-grounded passes cost four text passes per pair against ITC's one,
    so a share below 1 buys more ITC updates in the same time (negatives are still mined from
    the whole batch)."""

    image_tower: str = "vit"
    vision: ViTConfig = field(default_factory=_blip_vit)
    cnn: ConvNetConfig = field(default_factory=ConvNetConfig)
    text: MEDConfig = field(default_factory=MEDConfig)
    embed_dim: int = 256
    retrieval: bool = True
    captioning: bool = True
    logit_scale_init: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    caption_weight: float = 1.0
    hard_negatives: bool = True
    fused_share: float = 1.0

    def __post_init__(self) -> None:
        owner = "BlipConfig"
        check_float(owner, "fused_share", self.fused_share, 0.0, 1.0, low_open=True)
        encoder_spec(self.image_tower, "image", f"{owner}.image_tower", needs="tokens")
        encoder_spec(self.image_tower, "image", f"{owner}.image_tower", needs="pooled")
        check_int(owner, "embed_dim", self.embed_dim, 1, MAX_WIDTH)
        if not (self.retrieval or self.captioning):
            raise ConfigError(f"{owner}: set retrieval and/or captioning; a model with neither has no head")
        check_float(owner, "logit_scale_init", self.logit_scale_init, -1e4, 1e4)
        check_float(owner, "max_logit_scale", self.max_logit_scale, 0.0, 1e6, low_open=True)
        for name in ("itc_weight", "itm_weight", "caption_weight"):
            check_float(owner, name, getattr(self, name), 0.0, 1e6)

    @property
    def image_size(self) -> int:
        """The resolution the image tower is trained and evaluated at."""
        return getattr(self, encoder_spec(self.image_tower, "image", "image_tower").field).image_size


@dataclass
class BlipOutput:
    """What `BlipModel.forward` returns for B pairs.

    logits_per_image (B, B): scaled ITC cosine logits; image_embeds / text_embeds (B, E)
    normalised; itm_logits (3k, 2) for [positives; (text i, mined image); (image i, mined text)]
    with itm_labels (3k,) 1 / 0, -100 where no negative could be mined; caption_logits (k, T, V)
    of the decoder on `caption_ids` (k, T) with `caption_mask`. k = ceil(fused_share * B) (the
    first k pairs; B by default). Fields of a missing side are None.
    """

    logits_per_image: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    itm_logits: torch.Tensor | None = None
    itm_labels: torch.Tensor | None = None
    caption_logits: torch.Tensor | None = None
    caption_ids: torch.Tensor | None = None
    caption_mask: torch.Tensor | None = None


def mine_hard_negatives(similarity: torch.Tensor, positives: torch.Tensor | None = None, hard: bool = True,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One negative column per row of `similarity` (B, B'), and whether the row has one.

    Row i draws column j with probability softmax(similarity[i]) + 1e-4 (BLIP's floor; uniform
    when `hard` is False), renormalised over the columns that are not positives. positives (B, B')
    bool marks the pairs that must never be drawn (the diagonal is always one: the matching pair).
    Returns (index (B,) long, valid (B,) bool); a row whose every column is a positive is invalid.
    """
    b, cols = similarity.shape
    excluded = torch.zeros(b, cols, dtype=torch.bool, device=similarity.device) if positives is None else positives.clone()
    diagonal = torch.arange(min(b, cols), device=similarity.device)
    excluded[diagonal, diagonal] = True
    weights = similarity.float().softmax(dim=1) + 1e-4 if hard else torch.ones_like(similarity, dtype=torch.float)
    weights = weights.masked_fill(excluded, 0.0)
    valid = weights.sum(1) > 0
    weights[~valid] = 1.0  # any column: the row is reported invalid and its pair dropped
    return torch.multinomial(weights, 1, generator=generator).squeeze(1), valid


class PostNormAttention(nn.Module):
    """BERT's attention sub-layer: x = norm(x + attn(x | context)). (B, T, D) -> (B, T, D)."""

    def __init__(self, dim: int, num_heads: int, eps: float, kv_dim: int | None = None):
        super().__init__()
        self.attn = Attention(dim, num_heads, qkv_bias=True, out_bias=True, kv_dim=kv_dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, mask=None, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.norm(x + self.attn(x, context=context, mask=mask))


class MEDLayer(nn.Module):
    """One MED layer: self-attention (the encoder's or the decoder's), cross-attention to the
    image when given, feed-forward; all post-norm. x (B, T, D), image (B, N, Dv) | None -> (B, T, D)."""

    def __init__(self, c: MEDConfig, image_width: int, encoder: bool, decoder: bool):
        super().__init__()
        d = c.hidden_size
        self.encoder_attn = PostNormAttention(d, c.num_heads, c.norm_eps) if encoder else None
        self.decoder_attn = PostNormAttention(d, c.num_heads, c.norm_eps) if decoder else None
        self.cross_attn = PostNormAttention(d, c.num_heads, c.norm_eps, kv_dim=image_width)
        self.mlp = GeluMLP(d, c.intermediate_size, c.act)
        self.mlp_norm = nn.LayerNorm(d, eps=c.norm_eps)

    def forward(self, x: torch.Tensor, mask, causal: bool, image: torch.Tensor | None) -> torch.Tensor:
        x = (self.decoder_attn if causal else self.encoder_attn)(x, mask)
        if image is not None:
            x = self.cross_attn(x, context=image)
        return self.mlp_norm(x + self.mlp(x))


class MEDText(nn.Module):
    """Word + position embeddings, a LayerNorm, then MED layers (see `MEDLayer`).

    forward(input_ids (B, T), attention_mask (B, T) | None, image (B, N, Dv) | None, causal)
    -> hidden states (B, T, D). causal runs the decoder's self-attention (padding must be on the
    right: no real token then sees it); otherwise padded keys are masked out.
    """

    def __init__(self, c: MEDConfig, image_width: int, encoder: bool, decoder: bool):
        super().__init__()
        self.config = c
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_positions, c.hidden_size)
        # BERT's 0.02 init: the caption head reads these as its output matrix, and unit-variance
        # rows would start it with logits in the tens.
        nn.init.normal_(self.word_embeddings.weight, std=0.02)
        nn.init.normal_(self.position_embeddings.weight, std=0.02)
        self.embed_norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.layers = nn.ModuleList(MEDLayer(c, image_width, encoder, decoder) for _ in range(c.num_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                image: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        t = input_ids.shape[1]
        if t > self.config.max_positions:
            raise ValueError(f"input_ids hold {t} tokens; MEDConfig.max_positions is {self.config.max_positions}")
        positions = torch.arange(t, device=input_ids.device)
        x = self.embed_norm(self.word_embeddings(input_ids) + self.position_embeddings(positions))  # (B, T, D)
        if causal:
            mask = "causal"
        else:
            mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        for layer in self.layers:
            x = layer(x, mask, causal, image)
        return x


class MEDLMHead(nn.Module):
    """BERT's prediction head with the output matrix tied to the word embeddings:
    logits = norm(act(dense(h))) @ E^T + bias. h (B, T, D), E (V, D) -> (B, T, V)."""

    def __init__(self, c: MEDConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.act = activation(c.act)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.bias = nn.Parameter(torch.zeros(c.vocab_size))

    def forward(self, hidden: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(self.act(self.dense(hidden))), embeddings, self.bias)


def with_first_token(input_ids: torch.Tensor, token: int | None) -> torch.Tensor:
    """input_ids (B, T) with column 0 replaced by `token` (unchanged when None)."""
    if token is None:
        return input_ids
    out = input_ids.clone()
    out[:, 0] = token
    return out


class BlipModel(nn.Module):
    """BLIP: image tower + MED text transformer with ITC, ITM and captioning heads (module docstring).

    vision_model: a built image tower to use instead of building one from the config.
    Module names: `vision_model`, `text_model`, `lm_head` (captioning), `vision_proj`,
    `text_proj`, `itm_head`, `logit_scale` (retrieval).
    """

    family = "blip"

    def __init__(self, config: BlipConfig, vision_model: nn.Module | None = None):
        super().__init__()
        self.config = c = config
        spec = encoder_spec(c.image_tower, "image", "BlipConfig.image_tower", needs="tokens")
        if vision_model is None:
            self.vision_model, width = build_encoder(c, spec)
        else:
            self.vision_model, width = vision_model, spec.width(getattr(c, spec.field))
        self.text_model = MEDText(c.text, width, encoder=c.retrieval, decoder=c.captioning)
        self.lm_head = MEDLMHead(c.text) if c.captioning else None
        self.vision_proj = self.text_proj = self.itm_head = self.logit_scale = None
        if c.retrieval:
            self.vision_proj = nn.Linear(width, c.embed_dim)
            self.text_proj = nn.Linear(c.text.hidden_size, c.embed_dim)
            self.itm_head = nn.Linear(c.text.hidden_size, 2)
            self.logit_scale = nn.Parameter(torch.tensor(float(c.logit_scale_init)))

    @property
    def tasks(self) -> tuple[str, ...]:
        """`embed` with the retrieval side; a captioning-only model serves no registry task."""
        return ("embed",) if self.config.retrieval else ()

    def _require(self, side: str) -> None:
        if not getattr(self.config, side):
            raise ValueError(f"this BLIP model has no {side} side (BlipConfig.{side}=False)")

    def encode_image_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values (B, C, H, W) -> (image tokens (B, N, Dv), pooled feature (B, Dv))."""
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (B, C, H, W), got shape {tuple(pixel_values.shape)}")
        out = self.vision_model(pixel_values)
        return out.last_hidden_state, out.pooler_output

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), capped at `max_logit_scale`."""
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, C, H, W) -> unnormalised ITC image features (B, E)."""
        self._require("retrieval")
        return self.vision_proj(self.encode_image_tokens(pixel_values)[1])

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask (B, T), "[CLS] caption [SEP]" -> unnormalised ITC text features (B, E)."""
        self._require("retrieval")
        return self.text_proj(self.text_model(input_ids, attention_mask)[:, 0])

    def text_inputs(self, tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[int], int]:
        """The `embed` contract's text inputs (`polymodal.eval.contrastive.text_inputs`): ids and
        mask (N, T) of "[CLS] text [SEP]" (`polymodal.recipes.blip.blip_tokenize`), the tokens
        each text needs untruncated, and the limit, `text.max_positions`."""
        from polymodal.recipes.blip import blip_tokenize

        t = self.config.text
        own_specials = t.cls_token_id is None  # the tokenizer adds [CLS] and [SEP] itself (BERT's)
        needed = [len(ids) + (0 if own_specials else 2)  # + [CLS] + [SEP]
                  for ids in tokenizer.encode_batch(list(texts), add_special_tokens=own_specials)]
        ids, mask = blip_tokenize(self.config, tokenizer, texts)
        return ids, mask, needed, t.max_positions

    def itm_logits(self, image_tokens: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ITM logits (B, 2) [no match, match] of image tokens (B, N, Dv) and texts (B, T), ids as given."""
        self._require("retrieval")
        return self.itm_head(self.text_model(input_ids, attention_mask, image=image_tokens)[:, 0])

    def caption_logits(self, image_tokens: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, V) of the image-grounded decoder on "[DEC] ..." ids (B, T)."""
        self._require("captioning")
        hidden = self.text_model(input_ids, image=image_tokens, causal=True)
        return self.lm_head(hidden, self.text_model.word_embeddings.weight)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, image_ids: torch.Tensor | None = None) -> BlipOutput:
        """The three objectives' inputs for B pairs (image i, text i); see `BlipOutput`.
        image_ids (B,): which pairs share an image (CapFilt's web and synthetic captions of one
        scene); such pairs, like identical captions, are never mined as each other's ITM negatives."""
        c = self.config
        if input_ids.ndim != 2 or input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(f"input_ids must be (B, T) with one row per image: got {tuple(input_ids.shape)} for "
                             f"{pixel_values.shape[0]} images")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        tokens, pooled = self.encode_image_tokens(pixel_values)  # (B, N, Dv), (B, Dv)
        # Pairs the image-grounded passes train on; rounding first keeps 0.07 * 100 at 7, not 8.
        fused = math.ceil(round(c.fused_share * len(input_ids), 6))
        out = BlipOutput()
        if c.retrieval:
            out.image_embeds = F.normalize(self.vision_proj(pooled), dim=-1)  # (B, E)
            out.text_embeds = F.normalize(self.encode_text(input_ids, attention_mask), dim=-1)  # (B, E)
            out.logits_per_image = self.scale() * out.image_embeds @ out.text_embeds.t()  # (B, B)
            out.itm_logits, out.itm_labels = self._itm_with_negatives(tokens, input_ids, attention_mask,
                                                                      out.logits_per_image.detach(), fused, image_ids)
        if c.captioning:
            out.caption_ids = with_first_token(input_ids[:fused], c.text.bos_token_id)
            out.caption_mask = attention_mask[:fused]
            out.caption_logits = self.caption_logits(tokens[:fused], out.caption_ids)
        return out

    def _itm_with_negatives(self, tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            similarity: torch.Tensor, k: int,
                            image_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ITM logits (3k, 2) and labels (3k,) of the first k positives and their negatives, mined
        among all B pairs of the batch (similarity (B, B))."""
        # Identical captions (the same ids and mask) and pairs of one image are positives too:
        # never mine them as negatives.
        rows = torch.cat([input_ids * attention_mask, attention_mask], dim=1)
        positives = (rows[:k, None, :] == rows[None, :, :]).all(-1)  # (k, B)
        if image_ids is not None:
            positives |= image_ids[:k, None] == image_ids[None, :]
        hard = self.config.hard_negatives
        image_for_text, text_valid = mine_hard_negatives(similarity.t()[:k], positives, hard)  # (k,)
        text_for_image, image_valid = mine_hard_negatives(similarity[:k], positives, hard)  # (k,)
        ids = with_first_token(input_ids, self.config.text.enc_token_id)
        all_ids = torch.cat([ids[:k], ids[:k], ids[text_for_image]])  # (3k, T)
        all_mask = torch.cat([attention_mask[:k], attention_mask[:k], attention_mask[text_for_image]])
        all_tokens = torch.cat([tokens[:k], tokens[image_for_text], tokens[:k]])  # (3k, N, Dv)
        logits = self.itm_logits(all_tokens, all_ids, all_mask)
        negative = torch.zeros(k, dtype=torch.long, device=ids.device)
        labels = torch.cat([torch.ones_like(negative), negative.masked_fill(~text_valid, -100),
                            negative.masked_fill(~image_valid, -100)])
        return logits, labels

    @torch.no_grad()
    def match_probability(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """P(match) (B,) of image i and text i, the first token swapped to [ENC] as in training."""
        tokens, _ = self.encode_image_tokens(pixel_values)
        ids = with_first_token(input_ids, self.config.text.enc_token_id)
        return self.itm_logits(tokens, ids, attention_mask).softmax(-1)[:, 1]

    @torch.no_grad()
    def generate_captions(self, pixel_values: torch.Tensor, prompt: list[int] | None = None,
                          max_new_tokens: int = 20, top_p: float | None = None,
                          generator: torch.Generator | None = None) -> list[list[int]]:
        """Captions of images (B, C, H, W): the ids after "[DEC] prompt", up to [SEP] (not
        included). Greedy, or with `top_p` nucleus sampling (BLIP's CapFilt captioner samples
        with p = 0.9 for more diverse captions) drawn from `generator`."""
        from polymodal.infer.generate import sample_next_token

        self._require("captioning")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        t = self.config.text
        tokens, _ = self.encode_image_tokens(pixel_values)
        start = [t.bos_token_id, *(prompt or [])]
        ids = torch.tensor(start, device=tokens.device).repeat(len(tokens), 1)  # (B, P)
        done = torch.zeros(len(tokens), dtype=torch.bool, device=tokens.device)
        for _ in range(min(max_new_tokens, t.max_positions - ids.shape[1])):
            # The whole prefix is recomputed each step: captions are short and the decoder small.
            logits = self.caption_logits(tokens, ids)[:, -1]  # (B, V)
            step = sample_next_token(logits, 0.0 if top_p is None else 1.0, top_p=top_p or 1.0, generator=generator)
            step = step.masked_fill(done, t.pad_token_id)
            ids = torch.cat([ids, step[:, None]], dim=1)
            done |= step == t.eos_token_id
            if done.all():
                break
        out = []
        for row in ids[:, len(start):].tolist():
            out.append(row[:row.index(t.eos_token_id)] if t.eos_token_id in row else row)
        return out


def blip_tiny() -> BlipConfig:
    """A 2-layer 32 px ViT and a 2-layer 64-wide MED over 128 tokens, for unit tests."""
    return BlipConfig(
        vision=ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                         act="gelu", pre_norm=False, post_norm="all", pool="cls", patch_bias=True),
        text=MEDConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                       max_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, enc_token_id=3, cls_token_id=4),
        embed_dim=32)


def _example_batch(model: BlipModel) -> dict:
    """Four pairs "[CLS] caption [SEP]" with one padded row."""
    c = model.config
    ids = torch.randint(5, c.text.vocab_size, (4, 9))
    ids[:, 0], ids[:, -1] = c.text.cls_token_id, c.text.eos_token_id
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 5], ids[1, 6:] = c.text.eos_token_id, c.text.pad_token_id
    return {"pixel_values": torch.randn(4, 3, c.image_size, c.image_size), "input_ids": ids, "attention_mask": mask}


BLIP = register(Family(
    "blip", BlipConfig, BlipModel, blip_tiny, _example_batch,
    objective="polymodal.train.objectives.blip:blip_loss",
    tasks=("embed",),
    recipes=(Recipe("blip", "polymodal.recipes.blip:BlipRecipeConfig", "polymodal.recipes.blip:blip_job"),
             Recipe("blip_capfilt", "polymodal.recipes.blip:CapFiltRecipeConfig",
                    "polymodal.recipes.blip:capfilt_job", outputs=("capfilt.jsonl",))),
    evaluate="polymodal.eval.blip:evaluate",
    converters=("polymodal.interop.hf_blip:HF_BLIP_CONVERTER",),
))
