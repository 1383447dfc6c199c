"""Recipe `mmllm`: two-stage LLaVA-style training of a multimodal LM on the shapes world or a user's data.

- stage "align": image -> caption chats; by default only the projector trains (vision tower and
  LM frozen), as in LLaVA's feature-alignment pre-training. From-scratch models list more parts
  in `trainable` (nothing is pretrained, so everything must learn).
- stage "instruct": multi-turn visual chats, loss only on the assistant turns; the projector and
  the LM train, the LM fully or through LoRA adapters (`lora.rank > 0`).
Data (`data.source`, or weighted sources in `data.mix`): the shapes world, or a user's LLaVA
conversation JSON, COCO captions or WebDataset shards (`data.path`, `data.image_root`), see
`polymodal.data.chat_documents`. Every step packs whole conversations padding-free (`pack_documents`); `init_from` continues
from a previous stage's checkpoint. The LM is either fresh on the world tokenizer or imported
from a GGUF file (`lm_from: smollm2` = SmolLM2-135M-Instruct), which then gets an `<image>`
special token and one more embedding row.

Outputs under `train.out_dir` (`polymodal.recipes.runner`): training checkpoints, metrics,
loss.png, recipe.yaml, and `final/` — the model checkpoint (LoRA merged; image-position adapters
kept) that `polymodal.load` reads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from polymodal.atomic import write_text_atomic
from polymodal.data.chat_documents import file_documents, mixed_documents, with_text_replay, world_documents
from polymodal.data.conversation import IMAGE_MARKER, ImageProcessor
from polymodal.data.sources import SourceConfig
from polymodal.errors import ConfigError
from polymodal.models.mmllm import MMLLMConfig, MultimodalLM, size_to_tokenizer
from polymodal.nn.lora import LoRAConfig, apply_lora, merge_lora
from polymodal.recipes.runner import TrainingJob
from polymodal.recipes.seen_tokens import SEEN_TOKENS_FILE, SeenTokens, recorded_in, reinit_unseen_tokens
from polymodal.sequence import pack_documents
from polymodal.train.data import ShuffledBatches
from polymodal.train.loop import TrainConfig
from polymodal.train.objectives import sequence_loss

STAGES = ("align", "instruct")
SOURCES = ("world", "llava", "coco", "webdataset")
PARTS = ("vision", "projector", "lm")
DEFAULT_TRAINABLE = {"align": ["projector"], "instruct": ["projector", "lm"]}
# Token budget of a recorded replay answer; answers that do not end within it are left out.
REPLAY_ANSWER_TOKENS = 96


@dataclass
class MMLLMDataConfig:
    """The data of a stage.

    source: "world" (default), or a user's file source — "llava", "coco", "webdataset" — with
    `path`, `image_root` and `strict` (a bad record is an error, not a counted skip); mix:
    several weighted sources instead, e.g. [{source: llava, path: a.json, weight: 2}, {source: world}]
    (`polymodal.data.sources.SourceConfig`). The rest shapes the world's chats:
    num_scenes: train scenes cycled through; num_objects / background: the world's options;
    turns: user turns per chat (instruct); describe (instruct): share of the chats whose first
    turn asks for a description (the other turns are questions); describe_styles (instruct): the
    caption styles those descriptions are drawn from; question_weights (instruct):
    {qtype: n} asks that question type n times as often (1 for the others); docs_per_batch: chats packed per step;
    max_tokens: packed row length (images are preprocessed as the model's `image_preset` says);
    caption_styles (align): the world caption styles whose templates the captions are drawn from
    ("short", "detailed", "grounded": place first, then the object; "located": the object, then its place);
    text_replay (instruct): share of the chats that are text-only replay chats — general prompts
    (`polymodal.data.general_chat.REPLAY_PROMPTS`) with the LM's own greedy answers, recorded
    before the stage starts, so a pretrained LM keeps answering text as it did.
    grounding (world): share of the world's scenes given as grounding chats instead (boxes as
    text in questions and answers: referring expressions, region descriptions, grounded
    captions; `polymodal.data.world.grounding`), in either stage.
    think / tools (world, instruct): shares of the other world chats given in the reasoning
    variants of `polymodal.data.world.reasoning`: a rationale listing the objects before the
    answer (M-CoT), or a call to the detector tool whose reply lists them (LAVR).
    """

    source: str = "world"
    path: str | None = None
    image_root: str | None = None
    strict: bool = False
    mix: list[SourceConfig] = field(default_factory=list)
    num_scenes: int = 20000
    num_objects: tuple[int, int] = (1, 3)
    background: str = "plain"
    turns: int = 6
    describe: float = 0.5
    describe_styles: list[str] = field(default_factory=lambda: ["detailed"])
    question_weights: dict[str, int] = field(default_factory=dict)
    docs_per_batch: int = 32
    max_tokens: int = 512
    caption_styles: list[str] = field(default_factory=lambda: ["short", "detailed"])
    text_replay: float = 0.0
    grounding: float = 0.0
    think: float = 0.0
    tools: float = 0.0

    def __post_init__(self):
        from polymodal.data.world import text

        if not 0.0 <= self.describe <= 1.0:
            raise ValueError(f"MMLLMDataConfig.describe must be in [0, 1], got {self.describe!r}")
        text.check_question_weights(self.question_weights, "MMLLMDataConfig.question_weights")
        if not 0.0 <= self.text_replay < 1.0:
            raise ValueError(f"MMLLMDataConfig.text_replay must be in [0, 1), got {self.text_replay!r}")
        for name in ("grounding", "think", "tools"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"MMLLMDataConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.think + self.tools > 1.0:
            raise ConfigError(f"MMLLMDataConfig.think + tools must be at most 1, got {self.think} + {self.tools}")

        text.check_caption_styles(self.caption_styles, "MMLLMDataConfig.caption_styles")
        text.check_caption_styles(self.describe_styles, "MMLLMDataConfig.describe_styles")
        for i, source in enumerate(self.sources()):
            source.check(SOURCES, f"data.mix[{i}]" if self.mix else "data")
        for name in ("num_scenes", "turns", "docs_per_batch", "max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")

    def sources(self) -> list[SourceConfig]:
        """The configured sources: `mix`, or the single `source`."""
        return list(self.mix) or [SourceConfig(self.source, self.path, self.image_root, 1.0, self.strict)]


@dataclass
class MMLLMRecipeConfig:
    """A full `mmllm` recipe stage.

    init_from: a polymodal mmllm checkpoint to continue from (then `model`, `lm_from` and
    `vision_from` are ignored). lm_from: None (fresh LM on the world tokenizer), "smollm2" or a
    .gguf path. vision_from: a contrastive checkpoint whose trained image tower becomes the vision
    tower (`vision_tower_from`: a polymodal `clip` recipe checkpoint, or an HF CLIP / SigLIP folder);
    it replaces `model.vision` / `model.cnn` and sets `model.image_preset`.
    trainable: parts that train, from vision / projector / lm (None: the stage's default).
    lora: adapters on the LM (rank 0 = off); with LoRA, "lm" in `trainable` trains the adapters only.
    text_retention (instruct): record the LM's greedy answers to the held-out
    `RETENTION_QUESTIONS` before the stage and report how many are unchanged after it
    (printed, and saved as `retention.json` in the out dir).
    reinit_unseen_tokens: when `init_from` records the token ids its stage saw (a stage that
    trained the LM's embeddings writes `seen_tokens.json`) and this stage trains the LM, give
    every other id fresh embedding rows first (see `polymodal.recipes.seen_tokens`).
    """

    recipe: str = "mmllm"
    stage: str = "align"
    init_from: str | None = None
    lm_from: str | None = None
    vision_from: str | None = None
    model: MMLLMConfig = field(default_factory=MMLLMConfig)
    trainable: list[str] | None = None
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: MMLLMDataConfig = field(default_factory=MMLLMDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    text_retention: bool = False
    reinit_unseen_tokens: bool = True

    @property
    def replays_text(self) -> bool:
        """Whether this stage mixes text replay chats into its data (stage 2 with `data.text_replay`)."""
        return self.stage == "instruct" and self.data.text_replay > 0

    @property
    def reports_retention(self) -> bool:
        """Whether this stage records and reports text retention (stage 2 with `text_retention`)."""
        return self.stage == "instruct" and self.text_retention

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"mmllm recipe: stage must be one of {STAGES}, got {self.stage!r}")
        for part in self.trainable or []:
            if part not in self.part_names():
                raise ValueError(f"{self.recipe} recipe: trainable entries must be among {self.part_names()}, "
                                 f"got {part!r}")
        if self.replays_text and self.lora.rank and self.lora.image_tokens_only:
            raise ValueError("mmllm recipe: data.text_replay does nothing with lora.image_tokens_only (text-only "
                             "chats never reach the adapters, which keep them exactly as the base LM had them); "
                             "set data.text_replay: 0")

    def part_names(self) -> tuple[str, ...]:
        """The model parts `trainable` may name, in the order `set_trainable` applies them."""
        return PARTS

    def default_trainable(self) -> list[str]:
        """The parts a stage trains when `trainable` is not given."""
        return DEFAULT_TRAINABLE[self.stage]


# ---------------------------------------------------------------------------------------- model

def _resize_embeddings(lm: nn.Module, vocab_size: int) -> None:
    """Grow the LM's embedding table (and an untied head) to `vocab_size` rows; new rows = mean row."""
    old = lm.embed_tokens.weight
    if vocab_size <= old.shape[0]:
        return
    rows = old.data.mean(0, keepdim=True).expand(vocab_size - old.shape[0], -1)
    new_embed = nn.Embedding(vocab_size, old.shape[1], dtype=old.dtype, device=old.device)
    new_embed.weight.data.copy_(torch.cat([old.data, rows]))
    tied = lm.lm_head.weight is old
    lm.embed_tokens = new_embed
    if tied:
        lm.lm_head = nn.Linear(old.shape[1], vocab_size, bias=False, dtype=old.dtype, device=old.device)
        lm.lm_head.weight = new_embed.weight
    else:
        head = lm.lm_head.weight.data
        lm.lm_head = nn.Linear(old.shape[1], vocab_size, bias=False, dtype=old.dtype, device=old.device)
        lm.lm_head.weight.data.copy_(torch.cat([head, head.mean(0, keepdim=True).expand(vocab_size - head.shape[0], -1)]))
    lm.config.vocab_size = vocab_size


def _import_lm(source: str):
    """(DecoderLM, tokenizer) from "smollm2" or a .gguf path."""
    from polymodal.interop import import_gguf

    if source == "smollm2":
        from polymodal.assets import smollm2_gguf_path

        source = str(smollm2_gguf_path())
    if not source.endswith(".gguf"):
        raise ConfigError(f"mmllm recipe: lm_from must be 'smollm2' or a .gguf file, got {source!r}")
    return import_gguf(source, dtype=torch.float32)


def build_mmllm(config: MMLLMRecipeConfig) -> tuple[MultimodalLM, object]:
    """The model to train and its tokenizer, per `init_from` / `lm_from` / `model`."""
    if config.init_from:
        from polymodal.api import load

        model, tokenizer = load(config.init_from)
        if getattr(model, "family", None) != "mmllm":
            raise ConfigError(f"mmllm recipe: init_from {config.init_from} holds a {model.family!r} model, not mmllm")
        return model.train(), tokenizer
    tower = None
    if config.vision_from:
        tower_fields, tower = vision_tower_from(config.vision_from)
        config.model = replace(config.model, **tower_fields)  # re-validates the feature layer
    model_config = config.model
    lm = None
    if config.lm_from:
        lm, tokenizer = _import_lm(config.lm_from)
        tokenizer.add_special_tokens([IMAGE_MARKER])
        _resize_embeddings(lm, tokenizer.vocab_size)
        model_config.lm = lm.config  # the imported LM keeps its own vocabulary size and eos id
        model_config.image_token_id = tokenizer.token_to_id(IMAGE_MARKER)
    else:
        from polymodal.data.world import world_tokenizer

        tokenizer = world_tokenizer()
        size_to_tokenizer(model_config, tokenizer)
    return MultimodalLM(model_config, vision=tower, lm=lm), tokenizer


def vision_tower_from(source: str) -> tuple[dict, nn.Module]:
    """The trained image tower of a contrastive checkpoint, for an MM-LLM's vision tower.

    source: a polymodal `clip`-family checkpoint with a "vit" or "cnn" image tower (e.g. one the
    `clip` recipe trained on the world), or an HF CLIP / SigLIP folder. Returns the `MMLLMConfig`
    fields that describe it ({"vision_tower", "vision" or "cnn", "image_preset"}) and the tower
    module with its weights. Pixels: the `clip` recipe trains on [-1, 1] pixels, which is the
    "siglip" preset's normalisation; an HF folder keeps its family's own (CLIP mean/std or SigLIP's).
    """
    from polymodal.api import load
    from polymodal.interop import detect_format

    contrastive, _ = load(source)
    family = getattr(contrastive, "family", type(contrastive).__name__)
    if family != "clip":
        raise ValueError(f"mmllm recipe: vision_from {source} holds a {family!r} model, not a contrastive "
                         "(clip family) one whose image tower could be taken")
    c = contrastive.config
    shared = ("vit", "cnn")  # the image towers both families build
    if c.image_tower not in shared:
        raise ValueError(f"mmllm recipe: vision_from {source} has a {c.image_tower!r} image tower; "
                         f"an MM-LLM can take one of {shared}")
    trained_here = detect_format(source) == "polymodal"
    fields = {"vision_tower": c.image_tower, "image_preset": "siglip" if trained_here or c.loss == "siglip" else "clip"}
    fields["vision" if c.image_tower == "vit" else "cnn"] = c.vision if c.image_tower == "vit" else c.cnn
    return fields, contrastive.vision_model


def set_trainable(model: MultimodalLM, parts: Sequence[str], lora: LoRAConfig, names: Sequence[str] = PARTS) -> int:
    """Freeze every part not in `parts`; with `lora.rank > 0` put adapters on the LM instead of
    training it fully. names: the model's parts (attributes), applied in order, so a part inside
    an earlier one (a CogVLM visual expert inside the LM) is set after it. Returns the trainable
    parameter count."""
    for name in names:
        getattr(model, name).requires_grad_(name in parts)
    if lora.rank > 0 and "lm" in parts:
        if lora.image_tokens_only:
            model.add_image_lora(lora)
        elif model.config.image_lora.rank:
            raise ValueError("mmllm recipe: this model's LM has image-position adapters (image_lora); continue with "
                             "lora.image_tokens_only: true, or from a checkpoint without them")
        else:
            apply_lora(model.lm, lora.targets, lora.rank, lora.alpha, lora.dropout)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------- data

def make_batches(config: MMLLMRecipeConfig, model: MultimodalLM, tokenizer,
                 replay: Sequence[tuple[str, str]] = ()) -> ShuffledBatches:
    """Resumable packed batches of the stage's chats (`config.data`'s sources, mixed by weight);
    with `config.data.text_replay`, that share of the chats come from `replay` (prompt, answer) pairs."""
    from polymodal.data.world import World

    d = config.data
    processor = ImageProcessor.for_model(model.config)
    placeholder, tokens = model.config.image_token_id, model.image_tokens
    parts = []
    for source in d.sources():
        if source.source == "world":
            world = World("train", image_size=model.config.image_size, num_objects=tuple(d.num_objects),
                          background=d.background, seed=config.train.seed)
            parts.append((d.num_scenes, world_documents(config.stage, tokenizer, processor, world, placeholder, tokens,
                                                        d.turns, d.caption_styles, d.describe, d.question_weights,
                                                        d.describe_styles, d.grounding, d.think, d.tools)))
        else:
            parts.append(file_documents(source, tokenizer, processor, placeholder, tokens))
    length, document = mixed_documents(parts, [s.weight for s in d.sources()])
    if config.replays_text:
        document = with_text_replay(document, replay, tokenizer, d.text_replay)
    return ShuffledBatches(length, min(d.docs_per_batch, length),
                           lambda idx: pack_documents([document(int(i)) for i in idx], d.max_tokens, truncate=True),
                           seed=config.train.seed)


# ---------------------------------------------------------------------------------------- train

def mmllm_job(config: MMLLMRecipeConfig, model: MultimodalLM | None = None, tokenizer=None) -> TrainingJob:
    """The training job of one stage per `config` (a built `model` and `tokenizer` may be passed in).

    The final model has any LoRA adapters merged, except image-position ones
    (`lora.image_tokens_only`), which it keeps (`MMLLMConfig.image_lora`). A stage that trains the
    LM's embeddings records the token ids it sees (`SeenTokens`, checkpointed with the run and
    written into the final checkpoint for the next stage).
    """
    if model is None:
        model, tokenizer = build_mmllm(config)
    out = Path(config.train.out_dir) if config.train.out_dir else None
    parts = config.trainable if config.trainable is not None else config.default_trainable()
    if "lm" in parts:
        _reinit_tokens_the_last_stage_never_saw(model, config)  # the stage's own start: before any base answer
    base_text = _base_text_answers(config, model, tokenizer, out)
    trainable = set_trainable(model, parts, config.lora, config.part_names())
    total = sum(p.numel() for p in model.parameters())
    lora = ""
    if config.lora.rank and "lm" in parts:
        where = " at image positions only" if config.lora.image_tokens_only else ""
        lora = f", LoRA rank {config.lora.rank} on {list(config.lora.targets)}{where}"
    print(f"{config.recipe} stage {config.stage!r}: training {trainable / 1e6:.3f}M of {total / 1e6:.3f}M parameters "
          f"({', '.join(parts)}{lora}); {model.image_tokens} tokens per image")
    batches = make_batches(config, model, tokenizer, base_text.get("replay", ()))
    seen = SeenTokens(model.config.lm.vocab_size) if "lm" in parts and not config.lora.rank else None

    def objective(m: MultimodalLM, batch) -> torch.Tensor:
        if seen is not None:
            seen.add(batch.token_ids, batch.document_ids >= 0)
        return sequence_loss(m, batch)

    def final_model() -> MultimodalLM:
        if not model.config.image_lora.rank:  # image-position adapters cannot be folded into shared weights
            merge_lora(model)
        return model.requires_grad_(True)

    def after(final: MultimodalLM, out: Path | None) -> None:
        if config.reports_retention:
            _report_retention(final, tokenizer, base_text["retention"], out)

    return TrainingJob(
        model, batches, objective, tokenizer=tokenizer, tokens_in_batch=lambda batch: batch.num_tokens,
        state={"seen_tokens": seen} if seen is not None else {}, final_model=final_model,
        final_files=None if seen is None else lambda folder: seen.save(folder / SEEN_TOKENS_FILE), after=after)


def _reinit_tokens_the_last_stage_never_saw(model: MultimodalLM, config: MMLLMRecipeConfig) -> None:
    """Fresh embedding rows for the ids `config.init_from`'s stage never saw, when it recorded them."""
    seen = recorded_in(config.init_from) if config.init_from and config.reinit_unseen_tokens else None
    if seen is None:
        return
    count = reinit_unseen_tokens(model.lm, seen, seed=config.train.seed)
    print(f"mmllm: fresh embeddings for the {count} of {model.config.lm.vocab_size} token ids the previous stage "
          f"never saw (its softmax had pushed them all one way)")


def _base_text_answers(config: MMLLMRecipeConfig, model: MultimodalLM, tokenizer, out: Path | None) -> dict:
    """The LM's own text answers before the stage, as the stage needs them: {"replay": finished
    (prompt, answer) pairs} for text replay, {"retention": replies to RETENTION_QUESTIONS} for the
    retention report. Kept in `out/base_text_answers.json`: a resumed run reuses what was recorded
    and generates only what is missing."""
    from polymodal.data.general_chat import REPLAY_PROMPTS, RETENTION_QUESTIONS
    from polymodal.eval.retention import finished_replies, text_replies

    wanted = {"replay": config.replays_text, "retention": config.reports_retention}
    if not any(wanted.values()):
        return {}
    cache = out / "base_text_answers.json" if out is not None else None
    answers = json.loads(cache.read_text()) if cache is not None and cache.exists() else {}
    missing = [key for key, on in wanted.items() if on and key not in answers]
    if not missing:
        return answers
    print("mmllm: recording the LM's own answers to general text prompts before tuning")
    model.eval()
    if "replay" in missing:
        replies = text_replies(model, tokenizer, REPLAY_PROMPTS, max_new_tokens=REPLAY_ANSWER_TOKENS)
        answers["replay"] = finished_replies(tokenizer, REPLAY_PROMPTS, replies, REPLAY_ANSWER_TOKENS)
        print(f"  text replay: {len(answers['replay'])} of {len(REPLAY_PROMPTS)} answers finished within "
              f"{REPLAY_ANSWER_TOKENS} tokens")
    if "retention" in missing:
        answers["retention"] = text_replies(model, tokenizer, RETENTION_QUESTIONS)
    model.train()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cache, json.dumps(answers, indent=1))
    return answers


def _report_retention(model: MultimodalLM, tokenizer, base: Sequence[str], out: Path | None) -> dict:
    """Compare the tuned model's text answers with `base`; print the count and save retention.json."""
    from polymodal.data.general_chat import RETENTION_QUESTIONS
    from polymodal.eval.retention import retention_report, text_replies

    model.eval()
    report = retention_report(RETENTION_QUESTIONS, base, text_replies(model, tokenizer, RETENTION_QUESTIONS))
    model.train()
    print(f"text retention: {report['unchanged']} of {report['total']} general questions keep the base model's answer")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "retention.json", json.dumps(report, indent=1))
    return report
