"""BLIP's pre-training objective: ITC + ITM + captioning (Li et al., 2022, section 3.2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from polymodal.train.objectives.contrastive import caption_loss, clip_loss


def blip_loss(model, batch: dict) -> torch.Tensor:
    """BLIP's objective for a `BlipModel` on a batch {"pixel_values", "input_ids",
    "attention_mask"}: the weighted sum of ITC (symmetric InfoNCE), ITM (cross-entropy over the
    positives and the mined negatives) and the decoder's next-token loss, each for the sides the
    model has (scalar)."""
    out = model(**batch)
    c = model.config
    terms = []
    if c.retrieval:
        terms.append(c.itc_weight * clip_loss(out.image_embeds, out.text_embeds, model.scale()))
        terms.append(c.itm_weight * F.cross_entropy(out.itm_logits.float(), out.itm_labels, ignore_index=-100))
    if c.captioning:
        terms.append(c.caption_weight * caption_loss(out.caption_logits, out.caption_ids, out.caption_mask))
    return sum(terms[1:], terms[0])
