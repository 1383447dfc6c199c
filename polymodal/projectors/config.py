"""The input projector's config: one dataclass for every projector kind, chosen by `kind`."""
from __future__ import annotations

from dataclasses import dataclass

from polymodal.bounds import (
    MAX_HEADS,
    MAX_INTERMEDIATE,
    MAX_LAYERS,
    MAX_POSITIONS,
    MAX_VOCAB,
    MAX_WIDTH,
    check_float,
    check_int,
    check_multiple,
)


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

    def __post_init__(self) -> None:
        """Check every size against `polymodal.bounds` before anything is built.

        Widths left None come from the vision tower or the LM, whose own configs bound them."""
        owner = "ProjectorConfig"
        check_int(owner, "mlp_depth", self.mlp_depth, 1, MAX_LAYERS)
        check_int(owner, "num_queries", self.num_queries, 1, MAX_POSITIONS)
        check_int(owner, "num_layers", self.num_layers, 1, MAX_LAYERS)
        check_int(owner, "num_heads", self.num_heads, 1, MAX_HEADS)
        if self.hidden_size is not None:
            check_int(owner, "hidden_size", self.hidden_size, 1, MAX_WIDTH)
            if self.kind in ("resampler", "qformer"):  # the kinds with attention of their own width
                check_multiple(owner, "hidden_size", self.hidden_size, "num_heads", self.num_heads)
        if self.intermediate_size is not None:
            check_int(owner, "intermediate_size", self.intermediate_size, 1, MAX_INTERMEDIATE)
        check_float(owner, "layer_norm_eps", self.layer_norm_eps, 0, 1, low_open=True)
        check_float(owner, "vision_norm_eps", self.vision_norm_eps, 0, 1, low_open=True)
        check_int(owner, "cross_attention_every", self.cross_attention_every, 1, MAX_LAYERS)
        check_int(owner, "text_vocab_size", self.text_vocab_size, 0, MAX_VOCAB)  # 0: no instruction input
        check_int(owner, "max_text_positions", self.max_text_positions, 1, MAX_POSITIONS)
