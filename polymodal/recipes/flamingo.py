"""Recipe `flamingo`: train the resampler and gated cross-attention of a Flamingo on interleaved world documents.

A document is a few image/question/answer chunks of different scenes, one after another (the
interleaved web pages Flamingo trains on, made of shapes-world VQA):

    <image>\\nQ: What color is the circle?\\nA: red\\n<image>\\nQ: ...\\nA: blue\\n ...

with the answers as next-token targets. All chunks of a document ask one question type, so a
model learns to use earlier chunks as examples: the few-shot prompts of `polymodal.eval.flamingo`
are such documents cut before the last answer. "Q:/A:" is the `lm` recipe's world-qa format
(`polymodal.data.text_documents`), so an LM trained by `configs/lm/world_qa.yaml` already answers
in it and only has to be shown the scene.

The model: `init_from` a flamingo checkpoint, or built around `lm_from` — an `lm` checkpoint (its
LM and tokenizer; a fresh vision tower from `model`) or an `mmllm` checkpoint (its LM, vision tower
and image preset) — or a fresh LM on the world tokenizer. By default only the projector (the
Perceiver resampler) and the gated layers (`xattn`) train: the LM and the vision tower stay frozen.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from polymodal.data.conversation import IMAGE_MARKER, ImageProcessor
from polymodal.errors import ConfigError
from polymodal.models.flamingo import Flamingo, FlamingoConfig
from polymodal.recipes.runner import TrainingJob
from polymodal.sequence import Document, Segment, pack_documents
from polymodal.train.data import ShuffledBatches
from polymodal.train.loop import TrainConfig
from polymodal.train.objectives import sequence_loss

PARTS = ("vision", "projector", "lm", "xattn")
# What an mmllm checkpoint's vision tower brings along into the Flamingo config.
TOWER_FIELDS = ("vision_tower", "vision", "cnn", "gridpool", "vision_feature_layer", "drop_class_token", "image_preset")


@dataclass
class FlamingoDataConfig:
    """num_scenes: train scenes the chunks are drawn from; num_objects / background: the world's
    options; chunks: (min, max) image/QA chunks per document; question_weights: {qtype: n >= 1}
    draws a document's question type n times as often; docs_per_batch; max_tokens: packed row length."""

    num_scenes: int = 20000
    num_objects: tuple[int, int] = (1, 3)
    background: str = "plain"
    chunks: tuple[int, int] = (1, 5)
    question_weights: dict[str, int] = field(default_factory=dict)
    docs_per_batch: int = 16
    max_tokens: int = 1024

    def __post_init__(self) -> None:
        from polymodal.data.world import text

        for name in ("num_scenes", "docs_per_batch", "max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        lo, hi = self.chunks
        if not 1 <= lo <= hi <= 64:
            raise ConfigError(f"data.chunks must be (min, max) with 1 <= min <= max <= 64, got {self.chunks!r}")
        text.check_question_weights(self.question_weights, "data.question_weights")


@dataclass
class FlamingoRecipeConfig:
    """init_from: a flamingo checkpoint to continue; lm_from: an `lm` or `mmllm` checkpoint whose LM
    (and, for mmllm, vision tower) the model wraps; model: the Flamingo config (its `lm` and
    `image_token_id` are taken from the LM and tokenizer); trainable: parts from PARTS (None:
    projector and xattn)."""

    recipe: str = "flamingo"
    init_from: str | None = None
    lm_from: str | None = None
    model: FlamingoConfig = field(default_factory=FlamingoConfig)
    trainable: list[str] | None = None
    data: FlamingoDataConfig = field(default_factory=FlamingoDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for part in self.trainable or []:
            if part not in PARTS:
                raise ConfigError(f"flamingo recipe: trainable entries must be among {PARTS}, got {part!r}")


def qa_chunk(tokenizer, image_token_id: int, pixels: torch.Tensor, question: str, answer: str | None) -> list[Segment]:
    """One interleaved chunk "<image>\\nQ: {question}\\nA: {answer}\\n" as segments: the marker
    carrying the pixels (3, H, W), the prompt (no target) and, when given, the answer (the target)."""
    segments = [Segment("image", tokens=[image_token_id], data=pixels, target=None),
                Segment("text", tokens=tokenizer.encode(f"\nQ: {question}\nA:"), target=None)]
    if answer is not None:
        segments.append(Segment("text", tokens=tokenizer.encode(f" {answer}\n")))
    return segments


def questions_of_type(scene, qtype: str) -> list:
    """The scene's questions of one type."""
    return [qa for qa in scene.questions() if qa.qtype == qtype]


def draw_type(rng: np.random.Generator, weights: dict[str, int]) -> str:
    """A question type drawn by `weights` (1 for the types it leaves out)."""
    from polymodal.data.world import QTYPES

    pool = [qtype for qtype in QTYPES for _ in range(weights.get(qtype, 1))]
    return pool[int(rng.integers(len(pool)))]


def interleaved_document(world, index: int, config: FlamingoDataConfig, tokenizer, image_token_id: int,
                         processor: ImageProcessor, seed: int) -> Document:
    """Document `index`: a few chunks of scenes drawn from `world`, all asking one question type."""
    rng = np.random.default_rng([seed, index, 505])
    qtype = draw_type(rng, config.question_weights)
    count = int(rng.integers(config.chunks[0], config.chunks[1] + 1))
    segments: list[Segment] = []
    while count:
        scene = world[int(rng.integers(config.num_scenes))]
        pool = questions_of_type(scene, qtype)
        if not pool:  # e.g. no relation question in a one-object scene: try another scene
            continue
        qa = pool[int(rng.integers(len(pool)))]
        segments += qa_chunk(tokenizer, image_token_id, processor(scene.image()), qa.question, qa.answer)
        count -= 1
    return Document(segments)


def build_flamingo(config: FlamingoRecipeConfig) -> tuple[Flamingo, object]:
    """The model and tokenizer per `init_from`, `lm_from` or a fresh LM on the world tokenizer."""
    from polymodal.api import load

    if config.init_from:
        model, tokenizer = load(config.init_from)
        if getattr(model, "family", None) != "flamingo":
            raise ConfigError(f"flamingo recipe: init_from {config.init_from} holds a "
                              f"{getattr(model, 'family', None)!r} model, not flamingo")
        return model.train(), tokenizer
    fields = {f.name: getattr(config.model, f.name) for f in dataclasses.fields(FlamingoConfig)}
    lm = vision = None
    if config.lm_from:
        source, tokenizer = load(config.lm_from)
        family = getattr(source, "family", None)
        if family == "lm":
            lm = source
        elif family == "mmllm":
            lm, vision = source.lm, source.vision
            fields.update({name: getattr(source.config, name) for name in TOWER_FIELDS})
        else:
            raise ConfigError(f"flamingo recipe: lm_from {config.lm_from} holds a {family!r} model, not lm or mmllm")
        if tokenizer is None:
            raise ConfigError(f"flamingo recipe: lm_from {config.lm_from} has no tokenizer")
        fields["lm"] = lm.config
    else:
        from polymodal.data.world import world_tokenizer

        tokenizer = world_tokenizer()
        fields["lm"] = dataclasses.replace(config.model.lm, vocab_size=tokenizer.vocab_size,
                                           eos_token_id=tokenizer.eos_token_id)
    marker = tokenizer.token_to_id(IMAGE_MARKER)
    if marker is None:
        raise ConfigError(f"flamingo recipe: the tokenizer has no {IMAGE_MARKER!r} token to mark images with")
    fields["image_token_id"] = marker
    return Flamingo(FlamingoConfig(**fields), vision=vision, lm=lm), tokenizer


def flamingo_job(config: FlamingoRecipeConfig) -> TrainingJob:
    """The training job: interleaved world documents, the trainable parts, next-token loss on the answers."""
    from polymodal.data.world import World

    model, tokenizer = build_flamingo(config)
    parts = config.trainable if config.trainable is not None else ["projector", "xattn"]
    for name in PARTS:
        getattr(model, name).requires_grad_(name in parts)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"flamingo: training {trainable / 1e6:.3f}M of {total / 1e6:.3f}M parameters ({', '.join(parts)}); "
          f"{model.config.projector.num_queries} latents per image, gated cross-attention before layers "
          f"{model.config.fused_layers}")
    d, seed = config.data, config.train.seed
    world = World("train", image_size=model.config.image_size, num_objects=tuple(d.num_objects),
                  background=d.background, seed=seed)
    processor = ImageProcessor.for_model(model.config)
    image_id = model.config.image_token_id
    batches = ShuffledBatches(
        d.num_scenes, min(d.docs_per_batch, d.num_scenes),
        lambda idx: pack_documents([interleaved_document(world, int(i), d, tokenizer, image_id, processor, seed)
                                    for i in idx], d.max_tokens, truncate=True),
        seed=seed)
    return TrainingJob(model, batches, sequence_loss, tokenizer=tokenizer, tokens_in_batch=lambda b: b.num_tokens,
                       final_model=lambda: model.requires_grad_(True))
