"""The input projector's config: one dataclass for every projector kind, chosen by `kind`."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ProjectorConfig:
    """Options of the input projector (vision features -> LM embeddings).

    kind: "linear" (LLaVA-1), "mlp" (LLaVA-1.5, `mlp_depth` layers with GELU), "resampler"
    (Qwen-VL: learned queries cross-attending to the features, `num_layers` deep), "qformer"
    (BLIP-2 / InstructBLIP Q-Former + linear map into the LM).
    num_queries: learned query tokens (resampler, qformer). hidden_size / intermediate_size /
    num_heads / num_layers / layer_norm_eps: the resampler's or Q-Former's own width;
    intermediate_size is also the width of the MLP projector's hidden layers (default: the LM's).
    cross_attention_every: Q-Former layers with cross-attention to the image (1 = every layer).
    instruction_aware: InstructBLIP — the instruction text enters the Q-Former (needs
    `text_vocab_size` and `max_text_positions` for its own word/position embeddings).
    vision_norm_eps: eps of the Q-Former's LayerNorm on the image features (BLIP-2's
    `vision_model.post_layernorm`, LAVIS's `ln_vision`), separate from the Q-Former's own eps.
    """

    kind: str = "mlp"
    mlp_depth: int = 2
    num_queries: int = 64
    num_layers: int = 1
    num_heads: int = 8
    hidden_size: int | None = None
    intermediate_size: int | None = None
    layer_norm_eps: float = 1e-6
    cross_attention_every: int = 1
    instruction_aware: bool = False
    text_vocab_size: int = 0
    max_text_positions: int = 512
    vision_norm_eps: float = 1e-6
