"""Evaluation of contrastive dual encoders: zero-shot classification and image-text retrieval.

Generic pieces work on any model with `encode_image` / `encode_text` (and on plain matrices, for
tests): prompt-ensembled zero-shot classifiers (the mean of the normalised embeddings of a class's
prompts, re-normalised, as CLIP does), top-k accuracy, and Recall@K in both directions where an
image may own several texts. `evaluate` runs the suites of `polymodal eval` for data "world"
(single-object 64 px scenes: zero-shot color / shape / grid position, text->image retrieval of
detailed captions) and "fashion-mnist" (zero-shot class on the test split).
"""
from __future__ import annotations

import itertools
from collections import Counter
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from polymodal.data.dual_encoder import pixels_from_uint8, scene_pixels, tokenize_captions
from polymodal.errors import UsageError


def text_inputs(model, tokenizer, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, list[int], int]:
    """What an `embed` model's text tower reads for `texts`: right-padded ids and mask (N, T)
    truncated to its limit, the tokens each text needs untruncated, and that limit.

    A model with a text format of its own says so with a `text_inputs(tokenizer, texts)` method
    (BLIP: "[CLS] text [SEP]"); a dual encoder reads the text and an end token (pretrained towers
    keep their own special tokens instead), up to `config.max_text_tokens`."""
    if hasattr(model, "text_inputs"):
        return model.text_inputs(tokenizer, texts)
    limit = model.config.max_text_tokens
    special = model.config.text_tower != "transformer"
    needed = [len(ids) + (not special) for ids in tokenizer.encode_batch(list(texts), add_special_tokens=special)]
    ids, mask = tokenize_captions(tokenizer, texts, limit, special)
    return ids, mask, needed, limit


@torch.no_grad()
def embed_token_rows(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings (N, E), on the CPU, of token rows (N, T) from `text_inputs`,
    `batch_size` rows at a time."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([F.normalize(model.encode_text(input_ids[s:s + batch_size].to(device),
                                                    attention_mask[s:s + batch_size].to(device)).float(), dim=-1).cpu()
                      for s in range(0, len(input_ids), batch_size)])


def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings (N, E) of `texts` (`text_inputs`, padded per chunk)."""
    return torch.cat([embed_token_rows(model, *text_inputs(model, tokenizer, texts[start:start + batch_size])[:2])
                      for start in range(0, len(texts), batch_size)])


@torch.no_grad()
def encode_images(model, pixel_values: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image embeddings (N, E) of pixel_values (N, C, H, W)."""
    model.eval()
    device = next(model.parameters()).device
    out = [F.normalize(model.encode_image(pixel_values[s:s + batch_size].to(device)).float(), dim=-1)
           for s in range(0, len(pixel_values), batch_size)]
    return torch.cat(out).cpu()


def prompts_from_templates(class_names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """Prompts per class: every template ("a photo of a {}") filled with every class name."""
    return [[t.format(name) for t in templates] for name in class_names]


def class_embeddings(text_embeds: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Prompt-ensembled classifier (C, E): mean of each class's consecutive prompt embeddings, normalised.

    text_embeds (sum(counts), E), normalised; counts[c] prompts belong to class c, in order.
    """
    chunks = torch.split(text_embeds, list(counts))
    return F.normalize(torch.stack([chunk.mean(0) for chunk in chunks]), dim=-1)


def zero_shot_classifier(model, tokenizer, prompts_per_class: Sequence[Sequence[str]]) -> torch.Tensor:
    """Classifier weights (C, E) for a model: `class_embeddings` of every class's prompts."""
    flat = [p for prompts in prompts_per_class for p in prompts]
    return class_embeddings(encode_texts(model, tokenizer, flat), [len(p) for p in prompts_per_class])


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{"top{k}": fraction of rows whose label is among the k largest logits}. logits (N, C), labels (N,)."""
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, K)
    hits = ranked == labels[:, None]
    return {f"top{k}": hits[:, :k].any(1).float().mean().item() for k in ks}


def retrieval_recall(similarity: torch.Tensor, text_to_image: torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K both ways. similarity (N_img, N_txt); text_to_image (N_txt,) the image of each text.

    image->text: an image hits when any of its texts is among its top K texts;
    text->image: a text hits when its image is among its top K images. Ties rank by index.
    """
    n_img, n_txt = similarity.shape
    out = {}
    k_max = max(ks)
    top_images = similarity.t().topk(min(k_max, n_img), dim=1).indices  # (N_txt, K)
    t2i = top_images == text_to_image[:, None]
    top_texts = similarity.topk(min(k_max, n_txt), dim=1).indices  # (N_img, K)
    i2t = text_to_image[top_texts] == torch.arange(n_img)[:, None]
    for k in ks:
        out[f"i2t_R@{k}"] = i2t[:, :k].any(1).float().mean().item()
        out[f"t2i_R@{k}"] = t2i[:, :k].any(1).float().mean().item()
    return out


def _world_scenes(split: str, n: int, image_size: int):
    from polymodal.data.world import World

    scenes = list(World(split, image_size=image_size, num_objects=(1, 1)).scenes(n))
    return scenes, scene_pixels(scenes)


WORLD_ATTRIBUTES = ("size", "color", "shape", "position")


def world_prompts() -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """Every (size, color, shape, position) of a single object and its prompt, in the form of the
    first detailed caption template: "A small red circle in the top left." (1,296 prompts)."""
    from polymodal.data.world import COLORS, POSITION_NAMES, SHAPES, SIZES
    from polymodal.data.world.text import LOCATIVES, with_article

    combos = list(itertools.product(SIZES, COLORS, SHAPES, POSITION_NAMES.values()))
    prompts = [with_article(f"{z} {c} {s}").capitalize() + f" {LOCATIVES[p]}." for z, c, s, p in combos]
    return combos, prompts


def marginal_logits(logits: torch.Tensor, combo_class: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class log-scores (N, C) from joint logits (N, K): logsumexp over the K combinations of each class.

    With softmax(logits) read as p(combination | image), this is log p(class | image) up to a
    per-row constant: the other attributes are marginalised out rather than averaged into one
    prompt embedding. combo_class (K,) gives the class of each combination.
    """
    out = logits.new_full((logits.shape[0], num_classes), float("-inf"))
    for c in range(num_classes):
        out[:, c] = logits[:, combo_class == c].logsumexp(dim=1)
    return out


def world_zero_shot(model, tokenizer, split: str = "test", n: int = 500) -> dict[str, float]:
    """Zero-shot color, shape and grid-position accuracy on n single-object scenes of `split`.

    The image is scored against the prompt of every attribute combination (`world_prompts`) with
    the model's own logit scale; each attribute is the argmax of its marginal (`marginal_logits`).
    """
    scenes, pixels = _world_scenes(split, n, model.config.image_size)
    combos, prompts = world_prompts()
    with torch.no_grad():
        scale = model.scale().float().cpu()
    logits = scale * encode_images(model, pixels) @ encode_texts(model, tokenizer, prompts).t()  # (N, K)
    out = {}
    for a, attribute in enumerate(WORLD_ATTRIBUTES[1:], start=1):
        names = sorted({combo[a] for combo in combos}, key=[combo[a] for combo in combos].index)
        combo_class = torch.tensor([names.index(combo[a]) for combo in combos])
        truth = torch.tensor([names.index(getattr(s.objects[0], attribute)) for s in scenes])
        scores = marginal_logits(logits, combo_class, len(names))
        out[f"zero_shot_{attribute}"] = topk_accuracy(scores, truth, ks=(1,))["top1"]
    return out


def world_retrieval(model, tokenizer, split: str = "test", n: int = 1000) -> dict[str, float]:
    """Retrieval between n single-object scenes and their detailed captions (one each).

    Besides the strict Recall@K (the exact image), reports `t2i_R@1_match`: the top image's own
    detailed caption (same template) equals the query. Captions do not say an object's exact
    spot inside its cell, so scenes with identical captions are indistinguishable from text and
    the strict R@1 has a ceiling below 1 (about 0.7 for 1,000 scenes).
    """
    scenes, pixels = _world_scenes(split, n, model.config.image_size)
    texts = [s.caption("detailed") for s in scenes]
    similarity = encode_images(model, pixels) @ encode_texts(model, tokenizer, texts).t()  # (N, N)
    out = retrieval_recall(similarity, torch.arange(n))
    top = similarity.argmax(dim=0).tolist()
    variants = [s.seed % 3 for s in scenes]  # the template `caption("detailed")` picked
    out["t2i_R@1_match"] = float(np.mean([scenes[j].caption("detailed", variants[i]) == texts[i]
                                          for i, j in enumerate(top)]))
    counts = Counter(texts)
    out["t2i_R@1_ceiling"] = float(np.mean([1.0 / counts[t] for t in texts]))
    return out


def fashion_zero_shot(model, tokenizer, split: str = "test", n: int | None = None) -> dict[str, float]:
    """Zero-shot top-1 / top-5 on Fashion-MNIST `split` (first n images; None = all)."""
    from polymodal.data.formats.idx import FASHION_MNIST_CLASSES, FashionMNIST
    from polymodal.data.sources import CLASS_TEMPLATES

    data = FashionMNIST(split)
    count = len(data) if n is None else min(n, len(data))
    images = encode_images(model, pixels_from_uint8(data.images[:count]))
    names = [c.lower() for c in FASHION_MNIST_CLASSES]
    classifier = zero_shot_classifier(model, tokenizer, prompts_from_templates(names, CLASS_TEMPLATES))
    labels = torch.from_numpy(data.labels[:count].astype(np.int64))
    return {f"zero_shot_{k}": v for k, v in topk_accuracy(images @ classifier.t(), labels).items()}


def evaluate(model, tokenizer, data: str = "world", split: str = "test", n: int = 1000,
             progress: bool = True) -> dict[str, float]:
    """`polymodal eval` for the `clip` family.

    data "world": split val / test / compositional; zero-shot color, shape, position on n
    single-object scenes, and retrieval with n detailed captions. data "fashion-mnist": zero-shot
    on the test split (n images; the whole split when n >= 10,000). progress: a bar over the suites.
    """
    from tqdm import tqdm

    suites = {"world": (world_zero_shot, world_retrieval), "fashion-mnist": (fashion_zero_shot,)}
    if data not in suites:
        raise UsageError(f"--data: the clip family evaluates on 'world' or 'fashion-mnist', got {data!r}")
    metrics: dict[str, float] = {}
    for suite in tqdm(suites[data], desc=f"eval clip ({data})", unit="suite", disable=not progress):
        metrics.update(suite(model, tokenizer, split if data == "world" else "test", n))
    return metrics
