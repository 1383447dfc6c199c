"""Grounding: box text <-> pixel boxes, IoU, the world's grounding chats, their scoring, any projector, the recipe."""
import json
import random
from pathlib import Path

import pytest
import torch

from polymodal.cli import main
from polymodal.data.boxes import box_iou, box_to_text, boxes_in_text, refs_in_text
from polymodal.data.chat_documents import world_documents
from polymodal.data.conversation import ImageProcessor
from polymodal.data.world import Scene, World, WorldObject, world_tokenizer
from polymodal.data.world.grounding import (
    grounding_conversation,
    grounding_questions,
    referring_name,
)
from polymodal.eval.grounding import (
    grounding_prompts,
    match_grounded_caption,
    score_grounding,
)
from polymodal.models.mmllm import MultimodalLM, mmllm_tiny_for
from polymodal.projectors import ProjectorConfig
from polymodal.recipes.mmllm import MMLLMDataConfig
from polymodal.sequence import pack_documents
from polymodal.train.objectives import sequence_loss

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("size", [16, 32, 64, 96, 224, 999])
def test_box_text_round_trips_to_pixel_boxes(size):
    rng = random.Random(size)
    for _ in range(200):
        x0, y0 = rng.randrange(size), rng.randrange(size)
        box = (x0, y0, rng.randint(x0 + 1, size), rng.randint(y0 + 1, size))
        text = box_to_text(box, size, size)
        assert boxes_in_text(f"it is {text}.", size, size) == [box]


def test_box_text_follows_the_qwen_vl_convention():
    # Corners are the first and last pixel, normalised by floor(1000 p / size).
    assert box_to_text((0, 0, 64, 64), 64, 64) == "<box>(0,0),(984,984)</box>"
    assert box_to_text((10, 20, 11, 40), 100, 200) == "<box>(100,100),(100,195)</box>"
    with pytest.raises(ValueError, match="empty or outside"):
        box_to_text((5, 5, 5, 9), 64, 64)
    with pytest.raises(ValueError, match="empty or outside"):
        box_to_text((0, 0, 65, 9), 64, 64)


def test_box_parsing_reads_replies_as_models_write_them():
    text = "<box>( 500 , 10 ),(100,990)</box> junk <box>(1,2),(3</box> <ref>a red star</ref> <box>(0,0),(999,999)</box>"
    boxes = boxes_in_text(text, 100, 100)
    assert boxes == [(10, 1, 51, 100), (0, 0, 100, 100)]  # reversed corners put in order; the cut-off box skipped
    assert refs_in_text(text, 100, 100) == [("a red star", (0, 0, 100, 100))]
    assert boxes_in_text("<box>(0,0),(5000,5000)</box>", 10, 10) == [(0, 0, 10, 10)]  # past the scale: the last pixel
    assert boxes_in_text("no box here", 10, 10) == []


def test_iou_cases():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges share no pixel
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (0, 0, 5, 10)) == pytest.approx(0.5)  # contained: half the area
    assert box_iou((0, 0, 10, 10), (2, 2, 8, 8)) == pytest.approx(36 / 100)
    assert box_iou((3, 3, 3, 3), (3, 3, 3, 3)) == 0.0  # empty boxes
    assert box_iou((0, 0, 4, 4), (2, 2, 6, 6)) == box_iou((2, 2, 6, 6), (0, 0, 4, 4)) == pytest.approx(4 / 28)


def _scene(objects, size=64):
    return Scene(tuple(objects), "plain", (200, 200, 200), 0, 0.0, 0.0, 0.0, 0, "val", 7, size)


def test_world_grounding_questions_carry_the_scene_boxes():
    scene = World("val", image_size=64, num_objects=(2, 3))[5]
    qas = grounding_questions(scene)
    boxes = scene.boxes()
    refer = [qa for qa in qas if qa.task == "refer"]
    assert refer and all(boxes_in_text(qa.answer, 64, 64) == [boxes[qa.obj]] for qa in refer)
    assert all("<ref>the " in qa.question for qa in refer)
    region = [qa for qa in qas if qa.task == "region"]
    assert [boxes_in_text(qa.question, 64, 64)[0] for qa in region] == boxes
    caption = qas[-1]
    assert caption.task == "caption"
    assert [box for _, box in refs_in_text(caption.answer, 64, 64)] == boxes
    chat = grounding_conversation(scene, turns=2)
    assert chat[0]["content"].startswith("<image>\n") and len(chat) == 4

    twin = {"shape": "star", "color": "red", "size": "small", "center": (0.2, 0.2)}
    ambiguous = _scene([WorldObject(cell=(0, 0), **twin), WorldObject(**{**twin, "center": (0.8, 0.8)}, cell=(2, 2)),
                        WorldObject("circle", "blue", "large", (1, 1), (0.5, 0.5))])
    assert referring_name(ambiguous, 0) is None and referring_name(ambiguous, 2) == "large blue circle"
    assert [qa.obj for qa in grounding_questions(ambiguous) if qa.task == "refer"] == [2]


def test_scoring_gives_full_marks_to_the_true_answers_and_none_to_shifted_boxes():
    scenes = list(World("test", image_size=64, num_objects=(1, 3)).scenes(6))
    asked = grounding_prompts(scenes)
    truth = {task: [answer for _, _, answer, _ in items] for task, items in asked.items()}
    perfect = score_grounding(scenes, asked, truth)
    assert perfect["refer_iou50"] == perfect["region_acc"] == perfect["caption_recall"] == 1.0
    assert perfect["caption_precision"] == perfect["refer_miou"] == 1.0
    assert {f"refer_iou50_{k}obj" for k in {len(s.objects) for s in scenes}} <= set(perfect)

    def shifted(text: str) -> str:  # every box moved right by half the image
        out = text
        for box in boxes_in_text(text, 64, 64):
            out = out.replace(box_to_text(box, 64, 64), box_to_text((32, box[1], 64, box[3]), 64, 64) if box[0] < 16
                              else box_to_text((0, box[1], 8, box[3]), 64, 64))
        return out

    wrong = {task: [shifted(a) for a in answers] for task, answers in truth.items()}
    wrong["region"] = ["a purple blob"] * len(truth["region"])
    bad = score_grounding(scenes, asked, wrong)
    assert bad["refer_iou50"] == bad["region_acc"] == bad["caption_recall"] == 0.0


def test_grounded_caption_pairs_match_each_object_once():
    truth = [("small red star", (0, 0, 10, 10)), ("large blue circle", (20, 20, 40, 40))]
    star = "<ref>a small red star</ref>" + box_to_text((0, 0, 10, 10), 64, 64)
    circle = "<ref>a large blue circle</ref>" + box_to_text((20, 20, 40, 40), 64, 64)
    assert match_grounded_caption(f"{star} and {circle}", truth, 64) == (2, 2)
    assert match_grounded_caption(f"{star}, {star} and {circle}", truth, 64) == (2, 3)  # a repeat matches nothing
    assert match_grounded_caption(circle.replace("blue", "red"), truth, 64) == (0, 1)  # right box, wrong words
    assert match_grounded_caption("a small red star", truth, 64) == (0, 0)


@pytest.mark.parametrize("projector", [ProjectorConfig(kind="mlp"),
                                       ProjectorConfig(kind="resampler", num_queries=4, num_heads=4),
                                       ProjectorConfig(kind="qformer", num_queries=4, num_layers=1, num_heads=4)])
def test_grounding_chats_train_any_projector(projector):
    tokenizer = world_tokenizer()
    config = mmllm_tiny_for(tokenizer)
    config.projector = projector
    torch.manual_seed(0)
    model = MultimodalLM(config)
    world = World("train", image_size=config.image_size, num_objects=(1, 3))
    document = world_documents("instruct", tokenizer, ImageProcessor.for_model(config), world, config.image_token_id,
                               model.image_tokens, turns=2, caption_styles=["short"], grounding=1.0)
    docs = [document(i) for i in range(4)]
    text = tokenizer.decode(torch.cat([s.tokens for d in docs for s in d.segments if s.modality == "text"]).tolist())
    assert text.count("<box>(") >= 4
    loss = sequence_loss(model, pack_documents(docs, 1024))
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0
                                        for p in model.projector.parameters())
    with pytest.raises(ValueError, match="grounding"):
        MMLLMDataConfig(grounding=1.5)


def test_tiny_grounding_recipe_trains_and_evaluates_through_polymodal_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(ROOT / "configs/fusion/grounding_tiny.yaml"), f"train.out_dir={out}"]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    capsys.readouterr()
    assert main(["eval", str(out / "final"), "--data", "grounding", "--n", "3", "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert {"refer_iou50", "refer_miou", "region_acc", "caption_recall", "caption_precision"} <= set(metrics)
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert main(["eval", str(out / "final"), "--data", "coco", "--n", "3"]) == 2
    assert "one of ('world', 'grounding', 'reasoning')" in capsys.readouterr().err
