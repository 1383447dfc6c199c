"""Text retention: does multimodal tuning keep a pretrained LM's answers to plain text questions?

The measure is strict: a question counts as unchanged only when the tuned model's greedy reply
is exactly the base model's (both cut at the same token budget). It runs on
`polymodal.data.general_chat.RETENTION_QUESTIONS`, which the stage-2 text replay never shows.
"""
from __future__ import annotations

from collections.abc import Sequence

from polymodal.infer.chat import chat_batch


def text_replies(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 48, batch_size: int = 8) -> list[str]:
    """Greedy replies to text-only prompts (one user turn each, no image), in order."""
    return chat_batch(model, tokenizer, [([{"role": "user", "content": p}], ()) for p in prompts],
                      batch_size=batch_size, max_new_tokens=max_new_tokens)


def finished_replies(tokenizer, prompts: Sequence[str], replies: Sequence[str], max_new_tokens: int) -> list[tuple[str, str]]:
    """The (prompt, reply) pairs whose reply ended on its own, i.e. is shorter than the token budget
    it was generated with. A reply cut by the budget would teach the model to stop mid-sentence."""
    return [(p, r) for p, r in zip(prompts, replies) if r and len(tokenizer.encode(r)) < max_new_tokens - 1]


def retention_report(questions: Sequence[str], base: Sequence[str], tuned: Sequence[str]) -> dict:
    """{"unchanged": k, "total": n, "items": [{"question", "base", "tuned", "unchanged"}]}."""
    if not len(questions) == len(base) == len(tuned):
        raise ValueError(f"retention_report: {len(questions)} questions, {len(base)} base and {len(tuned)} tuned replies")
    items = [{"question": q, "base": b, "tuned": t, "unchanged": b == t} for q, b, t in zip(questions, base, tuned)]
    return {"unchanged": sum(i["unchanged"] for i in items), "total": len(items), "items": items}
