"""A user's data for the recipes: map-style views of real data files, chosen and mixed in a YAML.

A recipe's `data.source` (with `data.path`, `data.image_root`, `data.strict`) or a list of
weighted sources (`data.mix`) names what to train on. Each file source is read once into an
index of records (paths and texts, not pixels), and item i loads its images on demand, so a
training stream can shuffle by epoch and resume exactly (a batch is a pure function of its
position, `polymodal.train.data`):

- `image_text_items(source)` -> (image, captions) items, for contrastive training:
  "coco" (captions JSON), "webdataset" (tar shards: an image + `.txt`, or our export's `.json`
  captions), "folder" (one folder per class; captions from `CLASS_TEMPLATES`), "pairs" (JSONL/CSV);
- `conversation_items(source)` -> (messages, images) items, for MM-LLM training: "llava"
  (conversation JSON/JSONL), "coco" and "webdataset" (image-caption chats; our export's shards
  carry whole conversations, which are used as they are).

Bad records are skipped and counted with a warning naming file and record, or raise in strict
mode, as the readers of `polymodal.data.formats` do. WebDataset shards are indexed by their tar
headers (`WebDatasetIndex`): a sample is read with one seek, so shards serve random access.
`Mixture` lays several sources end to end, each repeated by its weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from polymodal.data.conversation import IMAGE_MARKER
from polymodal.data.image import decode_image, load_image
from polymodal.data.loading import DataError, SkipCounter
from polymodal.errors import ConfigError

IMAGE_TEXT_SOURCES = ("coco", "webdataset", "folder", "pairs")
CONVERSATION_SOURCES = ("llava", "coco", "webdataset")
CLASS_TEMPLATES = ("a photo of a {}", "a picture of a {}", "an image of a {}", "a {}")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
ImageLoader = Callable[[], Image.Image]


@dataclass
class SourceConfig:
    """One data source of a recipe.

    source: a name of the recipe's sources ("world" or a file format); path: the file, folder
    or shard pattern ("shards/{000000..000003}.tar") of a file source; image_root: the folder
    image paths are relative to (default: the file's folder); weight: how many times each item
    is seen per epoch of a mixture (0.5: half of them); strict: a bad record is an error, not a
    counted skip.
    """

    source: str = "world"
    path: str | None = None
    image_root: str | None = None
    weight: float = 1.0
    strict: bool = False

    def check(self, known: Sequence[str], where: str) -> "SourceConfig":
        """Validate against the sources a recipe knows (`where` names the config field); returns self."""
        if self.source not in known:
            raise ConfigError(f"{where}.source must be one of {list(known)}, got {self.source!r}")
        needs_path = self.source not in ("world", "fashion-mnist")
        if needs_path and not self.path:
            raise ConfigError(f"{where}.path is required for source {self.source!r} (the file, folder or shard pattern)")
        if not needs_path and (self.path or self.image_root):
            raise ConfigError(f"{where}: source {self.source!r} is built in; it takes no path or image_root")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ConfigError(f"{where}.weight must be a positive number, got {self.weight}")
        return self


@dataclass
class ImageTextItem:
    """An image (loaded on demand) and its captions."""

    image: ImageLoader
    captions: list[str]


@dataclass
class ConversationItem:
    """A chat [{"role", "content"}] and the images its `<image>` markers stand for (loaded on demand)."""

    messages: list[dict]
    images: list[ImageLoader]


class WebDatasetIndex:
    """Random access to the samples of WebDataset tar shards, from their headers alone.

    Samples are the runs of members sharing a key (`polymodal.data.formats.tarstream`), in shard
    order. A shard cut or broken mid-archive keeps the samples before the break; the break is a
    counted skip naming the shard and byte offset (an error in strict mode), as is a sample with
    a bad member. `self[i]` -> {extension: bytes} of sample i, read with one seek per member.
    """

    def __init__(self, shards: str | Sequence[str], strict: bool = False) -> None:
        import webdataset as wds

        from polymodal.data.formats.tarstream import iter_shard

        self.urls = list(wds.shardlists.expand_urls(shards)) if isinstance(shards, str) else [str(s) for s in shards]
        if not self.urls:
            raise DataError(f"webdataset: no shards in {shards!r}")
        self.skipped = SkipCounter(shards if isinstance(shards, str) else self.urls[0], strict)
        self.samples = []
        for url in self.urls:
            for sample in iter_shard(url, self.skipped, read_data=False):
                if sample.problem is not None:
                    self.skipped.skip(f"{url}: key {sample.key}", sample.problem)
                else:
                    self.samples.append(sample)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, bytes]:
        sample = self.samples[index]
        out = {}
        with open(sample.shard, "rb") as handle:
            for ext, (offset, size) in sample.spans.items():
                handle.seek(offset)
                out[ext] = handle.read(size)
        return out

    def where(self, index: int) -> str:
        """"shard: key K" of sample `index`, for messages."""
        return f"{self.samples[index].shard}: key {self.samples[index].key}"


def image_text_items(config: SourceConfig) -> list[ImageTextItem]:
    """The (image, captions) items of a file source (see the module docstring)."""
    from polymodal.data import formats

    path, root, strict = config.path, config.image_root, config.strict
    if config.source == "coco":
        reader = formats.CocoCaptionsReader(path, image_root=root, strict=strict)
        items = [ImageTextItem(_file_loader(r.image), r.captions) for r in reader]
    elif config.source == "pairs":
        reader = formats.PairsReader(path, image_root=root, strict=strict)
        items = [ImageTextItem(_file_loader(r.image), [r.text]) for r in reader]
    elif config.source == "folder":
        reader = formats.ImageFolderReader(path, strict=strict)
        items = [ImageTextItem(_file_loader(r.image), [t.format(r.class_name.replace("_", " ")) for t in CLASS_TEMPLATES])
                 for r in reader]
    elif config.source == "webdataset":
        return _webdataset_items(config, conversations=False)
    else:
        raise DataError(f"image-text source must be one of {IMAGE_TEXT_SOURCES}, got {config.source!r}")
    return _non_empty(items, config)


def conversation_items(config: SourceConfig, describe_prompts: Sequence[str]) -> list[ConversationItem]:
    """The (messages, images) items of a file source; caption sources become one-turn chats that
    ask `describe_prompts[i % len]` and answer with caption `i % len(captions)` of item i."""
    from polymodal.data import formats

    if config.source == "llava":
        reader = formats.LlavaReader(config.path, image_root=config.image_root, strict=config.strict)
        items = [ConversationItem(r.messages, [_file_loader(p) for p in r.images]) for r in reader]
        return _non_empty(items, config)
    if config.source == "coco":
        pairs = image_text_items(config)
        return [_caption_chat(item.image, item.captions, i, describe_prompts) for i, item in enumerate(pairs)]
    if config.source == "webdataset":
        return _webdataset_items(config, conversations=True, describe_prompts=describe_prompts)
    raise DataError(f"conversation source must be one of {CONVERSATION_SOURCES}, got {config.source!r}")


def _caption_chat(image: ImageLoader, captions: list[str], index: int, prompts: Sequence[str]) -> ConversationItem:
    messages = [{"role": "user", "content": IMAGE_MARKER + "\n" + prompts[index % len(prompts)]},
                {"role": "assistant", "content": captions[index % len(captions)]}]
    return ConversationItem(messages, [image])


def _webdataset_items(config: SourceConfig, conversations: bool, describe_prompts: Sequence[str] = ()) -> list:
    """Items of WebDataset shards: the image member, and captions (`.txt`, or `.json`
    "captions") or, for conversations, the `.json` "conversation" when a sample has one."""
    import json

    index = WebDatasetIndex(config.path, strict=config.strict)
    items = []
    for i, sample in enumerate(index.samples):
        where, members = index.where(i), sample.spans
        ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        try:
            if ext is None:
                raise DataError(f"no image member (.{'/.'.join(IMAGE_EXTENSIONS)}); members: {sorted(members)}")
            raw = index[i]
            meta = json.loads(raw["json"]) if "json" in raw else {}
            if not isinstance(meta, dict):
                raise DataError(".json member is not an object")
            loader = _bytes_loader(index, i, ext, where)
            if conversations and isinstance(meta.get("conversation"), list):
                messages = _checked_messages(meta["conversation"])
                items.append(ConversationItem(messages, [loader]))
                continue
            captions = [raw["txt"].decode("utf-8")] if "txt" in raw else meta.get("captions")
            if not (isinstance(captions, list) and captions and all(isinstance(c, str) and c for c in captions)):
                raise DataError("no caption: neither a .txt member nor a .json 'captions' list of strings")
        except (DataError, ValueError, UnicodeDecodeError, RecursionError) as err:
            index.skipped.skip(where, err)
            continue
        items.append(_caption_chat(loader, captions, i, describe_prompts) if conversations
                     else ImageTextItem(loader, captions))
    return _non_empty(items, config)


def _checked_messages(messages: list) -> list[dict]:
    """A stored conversation, checked: objects with a chat role and string content."""
    for m in messages:
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise DataError(f"conversation message {m!r} needs a chat 'role' and a string 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _file_loader(path: Path) -> ImageLoader:
    return lambda: load_image(path)


def _bytes_loader(index: WebDatasetIndex, i: int, ext: str, where: str) -> ImageLoader:
    return lambda: decode_image(index[i][ext], f"{where}.{ext}")


def _non_empty(items: list, config: SourceConfig) -> list:
    if not items:
        raise DataError(f"data source {config.source!r} at {config.path} holds no usable records")
    return items


class Mixture:
    """Several map-style sources laid end to end, source k repeated by weight_k per epoch.

    lengths[k] items of source k appear round(weight_k * lengths[k]) times (at least once) in a
    mixture epoch, spread evenly over the source: a weight of 2 shows every item twice, 0.5 every
    other item. `locate(i)` -> (k, j):
    mixture item i is item j of source k. Pure functions of i, so mixed streams resume exactly.
    """

    def __init__(self, lengths: Sequence[int], weights: Sequence[float]) -> None:
        if len(lengths) != len(weights) or not lengths:
            raise ValueError("Mixture: one weight per source, and at least one source")
        self.lengths = list(lengths)
        self.counts = [max(1, round(w * n)) for n, w in zip(lengths, weights)]
        self.starts = [sum(self.counts[:k]) for k in range(len(self.counts))]

    def __len__(self) -> int:
        return sum(self.counts)

    def locate(self, index: int) -> tuple[int, int]:
        """(source k, item j within it) of mixture item `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"mixture index {index} out of range [0, {len(self)})")
        k = max(k for k, start in enumerate(self.starts) if start <= index)
        return k, (index - self.starts[k]) * self.lengths[k] // self.counts[k]
