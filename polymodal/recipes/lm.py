"""Recipe `lm`: train (or fine-tune) a decoder LM on packed text documents.

Data (`data.source`): "world-qa" — shapes-world scenes described in words followed by a question
and its exact answer (`polymodal.data.text_documents`) — or "text": the `.txt` (one document per
blank-line-separated block) or `.jsonl` (a "text" field per line) file at `data.path`.
Documents are packed padding-free into rows (`polymodal.sequence.pack_documents`) and trained
with the next-token objective.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from polymodal.backbones.decoder import DecoderConfig, DecoderLM
from polymodal.errors import ConfigError
from polymodal.recipes.runner import TrainingJob
from polymodal.sequence import Document, pack_documents
from polymodal.train.data import ShuffledBatches
from polymodal.train.loop import TrainConfig
from polymodal.train.objectives import sequence_loss

SOURCES = ("world-qa", "text")


@dataclass
class LMDataConfig:
    """source: "world-qa" or "text" (with `path`: a .txt or .jsonl file); num_documents: how many
    to draw from the world; docs_per_batch: documents packed per step; max_tokens: packed row
    length; strict: a malformed .jsonl line is an error instead of a counted skip."""

    source: str = "world-qa"
    path: str | None = None
    num_documents: int = 20000
    docs_per_batch: int = 32
    max_tokens: int = 512
    strict: bool = False

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"data.source must be one of {SOURCES}, got {self.source!r}")
        if (self.source == "text") != (self.path is not None):
            raise ConfigError("data.path names the text file of data.source=text (and only of it)")
        for name in ("num_documents", "docs_per_batch", "max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class LMRecipeConfig:
    """A full `lm` recipe: model sizes (ignored when `init_from` is set), data, training."""

    recipe: str = "lm"
    init_from: str | None = None
    model: DecoderConfig = field(default_factory=DecoderConfig)
    data: LMDataConfig = field(default_factory=LMDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def build_lm_and_tokenizer(config: LMRecipeConfig):
    """The model to train and its tokenizer: loaded from `init_from`, or fresh on the world tokenizer."""
    if config.init_from:
        from polymodal.api import load

        model, tokenizer = load(config.init_from)
        return model.train(), tokenizer
    from polymodal.data.world import world_tokenizer

    tokenizer = world_tokenizer()
    model_config = config.model
    model_config.vocab_size = tokenizer.vocab_size
    model_config.eos_token_id = tokenizer.eos_token_id
    return DecoderLM(model_config), tokenizer


def lm_documents(data: LMDataConfig, tokenizer) -> list[Document]:
    """The recipe's token documents from its data source."""
    from polymodal.data.text_documents import file_texts, world_qa_texts

    texts = world_qa_texts(data.num_documents) if data.source == "world-qa" else file_texts(data.path, data.strict)
    return [Document.from_tokens(ids) for ids in tokenizer.encode_batch(texts)]


def lm_job(config: LMRecipeConfig) -> TrainingJob:
    """The `lm` recipe's training job: packed document batches and the next-token objective."""
    model, tokenizer = build_lm_and_tokenizer(config)
    documents = lm_documents(config.data, tokenizer)
    max_tokens = config.data.max_tokens
    batches = ShuffledBatches(len(documents), min(config.data.docs_per_batch, len(documents)),
                              lambda idx: pack_documents([documents[i] for i in idx], max_tokens, truncate=True),
                              seed=config.train.seed)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"training {params / 1e6:.2f}M parameters on {len(documents)} documents")
    return TrainingJob(model, batches, sequence_loss, tokenizer=tokenizer, tokens_in_batch=lambda b: b.num_tokens)
