"""Recipe `mmllm` through the CLI: both tiny stages train with falling loss and chain via init_from."""
import json
from pathlib import Path

import pytest
import torch

import polymodal
from polymodal.cli import main
from polymodal.data.conversation import ImageProcessor
from polymodal.data.world import World
from polymodal.eval.mmllm import answer_questions
from polymodal.models.mmllm import MMLLMConfig
from polymodal.nn.lora import LoRAConfig
from polymodal.recipes.mmllm import MMLLMDataConfig, MMLLMRecipeConfig
from polymodal.recipes.seen_tokens import SEEN_TOKENS_FILE, SeenTokens
from polymodal.sequence import NEXT_TOKEN

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
    # The align stage trained the LM's embeddings, so it recorded the ids it saw: the caption
    # words and the placeholder, not the instruct stage's question words.
    seen = SeenTokens.load(align / "final" / SEEN_TOKENS_FILE).seen
    _, tokenizer = polymodal.load(align / "final")
    assert seen[tokenizer.encode(" circle")].all() and not seen[tokenizer.encode(" How many")].any()
    assert main(["train", str(CONFIGS / "tiny_instruct.yaml"), f"train.out_dir={instruct}",
                 f"init_from={align / 'final'}"]) == 0
    printed = capsys.readouterr().out
    assert f"fresh embeddings for the {int((~seen).sum())} of {len(seen)} token ids" in printed
    assert not (instruct / "final" / SEEN_TOKENS_FILE).exists()  # LoRA leaves the embeddings as they are
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
    with pytest.raises(ValueError, match="describe_styles"):
        MMLLMDataConfig(describe_styles=[])
    with pytest.raises(ValueError, match="describe"):
        MMLLMDataConfig(describe=-0.1)
    with pytest.raises(ValueError, match="question_weights"):
        MMLLMDataConfig(question_weights={"existence": 0})
    with pytest.raises(ValueError, match="text_replay does nothing with lora.image_tokens_only"):
        MMLLMRecipeConfig(stage="instruct", lora=LoRAConfig(rank=4, image_tokens_only=True),
                          data=MMLLMDataConfig(text_replay=0.2))


def test_align_captions_follow_caption_styles():
    from polymodal.data.conversation import IMAGE_MARKER
    from polymodal.data.world import world_tokenizer
    from polymodal.data.chat_documents import world_documents

    tokenizer = world_tokenizer()
    world = World("train", image_size=32)
    document = world_documents("align", tokenizer, ImageProcessor(32), world, tokenizer.token_to_id(IMAGE_MARKER), 4,
                               turns=1, caption_styles=["grounded"])
    for index in range(3):
        answer = [seg for seg in document(index).segments if seg.target == NEXT_TOKEN]
        assert tokenizer.decode(answer[0].tokens.tolist()).strip().startswith(world[index].caption("grounded"))


def test_instruct_chats_follow_turns_and_describe():
    from polymodal.data.conversation import IMAGE_MARKER
    from polymodal.data.world import world_tokenizer
    from polymodal.data.chat_documents import world_documents

    tokenizer = world_tokenizer()
    world = World("train", image_size=32)
    for describe in (0.0, 1.0):
        document = world_documents("instruct", tokenizer, ImageProcessor(32), world,
                                   tokenizer.token_to_id(IMAGE_MARKER), 4, turns=1, caption_styles=["short"],
                                   describe=describe)
        for index in range(5):
            answers = [seg for seg in document(index).segments if seg.target == NEXT_TOKEN]
            assert len(answers) == 1  # one turn, one supervised answer
            expected = world[index].conversation(1, describe)[1]["content"]
            assert tokenizer.decode(answers[0].tokens.tolist()).strip() == expected + "<|im_end|>"
            assert (len(expected.split()) > 3) == (describe == 1.0)  # descriptions are sentences, answers words


def test_instruct_descriptions_follow_describe_styles():
    from polymodal.data.conversation import IMAGE_MARKER
    from polymodal.data.world import world_tokenizer
    from polymodal.data.world.text import caption
    from polymodal.data.chat_documents import world_documents

    tokenizer = world_tokenizer()
    world = World("train", image_size=32)
    document = world_documents("instruct", tokenizer, ImageProcessor(32), world, tokenizer.token_to_id(IMAGE_MARKER),
                               4, turns=1, caption_styles=["short"], describe=1.0, describe_styles=["located"])
    for index in range(5):
        answer = next(seg for seg in document(index).segments if seg.target == NEXT_TOKEN)
        assert tokenizer.decode(answer.tokens.tolist()).strip() == caption(world[index], "located") + "<|im_end|>"


def test_text_replay_mixes_the_share_of_text_chats_with_loss_on_the_answer_only():
    from polymodal.data.conversation import IMAGE_MARKER
    from polymodal.data.world import world_tokenizer
    from polymodal.data.chat_documents import with_text_replay, world_documents

    tokenizer = world_tokenizer()
    world = World("train", image_size=32)
    visual = world_documents("instruct", tokenizer, ImageProcessor(32), world, tokenizer.token_to_id(IMAGE_MARKER), 4,
                             turns=2, caption_styles=["short"])
    replay = [("What is 7 plus 5?", "12"), ("Name a color.", "blue")]
    mixed = with_text_replay(visual, replay, tokenizer, share=0.25)
    docs = [mixed(i) for i in range(400)]
    text_only = [d for d in docs if not any(s.modality == "image" for s in d.segments)]
    assert 0.18 < len(text_only) / len(docs) < 0.32
    answers = {tokenizer.decode([t for s in d.segments if s.target == NEXT_TOKEN for t in s.tokens.tolist()]).strip() for d in text_only}
    assert answers == {"12<|im_end|>", "blue<|im_end|>"}  # the answer and its end-of-turn token
    assert [len(mixed(i)) for i in range(20)] == [len(d) for d in docs[:20]]  # the same choice on every epoch
    with pytest.raises(ValueError, match="no replay chats"):
        with_text_replay(visual, [], tokenizer, share=0.25)
    with pytest.raises(ValueError, match="text_replay"):
        MMLLMDataConfig(text_replay=1.0)


def test_finished_replies_and_retention_report():
    from polymodal.data.world import world_tokenizer
    from polymodal.eval.retention import finished_replies, retention_report

    tokenizer = world_tokenizer()
    kept = finished_replies(tokenizer, ["a", "b", "c"], ["short answer", "word " * 40, ""], max_new_tokens=20)
    assert kept == [("a", "short answer")]
    report = retention_report(["q1", "q2"], ["yes", "no"], ["yes", "maybe"])
    assert report["unchanged"] == 1 and report["total"] == 2 and report["items"][1]["tuned"] == "maybe"
    with pytest.raises(ValueError, match="2 questions"):
        retention_report(["q1", "q2"], ["yes"], ["yes"])


def test_instruct_stage_replays_recorded_text_answers_and_reports_retention(tmp_path, capsys):
    from polymodal.data.general_chat import RETENTION_QUESTIONS

    align, instruct = tmp_path / "align", tmp_path / "instruct"
    assert main(["train", str(CONFIGS / "tiny_align.yaml"), f"train.out_dir={align}", "train.steps=2"]) == 0
    # A tiny random LM rarely ends a reply on its own, so the recorded answers are given, as a
    # resumed run finds them (its own earlier output): the recipe must reuse them rather than record its own.
    from polymodal.outputs import Manifest

    instruct.mkdir()
    base = ["four"] * len(RETENTION_QUESTIONS)
    (instruct / "base_text_answers.json").write_text(json.dumps({"replay": [["Say four.", "four"]], "retention": base}))
    Manifest(instruct, "train", ["base_text_answers.json"]).save()
    assert main(["train", str(CONFIGS / "tiny_instruct.yaml"), f"train.out_dir={instruct}", f"init_from={align / 'final'}",
                 "data.text_replay=0.5", "text_retention=true", "train.steps=3", "train.resume=true"]) == 0
    assert "general questions keep the base model's answer" in capsys.readouterr().out
    report = json.loads((instruct / "retention.json").read_text())
    assert report["total"] == len(RETENTION_QUESTIONS) and [i["base"] for i in report["items"]] == base


def test_retention_counts_every_answer_unchanged_when_the_lm_does_not_move(tmp_path, capsys):
    align, instruct = tmp_path / "align", tmp_path / "instruct"
    # Retention is a stage-2 report: the align stage ignores the flag, as it ignores text replay.
    assert main(["train", str(CONFIGS / "tiny_align.yaml"), f"train.out_dir={align}", "train.steps=2",
                 "text_retention=true"]) == 0
    assert not (align / "retention.json").exists()
    assert main(["train", str(CONFIGS / "tiny_instruct.yaml"), f"train.out_dir={instruct}", f"init_from={align / 'final'}",
                 "text_retention=true", "train.steps=2", "train.lr=0"]) == 0
    report = json.loads((instruct / "retention.json").read_text())
    assert report["unchanged"] == report["total"] == 8
    assert json.loads((instruct / "base_text_answers.json").read_text())["retention"] == [i["base"] for i in report["items"]]


def test_seen_token_record_resumes_with_the_run(tmp_path):
    """A stage stopped and resumed records the same ids as one run straight through."""
    def run(out, steps, *extra):
        assert main(["train", str(CONFIGS / "tiny_align.yaml"), f"train.out_dir={out}", f"train.steps={steps}",
                     "data.docs_per_batch=2", *extra]) == 0
        return SeenTokens.load(out / "final" / SEEN_TOKENS_FILE).seen

    straight = run(tmp_path / "straight", 6)
    first = run(tmp_path / "resumed", 3)
    from polymodal.train.state import load_training_state

    checkpoint = load_training_state(tmp_path / "resumed" / "checkpoints" / "step-0000003")
    assert torch.equal(checkpoint.extra["seen_tokens"]["seen"], first)  # the record is training state
    assert torch.equal(run(tmp_path / "resumed", 6, "train.resume=true"), straight)
    assert not torch.equal(first, straight)  # the later steps did add ids


def test_vision_from_a_clip_checkpoint_takes_its_trained_tower_frozen(tmp_path):
    """`vision_from` a polymodal `clip` checkpoint (CNN tower): the MM-LLM's image tokens are that
    tower's feature map, it stays frozen through an align stage, and its [-1, 1] pixels ("siglip")
    are what the saved model's evaluation and chat preprocessing use."""
    from dataclasses import replace

    from polymodal.checkpoint import save_checkpoint
    from polymodal.encoders.convnet import ConvNetConfig
    from polymodal.models.contrastive import ContrastiveModel, clip_tiny
    from polymodal.models.mmllm import mmllm_tiny
    from polymodal.models.registry import get_recipe
    from polymodal.recipes.runner import run_training
    from polymodal.train.loop import TrainConfig

    torch.manual_seed(0)
    clip = ContrastiveModel(replace(clip_tiny(), image_tower="cnn",
                                    cnn=ConvNetConfig(image_size=32, widths=[8, 16, 16], pool="flatten")))
    save_checkpoint(clip, tmp_path / "clip")
    model_config = replace(mmllm_tiny(), vision_feature_layer=-1)
    config = MMLLMRecipeConfig(vision_from=str(tmp_path / "clip"), model=model_config,
                               data=MMLLMDataConfig(num_scenes=16, docs_per_batch=4, max_tokens=256),
                               train=TrainConfig(steps=3, lr=1e-3, out_dir=str(tmp_path / "align")))
    run = run_training(config, get_recipe("mmllm")[1])
    model, final = run.model, run.final
    assert model.config.vision_tower == "cnn" and model.image_tokens == 16  # 32 px / 2^3: a 4 x 4 map
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.vision(pixels).last_hidden_state, clip.vision_model(pixels).last_hidden_state)
    loaded, _ = polymodal.load(final)
    assert loaded.config.image_preset == "siglip" and ImageProcessor.for_model(loaded.config).preset == "siglip"


def test_vision_from_must_hold_a_contrastive_image_tower(tmp_path):
    from polymodal.checkpoint import save_checkpoint
    from polymodal.models.mmllm import MultimodalLM, mmllm_tiny
    from polymodal.recipes.mmllm import build_mmllm

    save_checkpoint(MultimodalLM(mmllm_tiny()), tmp_path / "mmllm")
    with pytest.raises(ValueError, match=r"vision_from .*mmllm.* holds a 'mmllm' model, not a contrastive"):
        build_mmllm(MMLLMRecipeConfig(vision_from=str(tmp_path / "mmllm")))
    with pytest.raises(ValueError, match="image_preset"):
        MMLLMConfig(image_preset="imagenet")


def test_image_position_lora_keeps_every_text_answer_and_stays_in_the_checkpoint(tmp_path, capsys):
    """lora.image_tokens_only: the adapters train (at a high learning rate) yet every text-only
    answer is the base model's; the final checkpoint keeps them unmerged and loads."""
    from polymodal.nn.lora import lora_parameters

    align, instruct = tmp_path / "align", tmp_path / "instruct"
    assert main(["train", str(CONFIGS / "tiny_align.yaml"), f"train.out_dir={align}", "train.steps=2"]) == 0
    assert main(["train", str(CONFIGS / "tiny_instruct.yaml"), f"train.out_dir={instruct}", f"init_from={align / 'final'}",
                 "text_retention=true", "train.steps=4", "lora.image_tokens_only=true"]) == 0
    assert "at image positions only" in capsys.readouterr().out
    report = json.loads((instruct / "retention.json").read_text())
    assert report["unchanged"] == report["total"] == 8
    model, _ = polymodal.load(instruct / "final")
    assert model.config.image_lora.rank == 4 and model.config.image_lora.image_tokens_only
    assert any(p.abs().sum() > 0 for p in lora_parameters(model.lm)[1::2])  # the B matrices moved off zero
    assert main(["train", str(CONFIGS / "tiny_instruct.yaml"), f"train.out_dir={tmp_path / 'again'}",
                 f"init_from={instruct / 'final'}", "train.steps=1"]) != 0  # plain LoRA on top: refused, named
    assert "image_tokens_only" in capsys.readouterr().err
