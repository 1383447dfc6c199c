"""Image-text batches for dual encoders (CLIP, SigLIP, LiT, CoCa): pixels, tokens, and batch streams.

Every image tower of the `clip` family takes pixels in [-1, 1] (`pixels_from_uint8`) and every
text tower token ids with a mask (`tokenize_captions`); the recipe and `polymodal eval` both use
these, so they cannot disagree. `PairBatches` turns any map-style list of (image, captions)
items (Fashion-MNIST, a user's COCO / WebDataset / folder / pairs files, a mixture of them) into
a resumable batch function: batch i draws its items from the epoch's seeded permutation and its
captions from a generator seeded by i.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image


def tokenize_captions(tokenizer, texts: Sequence[str], max_tokens: int,
                      special_tokens: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids and mask: (input_ids (N, T), attention_mask (N, T)), T <= max_tokens.

    special_tokens=False (our text tower): the plain ids + eos, where the tower pools; cut captions
    keep the eos last. True (a pretrained BERT tower): the tokenizer's own special tokens
    ([CLS] ... [SEP]), as the tower was trained with.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if special_tokens:
        rows = [ids[:max_tokens] for ids in tokenizer.encode_batch(list(texts), add_special_tokens=True)]
    else:
        rows = [ids[:max_tokens - 1] + [eos] for ids in tokenizer.encode_batch(list(texts))]
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad if pad is not None else eos, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return input_ids, mask


def pixels_from_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) or (N, H, W) -> float (N, C, H, W) in [-1, 1] (mean 0.5, std 0.5)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(127.5).sub_(1.0)
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


def scene_pixels(scenes, size: int | None = None) -> torch.Tensor:
    """World scenes rendered (at `size`, default their own) as float (N, 3, S, S) in [-1, 1]."""
    return pixels_from_uint8(np.stack([scene.render(size) for scene in scenes]))


def image_array(image: Any, size: int, channels: int) -> np.ndarray:
    """A uint8 array (H, W) for 1 channel or (H, W, 3) of a PIL image resized (bicubic) to size x
    size; a uint8 array is passed through (the towers resize what they must themselves)."""
    if isinstance(image, np.ndarray):
        return image
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


class PairBatches:
    """batch_fn over a map-style list of (image, captions) items: batch i holds `batch_size` items
    of the epoch's permutation (`numpy.random.default_rng([seed, epoch])`), each with one caption
    drawn by a generator seeded from i. items[k] -> (PIL image or uint8 array, list of captions).
    """

    def __init__(self, items, tokenizer, batch_size: int, image_size: int, channels: int, max_tokens: int,
                 seed: int = 0, special_tokens: bool = False) -> None:
        if len(items) < batch_size:
            raise ValueError(f"the data holds {len(items)} items, fewer than one batch of {batch_size}")
        self.items, self.tokenizer, self.batch_size = items, tokenizer, batch_size
        self.image_size, self.channels, self.max_tokens = image_size, channels, max_tokens
        self.seed, self.special_tokens = seed, special_tokens

    def __call__(self, index: int) -> dict:
        per_epoch = len(self.items) // self.batch_size
        epoch, offset = divmod(index, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.items))
        rng = np.random.default_rng([self.seed, index, 11])
        images, texts = [], []
        for k in order[offset * self.batch_size:(offset + 1) * self.batch_size]:
            image, captions = self.items[int(k)]
            images.append(image_array(image, self.image_size, self.channels))
            texts.append(captions[int(rng.integers(len(captions)))])
        input_ids, mask = tokenize_captions(self.tokenizer, texts, self.max_tokens, self.special_tokens)
        return {"pixel_values": pixels_from_uint8(np.stack(images)), "input_ids": input_ids, "attention_mask": mask}
