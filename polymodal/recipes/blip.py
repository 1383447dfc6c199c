"""Recipes `blip` (pre-training with ITC + ITM + captioning) and `blip_capfilt` (BLIP's CapFilt).

`blip`: world image-caption pairs, batch i drawn exactly as the `clip` recipe draws it
(`WorldPairs`: scenes [i*B, (i+1)*B) of the train split, one caption each, same caption choice),
so the two families can be compared on the same data. Captions are tokenized "[CLS] caption
[SEP]" (`blip_tokenize`); `data.noise` replaces that share of a batch's captions with another
pair's caption, the noisy web alt-text CapFilt is meant to clean. The world tokenizer has no
[CLS] / [ENC] / [DEC]; three of its special tokens that no caption contains stand in for them
(`WORLD_TASK_TOKENS`).

`blip_capfilt` (Li et al., 2022, section 3.3): a trained BLIP checkpoint (`init_from`) captions
`data.num_scenes` train images (the captioner), its ITM head scores every (image, web
caption) and (image, synthetic caption) pair (the filter), the pairs with P(match) >=
`data.threshold` form the cleaned set, and training continues on it. BLIP fine-tunes a separate
captioner and filter on clean data first; here one model plays both parts. The captioner
decodes greedily, or samples with nucleus sampling as the paper's does (`data.top_p`). Every
candidate and the decision is written to DIR/capfilt.jsonl.

The objective is `polymodal.train.objectives.blip.blip_loss`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from polymodal.atomic import write_text_atomic
from polymodal.data.dual_encoder import scene_pixels, tokenize_captions
from polymodal.data.world.text import all_captions, check_caption_styles, draw_caption
from polymodal.errors import ConfigError
from polymodal.models.blip import BlipConfig, BlipModel
from polymodal.recipes.clip import WorldPairs
from polymodal.recipes.runner import TrainingJob
from polymodal.train.data import IndexedBatches, ShuffledBatches
from polymodal.train.loop import TrainConfig
from polymodal.train.objectives.blip import blip_loss

# World tokenizer stand-ins for BERT's task tokens: never produced by encoding a caption.
WORLD_TASK_TOKENS = {"cls_token_id": "<|endoftext|>", "enc_token_id": "<|im_start|>", "bos_token_id": "<|image_start|>"}


def blip_tokenize(config: BlipConfig, tokenizer, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded "[CLS] caption [SEP]" ids and mask (N, T), T <= max_positions.

    With `text.cls_token_id` set (a tokenizer without special tokens, e.g. the world's) the ids
    are [CLS] + caption + eos; otherwise the tokenizer adds its own [CLS] ... [SEP] (BERT's)."""
    t = config.text
    if t.cls_token_id is None:
        return tokenize_captions(tokenizer, texts, t.max_positions, special_tokens=True)
    ids, mask = tokenize_captions(tokenizer, texts, t.max_positions - 1)
    ids = torch.cat([torch.full((len(ids), 1), t.cls_token_id), ids], dim=1)
    return ids, torch.cat([torch.ones(len(mask), 1, dtype=mask.dtype), mask], dim=1)


def decode_captions(tokenizer, rows: list[list[int]]) -> list[str]:
    """Caption texts of generated id rows."""
    return [tokenizer.decode(row).strip() for row in rows]


@dataclass
class BlipDataConfig:
    """World pairs: batch_size; caption_styles / background / num_objects as the `clip` recipe's
    world data; noise: share of each batch's captions swapped for another pair's (noisy web text)."""

    batch_size: int = 64
    caption_styles: list[str] = field(default_factory=lambda: ["short", "detailed"])
    background: str = "plain"
    num_objects: tuple[int, int] = (1, 1)
    noise: float = 0.0

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ConfigError(f"data.batch_size must be >= 2 (a contrastive batch), got {self.batch_size}")
        if not 0.0 <= self.noise < 1.0:
            raise ConfigError(f"data.noise must be in [0, 1), got {self.noise}")
        check_caption_styles(self.caption_styles, "data.caption_styles")


@dataclass
class BlipRecipeConfig:
    """A `blip` run: init_from a blip checkpoint to continue (else a fresh `model` on the world
    tokenizer), data, training."""

    recipe: str = "blip"
    init_from: str | None = None
    model: BlipConfig = field(default_factory=BlipConfig)
    data: BlipDataConfig = field(default_factory=BlipDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class BlipWorldPairs(WorldPairs):
    """`WorldPairs` (the `clip` recipe's world batches) tokenized by `blip_tokenize`, with `noise`
    applied."""

    def __init__(self, config: BlipConfig, tokenizer, data: BlipDataConfig, seed: int):
        super().__init__(tokenizer, data.batch_size, config.image_size, config.text.max_positions,
                         data.caption_styles, data.background, seed=seed, num_objects=data.num_objects)
        self.config, self.noise, self.seed = config, data.noise, seed

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """"[CLS] caption [SEP]" ids and mask, as evaluation, CapFilt and serving tokenize them."""
        return blip_tokenize(self.config, self.tokenizer, texts)

    def __call__(self, index: int) -> dict:
        batch = super().__call__(index)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.noise:  # in place: rows of the batch's own tensors
            rng = np.random.default_rng([self.seed, index, 29])
            noisy = np.flatnonzero(rng.random(len(ids)) < self.noise)
            other = (noisy + rng.integers(1, len(ids), len(noisy))) % len(ids)  # another pair, never itself
            ids[noisy], mask[noisy] = ids[other], mask[other]
        return batch


def world_blip_config(config: BlipConfig, tokenizer) -> BlipConfig:
    """`config` with the text vocabulary and task tokens of the world tokenizer."""
    t = config.text
    t.vocab_size, t.eos_token_id, t.pad_token_id = tokenizer.vocab_size, tokenizer.eos_token_id, tokenizer.pad_token_id
    for name, token in WORLD_TASK_TOKENS.items():
        setattr(t, name, tokenizer.token_to_id(token))
    t.__post_init__()
    return config


def load_blip(path: str, need: Sequence[str] = ()) -> tuple[BlipModel, object]:
    """A blip checkpoint and its tokenizer, in training mode; a ConfigError unless it has the sides `need`."""
    from polymodal.api import load

    model, tokenizer = load(path)
    if getattr(model, "family", None) != "blip":
        raise ConfigError(f"init_from {path} holds a {getattr(model, 'family', None)!r} model, not blip")
    missing = [side for side in need if not getattr(model.config, side)]
    if missing:
        raise ConfigError(f"init_from {path}: the model has no {' / '.join(missing)} side, which this recipe needs")
    if tokenizer is None:
        raise ConfigError(f"init_from {path} has no tokenizer")
    return model.train(), tokenizer


def blip_job(config: BlipRecipeConfig) -> TrainingJob:
    """The `blip` recipe's training job: world pairs, `blip_loss`."""
    if config.init_from:
        model, tokenizer = load_blip(config.init_from)
    else:
        from polymodal.data.world import world_tokenizer

        tokenizer = world_tokenizer()
        model = BlipModel(world_blip_config(config.model, tokenizer))
    params = sum(p.numel() for p in model.parameters())
    print(f"blip: training {params / 1e6:.2f}M parameters on world pairs, batch {config.data.batch_size}")
    batches = IndexedBatches(BlipWorldPairs(model.config, tokenizer, config.data, config.train.seed))
    return TrainingJob(model, batches, blip_loss, tokenizer=tokenizer)


# --- CapFilt -----------------------------------------------------------------------------------


@dataclass
class CapFiltRecord:
    """One candidate caption of CapFilt: scene index, source ("web" | "synthetic"), text, the
    filter's P(match), whether it was kept, and whether it is noise: a web caption swapped in
    from another scene, or a synthetic caption that is not exactly one of the scene's world
    captions (the exact check the world allows)."""

    scene: int
    source: str
    caption: str
    p_match: float
    kept: bool
    noisy: bool = False


def capfilt(web: Sequence[tuple[int, str]], propose: Callable[[list[int]], list[str]],
            score: Callable[[list[int], list[str]], list[float]], threshold: float,
            batch_size: int = 64) -> list[CapFiltRecord]:
    """BLIP's CapFilt over (scene, web caption) pairs: `propose` (the captioner) writes one
    synthetic caption per scene, `score` (the filter) gives P(match) of (scene, caption) pairs; a
    candidate is kept iff its score >= `threshold`. Returns every candidate, web then synthetic
    per chunk of `batch_size` scenes, with its decision."""
    records = []
    for start in range(0, len(web), batch_size):
        chunk = list(web[start:start + batch_size])
        scenes = [scene for scene, _ in chunk]
        synthetic = propose(scenes)
        if len(synthetic) != len(scenes):
            raise ValueError(f"the captioner returned {len(synthetic)} captions for {len(scenes)} images")
        texts = [text for _, text in chunk] + list(synthetic)
        scores = score(scenes + scenes, texts)
        for i, (scene, text, p) in enumerate(zip(scenes + scenes, texts, scores)):
            records.append(CapFiltRecord(scene, "web" if i < len(chunk) else "synthetic", text, float(p),
                                         bool(p >= threshold)))
    return records


@dataclass
class CapFiltDataConfig:
    """num_scenes: train scenes bootstrapped; noise: share of their web captions that belong to
    another scene; threshold: the filter's P(match) to keep a caption; max_caption_tokens: the
    captioner's length limit; top_p: nucleus sampling for the captioner (the paper's 0.9; None:
    greedy), seeded by train.seed; batch_size: pairs per training step (and per captioning chunk);
    caption_styles / background / num_objects: the world's options for the web captions."""

    num_scenes: int = 2000
    noise: float = 0.3
    threshold: float = 0.5
    max_caption_tokens: int = 24
    top_p: float | None = None
    batch_size: int = 64
    caption_styles: list[str] = field(default_factory=lambda: ["short", "detailed"])
    background: str = "plain"
    num_objects: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        for name in ("num_scenes", "max_caption_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ConfigError(f"data.batch_size must be >= 2 (a contrastive batch), got {self.batch_size}")
        if not 0.0 <= self.noise < 1.0:
            raise ConfigError(f"data.noise must be in [0, 1), got {self.noise}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"data.threshold must be in [0, 1], got {self.threshold}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"data.top_p must be in (0, 1] or null (greedy), got {self.top_p}")
        check_caption_styles(self.caption_styles, "data.caption_styles")


@dataclass
class CapFiltRecipeConfig:
    """A `blip_capfilt` run: init_from the blip checkpoint (both sides) that captions and filters
    and then trains on the cleaned set."""

    recipe: str = "blip_capfilt"
    init_from: str | None = None
    data: CapFiltDataConfig = field(default_factory=CapFiltDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def web_captions(world, data: CapFiltDataConfig, seed: int) -> tuple[list[tuple[int, str]], list[bool]]:
    """(scene, web caption) for scenes [0, num_scenes) and which captions are noise (another scene's)."""
    rng = np.random.default_rng([seed, 31])
    n = data.num_scenes
    own = [draw_caption(world[i], data.caption_styles, rng) for i in range(n)]
    noisy = rng.random(n) < data.noise
    if n < 2:
        noisy[:] = False
    other = (np.arange(n) + rng.integers(1, max(n, 2), n)) % n
    texts = [own[int(other[i])] if noisy[i] else own[i] for i in range(n)]
    # A swapped-in caption that happens to describe the scene as well is not noise.
    flags = [bool(noisy[i]) and texts[i] != own[i] for i in range(n)]
    return list(enumerate(texts)), flags


def capfilt_job(config: CapFiltRecipeConfig) -> TrainingJob:
    """Caption, filter, write DIR/capfilt.jsonl, and continue training on the cleaned set."""
    from polymodal.data.world import World

    if not config.init_from:
        raise ConfigError("blip_capfilt: set init_from to a trained blip checkpoint (it captions and filters)")
    model, tokenizer = load_blip(config.init_from, need=("retrieval", "captioning"))
    d, seed = config.data, config.train.seed
    world = World("train", image_size=model.config.image_size, num_objects=tuple(d.num_objects),
                  background=d.background, seed=seed)
    web, noisy = web_captions(world, d, seed)
    device = next(model.parameters()).device
    model.eval()
    sampling = torch.Generator(device).manual_seed(seed)

    def propose(scenes: list[int]) -> list[str]:
        pixels = scene_pixels([world[i] for i in scenes]).to(device)
        return decode_captions(tokenizer, model.generate_captions(pixels, max_new_tokens=d.max_caption_tokens,
                                                                  top_p=d.top_p, generator=sampling))

    def score(scenes: list[int], texts: list[str]) -> list[float]:
        ids, mask = blip_tokenize(model.config, tokenizer, texts)
        pixels = scene_pixels([world[i] for i in scenes]).to(device)
        return model.match_probability(pixels, ids.to(device), mask.to(device)).tolist()

    records = capfilt(web, propose, score, d.threshold, d.batch_size)
    for record in records:
        record.noisy = (bool(noisy[record.scene]) if record.source == "web"
                        else record.caption not in all_captions(world[record.scene]))
    model.train()
    kept = [(r.scene, r.caption) for r in records if r.kept]
    print(capfilt_summary(records))
    if config.train.out_dir:
        lines = [json.dumps(r.__dict__) for r in records]
        write_text_atomic(Path(config.train.out_dir) / "capfilt.jsonl", "\n".join(lines) + "\n")
    if len(kept) < d.batch_size:
        raise ConfigError(f"blip_capfilt: the filter kept {len(kept)} captions, fewer than one batch of "
                          f"{d.batch_size}; lower data.threshold or train the init_from model longer")

    def collate(indices: list[int]) -> dict:
        pairs = [kept[i] for i in indices]
        ids, mask = blip_tokenize(model.config, tokenizer, [text for _, text in pairs])
        # image_ids: a scene's web and synthetic captions may share a batch; neither is the other's negative.
        return {"pixel_values": scene_pixels([world[s] for s, _ in pairs]), "input_ids": ids, "attention_mask": mask,
                "image_ids": torch.tensor([s for s, _ in pairs])}

    return TrainingJob(model, ShuffledBatches(len(kept), d.batch_size, collate, seed=seed), blip_loss,
                       tokenizer=tokenizer)


def capfilt_summary(records: Sequence[CapFiltRecord]) -> str:
    """One line: how many web and synthetic captions, clean and noisy, the filter kept."""
    def share(selected: list[CapFiltRecord]) -> str:
        return f"{sum(r.kept for r in selected)}/{len(selected)}"

    parts = []
    for source in ("web", "synthetic"):
        mine = [r for r in records if r.source == source]
        parts.append(f"{source} clean {share([r for r in mine if not r.noisy])}, "
                     f"{source} noisy {share([r for r in mine if r.noisy])}")
    return "capfilt: kept " + ", ".join(parts)
