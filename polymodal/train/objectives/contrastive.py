"""Contrastive objectives: CLIP's symmetric InfoNCE, SigLIP's pairwise sigmoid loss, CoCa's caption loss.

`contrastive_loss(model, batch)` is the `clip` family's objective: it reads a dual encoder's
normalised embeddings (and CoCa's caption logits) and applies the loss its config names.

Both take L2-normalised embeddings of B matching (image, text) pairs, row i of each being a pair.

Distributed training. With `torch.distributed` initialised, each rank holds B_local pairs and
the negatives are the embeddings of *every* rank: `gather_with_grad` all-gathers them, keeping
the gradient path to the local shard (its backward sums the gradient every rank computed for
this rank's rows). Each rank's loss is the mean over its own rows, so the mean of the rank
losses is exactly the single-process loss of the concatenated batch, and so are the gradients
once they are averaged across ranks (DDP averages them) — tests/train/test_contrastive_loss.py
checks both with two gloo processes. Ranks must hold the same B_local.

Gradient accumulation shrinks the contrastive batch: with `grad_accum = k` the training loop
computes the loss of each micro-batch on its own, so the negatives of a pair are the other
B_local * world_size pairs of its micro-batch, not the k times larger accumulated batch. The
gradient is the average of k small-batch contrastive losses, which is a different (easier)
objective than one large-batch loss; raise the per-step batch rather than `grad_accum` when the
number of negatives matters.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns this rank's slice of the summed gradient.

    Written with all_gather + all_reduce only (no reduce_scatter / all_to_all), so it runs on
    gloo (CPU) as well as NCCL.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def distributed_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x (B_local, D) from every rank -> (world * B_local, D), differentiable.

    Without an initialised process group this is the identity.
    """
    if distributed_world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy (InfoNCE) over the global batch.

    image_embeds, text_embeds: (B_local, D), L2-normalised; logit_scale: scalar, already
    exponentiated (the temperature's inverse). Returns the mean over this rank's rows of
    (CE(image -> all texts) + CE(text -> all images)) / 2.
    """
    rank, _ = distributed_world()
    all_images, all_texts = gather_with_grad(image_embeds), gather_with_grad(text_embeds)
    local = image_embeds.shape[0]
    labels = torch.arange(local, device=image_embeds.device) + rank * local  # (B_local,)
    logits_per_image = logit_scale * image_embeds @ all_texts.t()  # (B_local, B_global)
    logits_per_text = logit_scale * text_embeds @ all_images.t()  # (B_local, B_global)
    return (F.cross_entropy(logits_per_image.float(), labels) + F.cross_entropy(logits_per_text.float(), labels)) / 2


def siglip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's sigmoid loss (Zhai et al., 2023) over every (image, text) pair of the global batch.

    z_ij = logit_scale * <x_i, y_j> + logit_bias; label +1 for the matching pair, -1 otherwise;
    loss = -(1 / B) sum_ij log sigmoid(label_ij * z_ij), with B the number of images. This rank
    scores its B_local images against the texts of every rank (one gather instead of the paper's
    ring exchange; same value), normalised by B_local so that rank losses average to the global one.
    """
    rank, _ = distributed_world()
    all_texts = gather_with_grad(text_embeds)
    local = image_embeds.shape[0]
    logits = (logit_scale * image_embeds @ all_texts.t() + logit_bias).float()  # (B_local, B_global)
    labels = -torch.ones_like(logits)
    columns = torch.arange(local, device=logits.device) + rank * local
    labels[torch.arange(local, device=logits.device), columns] = 1.0
    return -F.logsigmoid(labels * logits).sum() / local


def caption_loss(logits: torch.Tensor, captions: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Next-token cross-entropy of a captioning decoder (CoCa).

    logits (B, T, V) predicted from positions <= t; captions (B, T) token ids; attention_mask
    (B, T) 1 for real tokens (padding is not predicted). Returns the mean over predicted tokens.
    """
    targets = captions[:, 1:]
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)


def contrastive_loss(model, batch: dict) -> torch.Tensor:
    """The dual-encoder objective of a batch {"pixel_values", "input_ids", "attention_mask"?,
    "captions"?, "caption_mask"?}: `model.config.loss` ("clip" or "siglip") on the pairs, plus, for
    CoCa, `caption_loss_weight` x the captioning loss of `captions` (default: the input texts)."""
    out = model(**batch)
    scale = model.scale()
    if model.config.loss == "siglip":
        loss = siglip_loss(out.image_embeds, out.text_embeds, scale, model.logit_bias)
    else:
        loss = clip_loss(out.image_embeds, out.text_embeds, scale)
    if out.caption_logits is not None:
        captions, mask = batch.get("captions"), batch.get("caption_mask")
        if captions is None:
            captions, mask = batch["input_ids"], batch.get("attention_mask")
        loss = loss + model.config.caption_loss_weight * caption_loss(out.caption_logits, captions, mask)
    return loss
