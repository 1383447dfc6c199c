"""Objectives: functions `(model, batch) -> scalar loss` that `train()` optimises.

A model returns outputs (hidden states, logits, embeddings); an objective turns them into a
loss. The token objectives read what the packer recorded for each segment's target
(`polymodal.sequence`: next-token labels, masked-token labels, payload placements), so one
packed batch can mix targets (Show-o and Transfusion train several at once); the contrastive
objectives read a dual encoder's embeddings; the diffusion objective a denoiser's prediction.
"""
from polymodal.train.objectives.contrastive import caption_loss, clip_loss, contrastive_loss, siglip_loss
from polymodal.train.objectives.diffusion import diffusion_objective
from polymodal.train.objectives.tokens import masked_token_loss, next_token_loss, sequence_loss, token_cross_entropy

__all__ = ["caption_loss", "clip_loss", "contrastive_loss", "diffusion_objective", "masked_token_loss", "next_token_loss", "sequence_loss",
           "siglip_loss", "token_cross_entropy"]
