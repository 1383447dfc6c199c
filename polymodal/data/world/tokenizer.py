"""`world_tokenizer`: a small byte-level BPE trained on shapes-world text, cached on disk.

The tokenizer is trained deterministically on the captions, questions, answers, conversations
(each message with its role name, as the chat template writes it, so "user" and "assistant" are
one token each instead of three and six) and clip captions of the first `TRAIN_SCENES`
train-split scenes (train text only, so it never sees a held-out color+shape pair), with the
chat tokens and `MODALITY_TOKENS` as special tokens and the ChatML template. The trained folder
is cached under `$POLYMODAL_CACHE` (default `~/.cache/polymodal`) in a folder named after the
training parameters, so a change of recipe never reads a stale cache. Byte-level BPE encodes any
text, not only world text.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from polymodal.data.world.sampling import World
from polymodal.tokenizers.chat import CHATML_TEMPLATE
from polymodal.tokenizers.text import MODALITY_TOKENS, TextTokenizer

VOCAB_SIZE = 520  # the world's small vocabulary saturates BPE at 517 tokens
TRAIN_SCENES = 2000
TRAIN_CLIPS = 200
CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
RECIPE_VERSION = 2


def world_texts(scenes: int = TRAIN_SCENES, clips: int = TRAIN_CLIPS) -> Iterator[str]:
    """The training text: every caption, question and answer of train scenes, their chats'
    messages as "role\\ncontent" (the text between ChatML's special tokens), plus clip captions."""
    world = World("train", num_objects=(1, 5), background="mixed")
    for scene in world.scenes(scenes):
        yield from scene.captions()
        for qa in scene.questions():
            yield qa.question
            yield qa.answer
        for message in scene.conversation(3):
            yield f"{message['role']}\n{message['content']}"
    for index in range(clips):
        yield world.clip(index, frames=2).caption()


def cache_dir() -> Path:
    """The folder holding the cached world tokenizer."""
    root = Path(os.environ.get("POLYMODAL_CACHE", Path.home() / ".cache" / "polymodal"))
    return root / f"world_tokenizer_v{RECIPE_VERSION}_{VOCAB_SIZE}_{TRAIN_SCENES}_{TRAIN_CLIPS}"


def train_world_tokenizer() -> TextTokenizer:
    """Train the world tokenizer from scratch (a few seconds on one core)."""
    return TextTokenizer.train_bpe(
        world_texts(),
        VOCAB_SIZE,
        special_tokens=list(CHAT_TOKENS) + list(MODALITY_TOKENS),
        chat_template=CHATML_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
    )


@lru_cache(maxsize=1)
def world_tokenizer() -> TextTokenizer:
    """The shapes-world BPE tokenizer (517 tokens), loaded from the cache or trained and cached.

    The cache is written to a temporary folder and renamed into place, so concurrent processes
    never read a half-written tokenizer.
    """
    folder = cache_dir()
    if not (folder / "tokenizer.json").is_file():
        tokenizer = train_world_tokenizer()
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        tokenizer.save(staging)
        try:
            staging.rename(folder)
        except OSError:  # another process cached it first; its copy is identical
            for item in staging.iterdir():
                item.unlink()
            staging.rmdir()
    return TextTokenizer.from_pretrained(folder)
