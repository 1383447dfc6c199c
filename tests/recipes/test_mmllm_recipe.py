"""Recipe `mmllm` through the CLI: both tiny stages train with falling loss and chain via init_from."""
import json
from pathlib import Path

import pytest

import polymodal
from polymodal.cli import main
from polymodal.data.conversation import ImageProcessor
from polymodal.data.world import World
from polymodal.recipes.mmllm import MMLLMDataConfig, MMLLMRecipeConfig, answer_questions

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "mmllm"


def _losses(out_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _falls(losses: list[float], by: float) -> bool:
    return sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - by


def test_tiny_align_then_instruct_with_lora(tmp_path, capsys):
    align, instruct = tmp_path / "align", tmp_path / "instruct"
    assert main(["train", str(CONFIGS / "tiny_align.yaml"), f"train.out_dir={align}"]) == 0
    assert "training" in capsys.readouterr().out  # the trainable-parameter count is printed
    assert _falls(_losses(align), 0.5)
    assert main(["train", str(CONFIGS / "tiny_instruct.yaml"), f"train.out_dir={instruct}",
                 f"init_from={align / 'final'}"]) == 0
    printed = capsys.readouterr().out
    assert "LoRA rank 4" in printed and "projector, lm" in printed
    assert _falls(_losses(instruct), 0.1)

    model, tokenizer = polymodal.load(instruct / "final")  # LoRA merged: plain mmllm names
    assert model.family == "mmllm" and not any("lora" in k for k in model.state_dict())
    scene = World("val", image_size=model.config.vision.image_size)[0]
    questions = [qa.question for qa in scene.questions()[:3]]
    answers = answer_questions(model, tokenizer, ImageProcessor.for_model(model.config),
                               [(scene.image(), q) for q in questions], max_new_tokens=4)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_recipe_config_errors():
    with pytest.raises(ValueError, match="stage"):
        MMLLMRecipeConfig(stage="pretrain")
    with pytest.raises(ValueError, match="trainable"):
        MMLLMRecipeConfig(trainable=["decoder"])
    with pytest.raises(ValueError, match="caption_styles"):
        MMLLMDataConfig(caption_styles=["poem"])


def test_align_captions_follow_caption_styles():
    from polymodal.data.world import world_tokenizer
    from polymodal.recipes.mmllm import IMAGE_TOKEN, world_documents

    tokenizer = world_tokenizer()
    world = World("train", image_size=32)
    document = world_documents("align", tokenizer, ImageProcessor(32), world, tokenizer.token_to_id(IMAGE_TOKEN), 4,
                               turns=1, caption_styles=["grounded"])
    for index in range(3):
        answer = [seg for seg in document(index).segments if seg.loss]
        assert tokenizer.decode(answer[0].tokens.tolist()).strip().startswith(world[index].caption("grounded"))
