"""How well does an MM-LLM checkpoint read a caption's color, shape and place words off the image?

For the first --scenes val scenes with 2-3 objects, the checkpoint reads "<image>\\nDescribe the
image." followed by the scene's caption of one --style, teacher-forced, and the script counts how
often its most likely next word, among the words of the same kind (the 8 colors, the 6 shapes,
the last word of the 9 places), is the caption's word. In a `located` caption the objects come in
a shuffled order and each is named before its place ("A small red circle is in the top left;
..."), so the shape word after "a small red" needs the cell of the object the earlier words
described: a content lookup, which the comparison questions (existence, count of a color) build
on. In a `grounded` caption the place comes first, so the words need a lookup by place only.

Usage: python benchmarks/probe_caption_words.py CHECKPOINT [--style located] [--scenes 150]
"""
from __future__ import annotations

import argparse

import torch

from polymodal.api import load
from polymodal.data.conversation import (
    IMAGE_MARKER,
    ImageProcessor,
    conversation_document,
)
from polymodal.data.world import COLORS, SHAPES, World
from polymodal.data.world.objects import POSITION_NAMES
from polymodal.data.world.text import CAPTION_STYLES, caption
from polymodal.sequence import pack_documents


def word_ids(tokenizer, words) -> set[int]:
    """The ids of `words` as they occur inside a sentence (after a space)."""
    return {tokenizer.encode(" " + word)[-1] for word in words}


@torch.no_grad()
def caption_word_accuracy(model, tokenizer, style: str = "located", scenes: int = 150) -> dict[str, tuple[float, int]]:
    """{"color" | "shape" | "place": (teacher-forced accuracy among the words of that kind, count)}
    over the `style` captions of the first `scenes` val scenes with 2-3 objects."""
    kinds = {"color": word_ids(tokenizer, COLORS), "shape": word_ids(tokenizer, SHAPES),
             "place": word_ids(tokenizer, {name.split()[-1] for name in POSITION_NAMES.values()})}
    choices = {kind: torch.tensor(sorted(ids)) for kind, ids in kinds.items()}
    hits = {kind: [0, 0] for kind in kinds}
    processor = ImageProcessor.for_model(model.config)
    model.eval()
    for scene in World("val", image_size=processor.size, num_objects=(2, 3)).scenes(scenes):
        chat = [{"role": "user", "content": IMAGE_MARKER + "\nDescribe the image."},
                {"role": "assistant", "content": caption(scene, style)}]
        document = conversation_document(tokenizer, chat, [processor(scene.image())], model.config.image_token_id,
                                         model.image_tokens)
        batch = pack_documents([document], len(document))
        logits = model(packed=batch).logits[0]  # (T, V)
        for position, target in enumerate(batch.labels[0].tolist()):  # the caption's next-token targets
            for kind, candidates in choices.items():
                if target in kinds[kind]:
                    hits[kind][0] += int(candidates[logits[position, candidates].argmax()] == target)
                    hits[kind][1] += 1
    return {kind: (right / max(total, 1), total) for kind, (right, total) in hits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--style", choices=CAPTION_STYLES, default="located")
    parser.add_argument("--scenes", type=int, default=150)
    args = parser.parse_args()
    model, tokenizer = load(args.checkpoint)
    result = caption_word_accuracy(model, tokenizer, args.style, args.scenes)
    print(f"{args.checkpoint}, {args.style} captions: " + ", ".join(
        f"{kind} words {100 * accuracy:.1f}% of {count}" for kind, (accuracy, count) in result.items()))


if __name__ == "__main__":
    main()
