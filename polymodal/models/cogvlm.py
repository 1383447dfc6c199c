"""Family `cogvlm`: an MM-LLM whose decoder layers carry a visual expert (CogVLM, arXiv:2311.03079).

CogVLM adds "a QKV matrix and an MLP" to every layer of the language model for the image
positions alone; text positions keep the LM's own weights, so a text-only chat gets exactly the
frozen LM's answers, while image tokens get as much capacity as text tokens instead of a thin
projector (deep fusion without cross-attention). The released model also gives the attention
output projection an image copy (its `vision_expert_dense` weight), which we follow.

Here that is the `mmllm` family's model (vision tower -> projector -> `<image>` slots of the
decoder) with each chosen `nn.Linear` of the decoder layers (`expert_targets`: q/k/v/o of the
attention and gate/up/down of the SwiGLU) swapped for a `VisualExpertLinear`: the layer keeps its
`weight`/`bias` for text positions under the LM's own names and holds an `expert` copy for image
positions. Which positions are images is read from the `<image>` placeholders of the packed
sequence (or of the prompt at generation), the same positions the projector fills; every
decoder layer routes by that one mask. Attention itself is shared: text queries attend to image
keys made by the expert, as in the paper. The expert starts as a copy of the LM's weights (the
paper initialises it from the LM), so a converted `mmllm` model answers exactly as before.

Shapes: as `MultimodalLM` (input_ids (B, T), pixel_values (N, C, H, W) -> logits (B, T, V)).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.errors import ConfigError
from polymodal.models.mmllm import MMLLMConfig, MultimodalLM, _example_batch, mmllm_tiny
from polymodal.models.registry import Family, Recipe, register

# The decoder-layer linears a visual expert may copy: attention q/k/v/o and the SwiGLU MLP.
EXPERT_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class CogVLMConfig(MMLLMConfig):
    """An `MMLLMConfig` plus the decoder linears that get a visual expert.

    expert_targets: names (last path component) among EXPERT_LAYERS; each such linear of every
    decoder layer runs image positions with its own expert weights. `image_lora` must stay off:
    the expert already gives image positions weights of their own.
    """

    expert_targets: list[str] = field(default_factory=lambda: list(EXPERT_LAYERS))

    def __post_init__(self) -> None:
        super().__post_init__()
        targets = list(self.expert_targets)
        if not targets or any(t not in EXPERT_LAYERS for t in targets) or len(set(targets)) != len(targets):
            raise ConfigError(f"CogVLMConfig.expert_targets must be distinct names from {list(EXPERT_LAYERS)}, "
                              f"got {targets!r}")
        if self.image_lora.rank:
            raise ConfigError("CogVLMConfig.image_lora: image-position adapters duplicate the visual expert; "
                              "set image_lora.rank to 0")


class VisualExpertLinear(nn.Linear):
    """An `nn.Linear` for text positions plus an `expert` linear for image positions. x (..., in) -> (..., out).

    `weight`/`bias` are the wrapped layer's own parameters under their own names (a checkpoint
    of the plain LM is a subset of ours); `expert` starts as their copy. `route` (bool, x's
    leading shape) is set by `routed_to_experts`; None routes every position to the text weights.
    """

    def __init__(self, base: nn.Linear):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        self.weight, self.bias = base.weight, base.bias
        self.expert = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                                device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            self.expert.weight.copy_(base.weight)
            if base.bias is not None:
                self.expert.bias.copy_(base.bias)
        self.route: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Every position goes through the text weights in one matmul, as in the plain layer, so
        # text positions get bit-for-bit the plain decoder's values; image rows are then replaced.
        out = F.linear(x, self.weight, self.bias)
        route = self.route
        if route is None:
            return out
        if route.shape != x.shape[:-1]:
            raise ValueError(f"visual expert route of shape {tuple(route.shape)} does not match the input's "
                             f"positions {tuple(x.shape[:-1])}")
        if not bool(route.any()):
            return out
        return out.masked_scatter(route.unsqueeze(-1), self.expert(x[route]).to(out.dtype))  # (N_img, out) rows


def add_visual_experts(lm: nn.Module, targets: list[str]) -> int:
    """Swap every plain `nn.Linear` of `lm`'s decoder layers named in `targets` for a
    `VisualExpertLinear` (expert = copy of its weights); returns how many were swapped."""
    swapped = 0
    for block in lm.layers.layers:
        for name, module in list(block.named_modules()):
            if type(module) is nn.Linear and name.rpartition(".")[2] in targets:
                parent, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent) if parent else block, child, VisualExpertLinear(module))
                swapped += 1
    if not swapped:
        raise ConfigError(f"CogVLMConfig.expert_targets {targets} match no linear layer of the LM's decoder layers")
    return swapped


@contextmanager
def routed_to_experts(lm: nn.Module, image_mask: torch.Tensor) -> Iterator[None]:
    """Within the block, every `VisualExpertLinear` of `lm` runs the `image_mask` (B, T) positions
    with its expert weights."""
    layers = [m for m in lm.modules() if isinstance(m, VisualExpertLinear)]
    for layer in layers:
        layer.route = image_mask
    try:
        yield
    finally:
        for layer in layers:
            layer.route = None


class CogVLM(MultimodalLM):
    """A `MultimodalLM` whose decoder layers route image positions to a visual expert (module docstring).

    vision / lm / projector: built parts, as `MultimodalLM` takes them; the LM gets its experts here.
    """

    family = "cogvlm"

    def __init__(self, config: CogVLMConfig, vision: nn.Module | None = None, lm: nn.Module | None = None,
                 projector: nn.Module | None = None):
        super().__init__(config, vision, lm, projector)
        add_visual_experts(self.lm, list(config.expert_targets))

    @classmethod
    def from_mmllm(cls, model: MultimodalLM, expert_targets: list[str] | None = None) -> CogVLM:
        """A CogVLM made of an `mmllm` model's parts (shared, not copied), its experts copied from
        the LM: the result computes exactly what `model` does until the experts train."""
        if model.config.image_lora.rank:
            raise ConfigError("cogvlm: the mmllm model has image-position adapters (image_lora); a visual expert "
                              "replaces them, so start from a model without them")
        fields = {f.name: getattr(model.config, f.name) for f in dataclasses.fields(MMLLMConfig)}
        config = CogVLMConfig(**fields, expert_targets=list(expert_targets or EXPERT_LAYERS))
        return cls(config, vision=model.vision, lm=model.lm, projector=model.projector)

    @property
    def treats_image_positions_apart(self) -> bool:
        """Always: image positions run through the visual expert."""
        return True

    def image_position_weights(self, image_mask: torch.Tensor):
        """Route the `image_mask` (B, T) positions of the LM's forwards to the visual expert."""
        return routed_to_experts(self.lm, image_mask)

    @property
    def expert(self) -> nn.ModuleList:
        """The expert linears of every layer (a view for freezing and counting; they are stored
        inside the LM, under `...<layer name>.expert`)."""
        return nn.ModuleList(m.expert for m in self.lm.modules() if isinstance(m, VisualExpertLinear))


def cogvlm_tiny() -> CogVLMConfig:
    """`mmllm_tiny` with a visual expert on every attention and MLP linear."""
    return CogVLMConfig(**{f.name: getattr(mmllm_tiny(), f.name) for f in dataclasses.fields(MMLLMConfig)})


COGVLM = register(Family(
    "cogvlm", CogVLMConfig, CogVLM, cogvlm_tiny, _example_batch,
    objective="polymodal.train.objectives:sequence_loss",
    tasks=("complete", "chat"),
    recipes=(Recipe("cogvlm", "polymodal.recipes.cogvlm:CogVLMRecipeConfig", "polymodal.recipes.cogvlm:cogvlm_job",
                    outputs=("base_text_answers.json", "retention.json")),),
    evaluate="polymodal.eval.mmllm:evaluate",
))
