"""Recipe `clip` through the CLI: the tiny config trains, loads and evaluates; a locked pretrained tower stays put."""
import json
from pathlib import Path

import torch

from polymodal.checkpoint import load_checkpoint
from polymodal.cli import main
from polymodal.eval.contrastive import world_retrieval, world_zero_shot

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "clip" / "tiny.yaml"


def test_tiny_clip_recipe_trains_and_evaluates(tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(CONFIG), f"train.out_dir={out}", "train.steps=24", "train.log_every=1"]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 24 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.2
    model, tokenizer = load_checkpoint(out / "checkpoints" / "step-0000024")
    assert model.family == "clip" and model.config.text.eos_token_id == tokenizer.eos_token_id
    zero_shot = world_zero_shot(model, tokenizer, "val", n=8)
    assert set(zero_shot) == {"zero_shot_color", "zero_shot_shape", "zero_shot_position"}
    retrieval = world_retrieval(model, tokenizer, "val", n=8)
    assert 0.0 <= retrieval["t2i_R@1"] <= retrieval["t2i_R@5"] <= 1.0


def test_locked_efficientnet_recipe_keeps_the_imagenet_weights(tmp_path):
    from polymodal.assets import efficientnet_lite0_pth_path
    from polymodal.interop.efficientnet_pth import read_pth_state_dict

    config = CONFIG.parent / "fashion_mnist_efficientnet.yaml"
    out = tmp_path / "run"
    assert main(["train", str(config), f"train.out_dir={out}", "train.steps=3", "data.batch_size=16",
                 "model.efficientnet.image_size=32", "eval_n=64"]) == 0
    metrics = json.loads((out / "eval.json").read_text())
    assert 0.0 <= metrics["zero_shot_top1"] <= metrics["zero_shot_top5"] <= 1.0
    model, _ = load_checkpoint(out / "checkpoints" / "step-0000003")
    tensors = read_pth_state_dict(efficientnet_lite0_pth_path())
    assert model.config.freeze_image and model.config.efficientnet.image_size == 32
    assert torch.equal(model.vision_model.blocks[3].depthwise.conv.weight, tensors["_blocks.3._depthwise_conv.weight"])
    assert torch.equal(model.vision_model.head.norm.running_mean, tensors["_bn1.running_mean"])


def test_world_pairs_with_several_objects_and_any_caption_style():
    """`num_objects` and the grounded / located styles: every caption names each of its scene's
    objects, and batch i is the same on every call (runs resume exactly)."""
    import pytest

    from polymodal.data.world import world_tokenizer
    from polymodal.recipes.clip import ClipDataConfig, WorldPairs

    tokenizer = world_tokenizer()
    pairs = WorldPairs(tokenizer, 16, 48, 64, styles=("grounded", "located"), num_objects=(2, 3))
    batch = pairs(3)
    assert batch["pixel_values"].shape == (16, 3, 48, 48)
    scenes = list(pairs.world.scenes(16, start=3 * 16))
    assert all(len(s.objects) >= 2 for s in scenes)
    for scene, ids, mask in zip(scenes, batch["input_ids"], batch["attention_mask"]):
        text = tokenizer.decode(ids[mask.bool()].tolist()[:-1])  # the eos is last
        assert all(f"{o.color} {o.shape}" in text for o in scene.objects), text
    assert torch.equal(pairs(3)["input_ids"], batch["input_ids"])
    with pytest.raises(ValueError, match="caption_styles"):
        WorldPairs(tokenizer, 16, 48, 64, styles=("poem",))
    assert ClipDataConfig(num_objects=(1, 3)).num_objects == (1, 3)
