"""Recipe `cogvlm`: the `mmllm` recipe's stages for a model with a visual expert (`polymodal.models.cogvlm`).

Everything but the model is the `mmllm` recipe (data, stages, packing, output layout). The model
is `init_from` a `cogvlm` checkpoint (continued), or an `mmllm` checkpoint converted by copying
its LM's layer weights into the experts (CogVLM's initialisation: it answers as before until the
experts train), or built as the `mmllm` recipe builds one (`model`, `lm_from`, `vision_from`) and
converted. The trainable parts gain "expert"; by default a stage trains the projector and the
expert with the LM frozen, as CogVLM does, so text-only chats keep the LM's answers exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from polymodal.errors import ConfigError
from polymodal.models.cogvlm import CogVLM, CogVLMConfig
from polymodal.recipes.mmllm import PARTS, MMLLMRecipeConfig, build_mmllm, mmllm_job
from polymodal.recipes.runner import TrainingJob

# "expert" after "lm": the experts live inside the LM, so their setting must come last.
COGVLM_PARTS = (*PARTS, "expert")


@dataclass
class CogVLMRecipeConfig(MMLLMRecipeConfig):
    """An `MMLLMRecipeConfig` whose model is a `CogVLMConfig`; `trainable` may name "expert".
    LoRA is refused: the expert is this family's image-side adaptation."""

    recipe: str = "cogvlm"
    model: CogVLMConfig = field(default_factory=CogVLMConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora.rank:
            raise ConfigError("cogvlm recipe: lora.rank must be 0; the visual expert already gives image positions "
                              "weights of their own (train it with trainable: [..., expert])")

    def part_names(self) -> tuple[str, ...]:
        """vision, projector, lm, expert."""
        return COGVLM_PARTS

    def default_trainable(self) -> list[str]:
        """The projector and the expert (the LM and the vision tower stay frozen)."""
        return ["projector", "expert"]


def build_cogvlm(config: CogVLMRecipeConfig) -> tuple[CogVLM, object]:
    """The model to train and its tokenizer, per `init_from` (cogvlm or mmllm) or the `mmllm` recipe's build."""
    if not config.init_from:
        model, tokenizer = build_mmllm(config)
        return CogVLM.from_mmllm(model, config.model.expert_targets), tokenizer
    from polymodal.api import load

    model, tokenizer = load(config.init_from)
    family = getattr(model, "family", None)
    if family == "cogvlm":
        return model.train(), tokenizer
    if family == "mmllm":
        return CogVLM.from_mmllm(model, config.model.expert_targets).train(), tokenizer
    raise ConfigError(f"cogvlm recipe: init_from {config.init_from} holds a {family!r} model, not cogvlm or mmllm")


def cogvlm_job(config: CogVLMRecipeConfig) -> TrainingJob:
    """The training job of one stage: the `mmllm` job on the CogVLM model."""
    model, tokenizer = build_cogvlm(config)
    return mmllm_job(config, model, tokenizer)
