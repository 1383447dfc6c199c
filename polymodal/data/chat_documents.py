"""Chat documents for MM-LLM training: the world's chats, a user's files, text replay, mixtures.

`chat_documents(...)` returns (length, document(i)): item i of the configured sources as one
`Document` (`polymodal.data.conversation.conversation_document`), a pure function of i, so the
recipe's shuffled stream resumes exactly. Sources:
- "world": scene i of the train split as a caption chat (align: one template of the caption
  styles) or a question chat (instruct: `turns` user turns, an opening description request in a
  `describe` share of them, question types drawn by `question_weights`); a `grounding` share of
  the scenes give a grounding chat instead (`polymodal.data.world.grounding`: boxes as text), and
  in instruct `think` / `tools` shares a reasoning chat (`polymodal.data.world.reasoning`);
- "llava", "coco", "webdataset": the files' own chats (`polymodal.data.sources`), whatever the
  stage: the data decides what is asked and answered.
A `data.mix` of several lays them end to end by weight (`polymodal.data.sources.Mixture`).
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

from polymodal.data.conversation import IMAGE_MARKER, ImageProcessor, conversation_document
from polymodal.data.sources import Mixture, SourceConfig, conversation_items
from polymodal.sequence import Document

DocumentFn = Callable[[int], Document]


def world_documents(stage: str, tokenizer, processor: ImageProcessor, world, image_token_id: int,
                    image_tokens: int, turns: int, caption_styles: Sequence[str], describe: float = 0.5,
                    question_weights: dict[str, int] | None = None,
                    describe_styles: Sequence[str] = ("detailed",), grounding: float = 0.0, think: float = 0.0,
                    tools: float = 0.0) -> DocumentFn:
    """A function index -> Document over `world`'s scenes: caption chats (align, one template of
    `caption_styles` per scene) or QA chats (instruct: `turns` user turns, the first a description
    request in a `describe` share of them, answered in one of `describe_styles`, question types
    drawn by `question_weights`). A `grounding` share of the scenes (drawn from each scene's seed)
    give a grounding chat instead: one question in align, `turns` in instruct; in instruct, a
    `think` share of the others a think chat (rationale, then answer) and a `tools` share a chat
    that calls the detector tool before answering."""
    import numpy as np

    from polymodal.data.world.grounding import grounding_conversation
    from polymodal.data.world.reasoning import reasoning_conversation
    from polymodal.data.world.text import DESCRIBE_PROMPTS, captions_of

    def document(index: int) -> Document:
        scene = world[index]
        pixels = processor(scene.image())
        draw = np.random.default_rng([scene.seed, 304]).random(2)
        if grounding and draw[0] < grounding:
            messages = grounding_conversation(scene, turns if stage == "instruct" else 1)
        elif stage == "instruct" and draw[1] < think + tools:
            variant = "think" if draw[1] < think else "tools"
            messages = reasoning_conversation(scene, variant, turns, question_weights)
        elif stage == "align":
            captions = captions_of(scene, caption_styles)
            messages = [{"role": "user", "content": IMAGE_MARKER + "\n" + DESCRIBE_PROMPTS[index % len(DESCRIBE_PROMPTS)]},
                        {"role": "assistant", "content": captions[index % len(captions)]}]
        else:
            messages = scene.conversation(turns, describe, question_weights, describe_styles)
        return conversation_document(tokenizer, messages, [pixels], image_token_id, image_tokens)

    return document


def file_documents(source: SourceConfig, tokenizer, processor: ImageProcessor, image_token_id: int,
                   image_tokens: int) -> tuple[int, DocumentFn]:
    """(length, index -> Document) of a file source's chats; images load when a document is made."""
    from polymodal.data.world.text import DESCRIBE_PROMPTS

    items = conversation_items(source, DESCRIBE_PROMPTS)

    def document(index: int) -> Document:
        item = items[index]
        return conversation_document(tokenizer, item.messages, [processor(load()) for load in item.images],
                                     image_token_id, image_tokens)

    return len(items), document


def mixed_documents(parts: Sequence[tuple[int, DocumentFn]], weights: Sequence[float]) -> tuple[int, DocumentFn]:
    """(length, index -> Document) of several sources laid end to end by weight."""
    if len(parts) == 1:
        return parts[0]
    mixture = Mixture([length for length, _ in parts], weights)

    def document(index: int) -> Document:
        k, j = mixture.locate(index)
        return parts[k][1](j)

    return len(mixture), document


def with_text_replay(document: DocumentFn, replay: Sequence[tuple[str, str]], tokenizer, share: float) -> DocumentFn:
    """Wrap an index -> Document function so that a fixed pseudo-random `share` of the indices
    give a text-only (prompt, answer) chat from `replay` instead (the same ones on every epoch)."""
    if not replay:
        raise ValueError("text replay is on but no replay chats are available (no base answer finished in its budget)")
    chats = [conversation_document(tokenizer, [{"role": "user", "content": prompt},
                                               {"role": "assistant", "content": answer}], [], -1, 0)
             for prompt, answer in replay]

    def mixed(index: int) -> Document:
        if random.Random(index).random() < share:
            return chats[index % len(chats)]
        return document(index)

    return mixed
