"""Recipe `lm`: train (or fine-tune) a decoder LM on packed text documents.

Data sources: "world-qa" — shapes-world scenes described in words followed by a question and its
exact answer (a text-only task with exact scoring, the seed of the multimodal quickstart), or a
path to a `.txt` (one document per blank-line-separated block) or `.jsonl` (a "text" field) file.
Documents are packed padding-free into rows (`polymodal.sequence.pack_documents`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from polymodal.backbones.decoder import DecoderConfig, DecoderLM
from polymodal.config import config_to_yaml, load_config
from polymodal.sequence import Document, pack_documents
from polymodal.train.data import ShuffledBatches
from polymodal.train.loop import TrainConfig, TrainResult, train


@dataclass
class LMDataConfig:
    """source: "world-qa" or a .txt/.jsonl path; num_documents: how many to draw from the world;
    docs_per_batch: documents packed per step; max_tokens: packed row length."""

    source: str = "world-qa"
    num_documents: int = 20000
    docs_per_batch: int = 32
    max_tokens: int = 512


@dataclass
class LMRecipeConfig:
    """A full `lm` recipe: model sizes (ignored when `init_from` is set), data, training."""

    recipe: str = "lm"
    init_from: str | None = None
    model: DecoderConfig = field(default_factory=DecoderConfig)
    data: LMDataConfig = field(default_factory=LMDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def world_qa_text(scene, qa) -> tuple[str, str]:
    """(prompt, answer) for one world question asked about a scene described in words."""
    return f"{scene.caption('detailed')}\nQ: {qa.question}\nA:", f" {qa.answer}\n"


def world_qa_documents(num: int, tokenizer, split: str = "train", seed: int = 0) -> list[Document]:
    """`num` token documents "description / Q / A" from the shapes world, cycling through questions."""
    from polymodal.data.world import World

    world, docs = World(split=split, seed=seed), []
    for i, scene in enumerate(world.scenes(num)):
        questions = scene.questions()
        prompt, answer = world_qa_text(scene, questions[i % len(questions)])
        docs.append(Document.from_tokens(tokenizer.encode(prompt + answer)))
    return docs


def file_documents(path: Path, tokenizer) -> list[Document]:
    """Documents from a .txt (blank-line separated) or .jsonl ("text" field) file."""
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(f"{path}:{n}: expected a JSON object with a 'text' field ({err})") from None
    else:
        texts = [block.strip() for block in path.read_text().split("\n\n") if block.strip()]
    if not texts:
        raise ValueError(f"{path} holds no documents")
    return [Document.from_tokens(tokenizer.encode(t)) for t in texts]


def build_lm_and_tokenizer(config: LMRecipeConfig):
    """The model to train and its tokenizer: imported from `init_from`, or fresh on the world tokenizer."""
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


def train_lm(config: LMRecipeConfig, documents: list[Document] | None = None, tokenizer=None,
             model: DecoderLM | None = None) -> tuple[DecoderLM, object, TrainResult]:
    """Train per `config`; returns (model, tokenizer, TrainResult). Checkpoints go to train.out_dir."""
    if model is None:
        model, tokenizer = build_lm_and_tokenizer(config)
    if documents is None:
        source = config.data.source
        documents = (world_qa_documents(config.data.num_documents, tokenizer) if source == "world-qa"
                     else file_documents(Path(source), tokenizer))
    max_tokens = config.data.max_tokens
    batches = ShuffledBatches(len(documents), min(config.data.docs_per_batch, len(documents)),
                              lambda idx: pack_documents([documents[i] for i in idx], max_tokens, truncate=True),
                              seed=config.train.seed)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"training {params / 1e6:.2f}M parameters on {len(documents)} documents")
    result = train(model, batches, lambda m, batch: m(packed=batch, loss_only=True).loss, config.train,
                   tokens_in_batch=lambda batch: batch.num_tokens, tokenizer=tokenizer)
    if config.train.out_dir:
        (Path(config.train.out_dir) / "recipe.yaml").write_text(config_to_yaml(config))
    return model, tokenizer, result


def run_lm_recipe(path: str | Path, overrides: Sequence[str] = ()) -> TrainResult:
    """`polymodal train` entry for recipe `lm`."""
    config = load_config(LMRecipeConfig, path, overrides)
    return train_lm(config)[2]


@torch.no_grad()
def world_qa_accuracy(model, tokenizer, num_scenes: int = 200, split: str = "val", max_new_tokens: int = 8,
                      batch_size: int = 32) -> dict[str, float]:
    """Exact-match accuracy per question type on held-out scenes described in words."""
    from polymodal.data.world import World
    from polymodal.infer.generate import generate

    model.eval()
    items = []
    for scene in World(split=split).scenes(num_scenes):
        for qa in scene.questions():
            items.append((world_qa_text(scene, qa)[0], qa.answer, qa.qtype))
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        outs = generate(model, [tokenizer.encode(p) for p, _, _ in chunk], max_new_tokens=max_new_tokens,
                        stop_strings=("\n",), tokenizer=tokenizer)
        for (_, answer, qtype), out in zip(chunk, outs):
            text = tokenizer.decode(out, skip_special_tokens=True).split("\n")[0].strip()
            hits.setdefault(qtype, []).append(text == answer)
    table = {q: sum(v) / len(v) for q, v in sorted(hits.items())}
    table["all"] = sum(sum(v) for v in hits.values()) / max(1, sum(len(v) for v in hits.values()))
    return table


def evaluate_cli(model, tokenizer, data: str = "world", split: str = "val", n: int = 200) -> dict[str, float]:
    """`polymodal eval` for the `lm` family: world QA from described scenes (data must be "world")."""
    if data != "world":
        raise ValueError(f"the lm family evaluates on data 'world' only, got {data!r}")
    return world_qa_accuracy(model, tokenizer, num_scenes=n, split=split)
