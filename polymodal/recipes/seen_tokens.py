"""Which token ids a training stage saw, and a fresh start for the rest in the next stage.

A from-scratch LM trained on a narrow stage (the MM-LLM align stage: captions only) never sees
most of its vocabulary, yet every step's softmax pushes each unseen token's output row along the
same direction (its gradient is p_j * h, the same hidden states for all of them), and with tied
weights those rows are the input embeddings too. Measured after the quickstart's align stage: 454
of 510 rows had norm ~2.6 (trained rows ~1, initial ~0.23) at pairwise cosine 0.99. The next
stage then starts with its question words indistinguishable as inputs and its answer words at
probability ~e^-27, and whether it recovers in time decides the run (docs/notes/quickstart.md).
So a stage that trains the LM's embeddings records the ids it saw (`SeenTokens`: training state
of the run, restored on resume, and `seen_tokens.json` in its final checkpoint) and a stage that
continues from it re-initialises the embedding (and untied output) rows of every other id
(`reinit_unseen_tokens`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from polymodal.atomic import write_text_atomic

SEEN_TOKENS_FILE = "seen_tokens.json"
INIT_STD = 0.02  # the decoder's fresh-embedding init (polymodal.nn.init)


class SeenTokens:
    """The set of token ids that occurred (as input or target) in a stage's batches."""

    def __init__(self, vocab_size: int):
        self.seen = torch.zeros(vocab_size, dtype=torch.bool)

    def add(self, token_ids: torch.Tensor, real: torch.Tensor) -> None:
        """Mark the ids at the `real` (non-padding) positions of a (R, L) batch as seen.

        The set moves to the batch's device once, so a training step never waits on a copy."""
        self.seen = self.seen.to(token_ids.device)
        ids = token_ids[real].long()
        self.seen[ids[(ids >= 0) & (ids < len(self.seen))]] = True

    def sync_across_ranks(self) -> None:
        """In a multi-process run each rank sees its own share of the batches: make every rank's set
        the union of all of them (`polymodal.distributed` calls this after each step)."""
        import torch.distributed as dist

        merged = self.seen.to(torch.uint8)
        dist.all_reduce(merged, op=dist.ReduceOp.MAX)
        self.seen = merged.bool()

    def save(self, path: Path) -> None:
        """Write the seen ids (with the vocabulary size) to `path` atomically."""
        ids = self.seen.nonzero().flatten().tolist()
        write_text_atomic(path, json.dumps({"vocab_size": len(self.seen), "ids": ids}))

    @classmethod
    def load(cls, path: Path) -> "SeenTokens":
        """Read a file written by `save`."""
        try:
            record = json.loads(Path(path).read_text())
            tokens = cls(int(record["vocab_size"]))
            tokens.seen[torch.tensor(record["ids"], dtype=torch.long)] = True
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise ValueError(f"{path}: not a seen-tokens file ({err})") from None
        return tokens

    def state_dict(self) -> dict:
        """{"seen": bool (V,)}: the training-state form (restored exactly on resume)."""
        return {"seen": self.seen.cpu()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a set saved by `state_dict`."""
        seen = state["seen"]
        if seen.shape != self.seen.shape:
            raise ValueError(f"seen-token state has {seen.numel()} ids, this vocabulary {self.seen.numel()}")
        self.seen = seen.to(device=self.seen.device, dtype=torch.bool).clone()


def recorded_in(checkpoint: str | Path) -> SeenTokens | None:
    """The token ids the stage that wrote `checkpoint` saw (its `seen_tokens.json`), or None when
    it recorded none (a stage that did not train the LM's embeddings, or a foreign checkpoint)."""
    record = Path(checkpoint) / SEEN_TOKENS_FILE
    return SeenTokens.load(record) if record.exists() else None


def reinit_unseen_tokens(lm: torch.nn.Module, seen: SeenTokens, seed: int = 0) -> int:
    """Give every token id that `seen` lacks fresh N(0, INIT_STD) rows in `lm.embed_tokens` and,
    when it is untied, `lm.lm_head`. Ids beyond the recorded vocabulary count as unseen.
    Returns how many ids were re-initialised."""
    vocab = lm.embed_tokens.weight.shape[0]
    unseen = torch.ones(vocab, dtype=torch.bool)
    known = min(vocab, len(seen.seen))
    unseen[:known] = ~seen.seen[:known].cpu()
    count = int(unseen.sum())
    generator = torch.Generator().manual_seed(seed)
    weights = [lm.embed_tokens.weight]
    if lm.lm_head.weight is not lm.embed_tokens.weight:  # untied: the output rows were pushed too
        weights.append(lm.lm_head.weight)
    with torch.no_grad():
        for weight in weights:
            fresh = torch.randn(count, weight.shape[1], generator=generator) * INIT_STD
            weight[unseen.to(weight.device)] = fresh.to(weight.device, weight.dtype)
    return count
