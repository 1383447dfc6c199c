"""transformers `ChameleonForConditionalGeneration` folders -> the `unified` family.

A Chameleon checkpoint is the unified layout already: one decoder LM whose vocabulary holds the
VQ image codes (as BPE tokens named IMGIMG...) and the image tokenizer under `model.vqmodel.*`.
The LM comes through `polymodal.interop.hf_chameleon_lm` (Llama layout + per-head QK-norm), the
tokenizer through `polymodal.interop.hf_chameleon_vq` (encoder only: transformers does not ship
the VQGAN decoder, so the imported model reads images and writes text, and refuses to draw).
Codes map to token ids through the vocabulary's own table (`UnifiedConfig.code_table`), an image
is `<racm3:break>` + codes + `<eoss>` with no row ends, and chat images are scaled to [-1, 1] at
the tokenizer's resolution (Chameleon's processor rescales by 1/127.5 and shifts by -1; it
resizes the short side and center-crops where our "siglip" preset resizes to the square).
Import only: there is no export back to this layout.
"""
from __future__ import annotations

from typing import Mapping

import torch

from polymodal.errors import CheckpointError
from polymodal.interop.converters import Converter
from polymodal.interop.hf_chameleon_lm import chameleon_decoder_config, chameleon_image_vocabulary, chameleon_lm_state
from polymodal.interop.hf_chameleon_vq import chameleon_vq_config, chameleon_vq_state
from polymodal.models.unified import UnifiedConfig


def chameleon_unified_config(cfg: dict, source: str = "config.json") -> UnifiedConfig:
    """The `UnifiedConfig` of a ChameleonForConditionalGeneration config.json dict."""
    if not isinstance(cfg.get("vocabulary_map"), dict):
        raise CheckpointError(f"{source}: a Chameleon config needs its 'vocabulary_map' (token name -> id), "
                              "which maps the image codes into the vocabulary")
    lm = chameleon_decoder_config(cfg, source)
    vocabulary = chameleon_image_vocabulary(cfg["vocabulary_map"])
    tokenizer = chameleon_vq_config(cfg.get("vq_config") or {}, source=f"{source} (vq_config)")
    return UnifiedConfig(lm=lm, image_tokenizer=tokenizer, text_vocab_size=lm.vocab_size,
                         image_start_id=vocabulary.boi_token_id, image_end_id=vocabulary.eoi_token_id,
                         image_token_id=vocabulary.image_token_id, row_end=False,
                         code_table=list(vocabulary.code_to_token), image_size=tokenizer.image_size)


def chameleon_unified_state(tensors: Mapping[str, torch.Tensor], model, source: str) -> dict[str, torch.Tensor]:
    """Our `UnifiedModel` state dict from the folder's tensors: the LM and the image tokenizer part."""
    lm = chameleon_lm_state(tensors, model.config.lm, source)
    tokenizer = chameleon_vq_state(tensors, config=model.config.image_tokenizer, source=source)
    return {**{f"lm.{k}": v for k, v in lm.items()}, **{f"image_tokenizer.{k}": v for k, v in tokenizer.items()}}


CHAMELEON_CONVERTER = Converter(
    name="Chameleon (LM + VQ image tokenizer)",
    family="unified",
    architectures=("ChameleonForConditionalGeneration",),
    model_types=("chameleon",),
    config_from=lambda cfg, weights, source: chameleon_unified_config(cfg, source),
    state_from=chameleon_unified_state,
)
