"""Token objectives over a packed batch: next-token and masked-token cross-entropy.

The model contract: `model(packed=batch, logits=False)` returns an output whose `hidden_states`
are (R, L, D), and `model.output_logits(hidden (N, D)) -> (N, V)` is its output head. The head
runs only on the scored positions: in chat tuning most positions carry no target, and the head
is the widest matmul of a small LM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from polymodal.sequence import IGNORE_INDEX, PackedBatch


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (..., V) against labels (...), skipping IGNORE_INDEX labels.

    Computed in float32 whatever the logits' dtype (bf16 log-softmax loses the small probabilities)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def _scored_loss(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the output head on the positions of `labels` (R, L) that carry a target."""
    scored = labels != IGNORE_INDEX
    return token_cross_entropy(model.output_logits(hidden[scored]), labels[scored])  # head on (N, D) rows only


def sequence_loss(model, batch: PackedBatch) -> torch.Tensor:
    """The sum of every token objective the batch's segments carry (next-token, masked-token), from
    one forward pass. A batch with neither is an error (nothing would be trained)."""
    hidden = model(packed=batch, logits=False).hidden_states  # (R, L, D)
    terms = [_scored_loss(model, hidden, labels) for labels in (batch.labels, batch.masked_labels)
             if bool((labels != IGNORE_INDEX).any())]
    if not terms:
        raise ValueError("the packed batch carries no next-token or masked-token targets (every segment has "
                         "target=None): there is nothing to train on")
    return terms[0] if len(terms) == 1 else torch.stack(terms).sum()


def next_token_loss(model, batch: PackedBatch) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's `labels` (Segment target NEXT_TOKEN)."""
    return _scored_loss(model, model(packed=batch, logits=False).hidden_states, batch.labels)


def masked_token_loss(model, batch: PackedBatch) -> torch.Tensor:
    """Mean cross-entropy of the masked positions against their `masked_labels` (Segment target
    MASKED_TOKEN: Show-o, BEiT, MaskGIT); each masked position predicts its own original id."""
    return _scored_loss(model, model(packed=batch, logits=False).hidden_states, batch.masked_labels)
