"""Recipe `unified`: one next-token model over world text and image codes, both directions at once.

Images are tokenized once by a frozen image tokenizer (`image_tokenizer_from`, a trained
`image_vq` checkpoint; or, for seconds-long demos, a tokenizer trained first in the same run for
`tokenizer_steps`). Every batch then mixes documents of four kinds, drawn per document with the
weights `data.mix`, all in the chat format that `polymodal chat` / `polymodal generate` prompt with:

    text_to_image   user: a caption of the scene      assistant: <the scene's image span>
                    (the caption is empty with probability `condition_dropout`: the
                    unconditional half of classifier-free guidance)
    caption         user: <image> Describe the image.  assistant: a caption
    qa              user: <image> a question           assistant: its exact answer
    text            a scene described in words, a question and its answer (text only)

Only the assistant turns are trained (a drawn image is a target; an image in a user turn is
context). The LM is fresh on the world tokenizer, or `lm_from: smollm2` extends the packaged
SmolLM2: its text embeddings and head rows stay, and K code rows (+ the row end) are appended.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from polymodal.backbones.decoder import DecoderConfig
from polymodal.bounds import MAX_STEPS, check_float, check_int
from polymodal.data.conversation import IMAGE_MARKER, conversation_document
from polymodal.data.world.text import captions_of, check_caption_styles
from polymodal.errors import ConfigError
from polymodal.models.unified import UnifiedConfig, UnifiedModel
from polymodal.recipes.runner import TrainingJob
from polymodal.sequence import NEXT_TOKEN, Document, Segment, pack_documents
from polymodal.tokenizers.image_vq import ImageVQ, ImageVQConfig
from polymodal.tokenizers.text import MODALITY_TOKENS
from polymodal.train.data import IndexedBatches
from polymodal.train.loop import TrainConfig
from polymodal.train.objectives import sequence_loss

KINDS = ("text_to_image", "caption", "qa", "text")
CAPTION_REQUEST = "Describe the image."  # the prompt `polymodal.eval.mmllm` asks for captions with
ENCODE_BATCH = 64


@dataclass
class UnifiedDataConfig:
    """World documents: num_scenes train scenes (their images tokenized once) with num_objects
    (min, max) objects; caption_styles for captions and image prompts; mix: relative weight of each
    document kind (see the module docstring); condition_dropout: share of empty image prompts;
    docs_per_batch documents packed into rows of max_tokens."""

    source: str = "world"
    num_scenes: int = 4000
    num_objects: tuple[int, int] = (1, 2)
    caption_styles: list[str] = field(default_factory=lambda: ["located"])
    mix: dict[str, float] = field(default_factory=lambda: {"text_to_image": 2.0, "caption": 1.0, "qa": 2.0,
                                                           "text": 0.5})
    condition_dropout: float = 0.1
    docs_per_batch: int = 32
    max_tokens: int = 1024

    def __post_init__(self) -> None:
        owner = "UnifiedDataConfig"
        if self.source != "world":
            raise ConfigError(f"data.source: the unified recipe trains on the shapes world, got {self.source!r}")
        check_int(owner, "num_scenes", self.num_scenes, 1, MAX_STEPS)
        low, high = self.num_objects
        check_int(owner, "num_objects[0]", low, 1, 5)
        check_int(owner, "num_objects[1]", high, low, 5)
        self.caption_styles = check_caption_styles(self.caption_styles, "data.caption_styles")
        unknown = sorted(set(self.mix) - set(KINDS))
        if unknown or not self.mix:
            raise ConfigError(f"data.mix: kinds must be among {list(KINDS)}, got {sorted(self.mix)}")
        for kind, weight in self.mix.items():
            check_float(owner, f"mix.{kind}", weight, 0)
        if sum(self.mix.values()) <= 0:
            raise ConfigError("data.mix: at least one kind needs a weight above 0")
        check_float(owner, "condition_dropout", self.condition_dropout, 0, 1)
        check_int(owner, "docs_per_batch", self.docs_per_batch, 1, MAX_STEPS)
        check_int(owner, "max_tokens", self.max_tokens, 8, 2 ** 20)


@dataclass
class UnifiedRecipeConfig:
    """A `unified` recipe. image_tokenizer_from: a trained `image_vq` checkpoint folder; without
    one, `image_tokenizer` is trained here first for tokenizer_steps (tiny demos). lm_from:
    "smollm2" (or a .gguf file) to extend a pretrained LM; else `model` sizes a fresh LM on the
    world tokenizer. image_size: the side images are tokenized at. eval_n > 0 runs
    `polymodal.eval.unified` after training; eval_guidance: its guidance scale."""

    recipe: str = "unified"
    image_tokenizer_from: str | None = None
    image_tokenizer: ImageVQConfig | None = None
    tokenizer_steps: int = 0
    tokenizer_lr: float = 2e-3
    lm_from: str | None = None
    model: DecoderConfig = field(default_factory=DecoderConfig)
    image_size: int = 64
    row_end: bool = True
    data: UnifiedDataConfig = field(default_factory=UnifiedDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_n: int = 0
    eval_guidance: float = 3.0

    def __post_init__(self) -> None:
        owner = "UnifiedRecipeConfig"
        if (self.image_tokenizer_from is None) == (self.image_tokenizer is None):
            raise ConfigError("give exactly one of image_tokenizer_from (a trained image_vq checkpoint) and "
                              "image_tokenizer (a config trained here for tokenizer_steps)")
        if self.image_tokenizer is not None:
            check_int(owner, "tokenizer_steps", self.tokenizer_steps, 1, MAX_STEPS)
        check_int(owner, "eval_n", self.eval_n, 0, 100000)
        check_float(owner, "eval_guidance", self.eval_guidance, 0)


def _trained_tokenizer(config: UnifiedRecipeConfig) -> ImageVQ:
    """The frozen image tokenizer: loaded, or trained here on world scenes for tokenizer_steps."""
    if config.image_tokenizer_from:
        from polymodal.api import load

        tokenizer = load(config.image_tokenizer_from).model
        if getattr(tokenizer, "family", None) != "image_vq":
            raise ConfigError(f"image_tokenizer_from: {config.image_tokenizer_from} holds a "
                              f"{getattr(tokenizer, 'family', type(tokenizer).__name__)!r} model, not an image_vq "
                              "tokenizer")
        return tokenizer.eval()
    from polymodal.models.registry import get_family, resolve
    from polymodal.recipes.vae import VAEDataConfig, WorldScenes
    from polymodal.train.loop import train

    tokenizer = ImageVQ(config.image_tokenizer)
    scenes = WorldScenes(VAEDataConfig(num_objects=tuple(config.data.num_objects), batch_size=16), config.image_size,
                         config.train.seed)
    print(f"training the image tokenizer for {config.tokenizer_steps} steps")
    train(tokenizer, IndexedBatches(scenes), resolve(get_family("image_vq").objective),
          TrainConfig(steps=config.tokenizer_steps, lr=config.tokenizer_lr, weight_decay=0.0,
                      warmup_steps=min(10, config.tokenizer_steps - 1), seed=config.train.seed,
                      device=config.train.device, log_every=max(1, config.tokenizer_steps // 4)))
    return tokenizer.eval()


def build_unified(config: UnifiedRecipeConfig) -> tuple[UnifiedModel, object]:
    """(model, text tokenizer): LM extended by the image codes, tokenizer part in place."""
    from polymodal.recipes.mmllm import _import_lm, _resize_embeddings

    image_tokenizer = _trained_tokenizer(config)
    if config.lm_from:
        lm, tokenizer = _import_lm(config.lm_from)
        tokenizer.add_special_tokens(MODALITY_TOKENS)  # appended: every pretrained row keeps its id
    else:
        from polymodal.data.world import world_tokenizer

        lm, tokenizer = None, world_tokenizer()
    text_vocab = tokenizer.vocab_size
    vocab = text_vocab + image_tokenizer.codebook_size + int(config.row_end)
    if lm is not None and lm.embed_tokens.num_embeddings > vocab:
        raise ConfigError(f"lm_from: the imported LM has {lm.embed_tokens.num_embeddings} embedding rows, more than "
                          f"its {text_vocab} text ids + {image_tokenizer.codebook_size} codes + row end")
    # A new config (re-validated), never the recipe's or the imported model's edited in place.
    lm_config = dataclasses.replace(lm.config if lm is not None else config.model, vocab_size=vocab,
                                    **({} if lm is not None else {"eos_token_id": tokenizer.eos_token_id}))
    model_config = UnifiedConfig(
        lm=lm_config, image_tokenizer=image_tokenizer.config, text_vocab_size=text_vocab,
        image_start_id=tokenizer.token_to_id("<|image_start|>"), image_end_id=tokenizer.token_to_id("<|image_end|>"),
        image_token_id=tokenizer.token_to_id(IMAGE_MARKER), row_end=config.row_end, image_size=config.image_size)
    model = UnifiedModel(model_config)
    if lm is not None:
        _resize_embeddings(lm, vocab)
        lm.config = lm_config
        model.lm = lm
    model.image_tokenizer.load_state_dict(image_tokenizer.state_dict())
    model.image_tokenizer.requires_grad_(False)
    return model, tokenizer


class WorldDocuments:
    """batch_fn: batch i = `docs_per_batch` documents of the kinds `data.mix` weighs, packed.

    Document j of batch i uses train scene (i * docs_per_batch + j) mod num_scenes; its kind,
    caption variant, question and condition dropout are drawn from a generator seeded by (seed, i),
    so batch i is a pure function of i (resumable). On several processes (`for_rank`) rank r packs
    documents j = r, r + world, ... of the batch."""

    rank, world = 0, 1

    def __init__(self, model: UnifiedModel, tokenizer, data: UnifiedDataConfig, seed: int):
        from tqdm.auto import tqdm

        from polymodal.data.dual_encoder import scene_pixels
        from polymodal.data.world import World

        self.model, self.tokenizer, self.data, self.seed = model, tokenizer, data, seed
        world = World("train", image_size=model.config.image_size, num_objects=tuple(data.num_objects), seed=seed)
        self.scenes = list(world.scenes(data.num_scenes))
        spans = []
        for start in tqdm(range(0, len(self.scenes), ENCODE_BATCH), desc="tokenize images", unit="batch"):
            pixels = scene_pixels(self.scenes[start:start + ENCODE_BATCH], model.config.image_size)
            spans.append(model.image_span(pixels.to(model.code_ids.device)).cpu())
        self.spans = torch.cat(spans)  # (num_scenes, image_tokens)
        kinds = [k for k in KINDS if data.mix.get(k, 0) > 0]
        weights = np.array([data.mix[k] for k in kinds], dtype=np.float64)
        self.kinds, self.weights = kinds, weights / weights.sum()

    def document(self, kind: str, index: int, rng: np.random.Generator) -> Document:
        """One document of `kind` about train scene `index`."""
        from polymodal.data.text_documents import world_qa_text

        scene, span = self.scenes[index], self.spans[index]
        if kind == "text":
            questions = scene.questions()
            prompt, answer = world_qa_text(scene, questions[rng.integers(len(questions))])
            return Document.from_tokens(self.tokenizer.encode(prompt + answer))
        if kind == "text_to_image":
            caption = "" if rng.random() < self.data.condition_dropout else self._caption(scene, rng)
            messages = [{"role": "user", "content": caption}, {"role": "assistant", "content": IMAGE_MARKER}]
        elif kind == "caption":
            messages = [{"role": "user", "content": f"{IMAGE_MARKER}\n{CAPTION_REQUEST}"},
                        {"role": "assistant", "content": self._caption(scene, rng)}]
        else:
            qa = scene.questions()[rng.integers(len(scene.questions()))]
            messages = [{"role": "user", "content": f"{IMAGE_MARKER}\n{qa.question}"},
                        {"role": "assistant", "content": qa.answer}]
        return conversation_document(self.tokenizer, messages, [span], self.model.config.image_token_id,
                                     self.model.image_tokens, image_segment=_span_segment)

    def _caption(self, scene, rng: np.random.Generator) -> str:
        captions = captions_of(scene, self.data.caption_styles)
        return captions[rng.integers(len(captions))]

    def __call__(self, index: int):
        rng = np.random.default_rng((self.seed, index))
        per = self.data.docs_per_batch
        kinds = rng.choice(len(self.kinds), size=per, p=self.weights)
        # Every document is drawn, in order, so each one's draws do not depend on the world size.
        docs = [self.document(self.kinds[k], (index * per + j) % len(self.scenes), rng) for j, k in enumerate(kinds)]
        return pack_documents(docs[self.rank::self.world], self.data.max_tokens, truncate=True)

    def for_rank(self, rank: int, world: int) -> WorldDocuments:
        """This batch_fn making rank `rank`'s share of each batch (`polymodal.distributed.sharding`)."""
        if self.data.docs_per_batch < world:
            raise ConfigError(f"data.docs_per_batch {self.data.docs_per_batch} is fewer than the {world} processes; "
                              "raise it")
        self.rank, self.world = rank, world
        return self


def _span_segment(span: torch.Tensor, trained: bool) -> Segment:
    """An image span (ids, markers included) as a segment: a next-token target when drawn."""
    return Segment("image", tokens=span, target=NEXT_TOKEN if trained else None)


def unified_job(config: UnifiedRecipeConfig) -> TrainingJob:
    """The `unified` recipe's training job: mixed-direction packed batches, next-token objective."""
    model, tokenizer = build_unified(config)
    documents = WorldDocuments(model, tokenizer, config.data, config.train.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    c = model.config
    print(f"training {trainable / 1e6:.2f}M parameters: {c.text_vocab_size} text ids + {c.codebook_size} codes, "
          f"{c.grid[0]}x{c.grid[1]} codes per image ({model.image_tokens} tokens), mix {config.data.mix}")

    def after(final: UnifiedModel, out: Path | None) -> None:
        if out is not None:
            from polymodal.eval.unified import evaluate_unified
            from polymodal.recipes.diffusion import report_generation

            report_generation(final, tokenizer, out, config, evaluate_unified)

    return TrainingJob(model, IndexedBatches(documents), sequence_loss, tokenizer=tokenizer,
                       tokens_in_batch=lambda batch: batch.num_tokens, after=after)
