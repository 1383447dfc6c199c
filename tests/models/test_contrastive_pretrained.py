"""The `clip` family with pretrained towers: EfficientNet-Lite0 image tower and the LiT (locked MiniLM) recipe."""
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import BertModel

from polymodal.assets import efficientnet_lite0_pth_path, minilm_dir
from polymodal.checkpoint import CheckpointMismatchError
from polymodal.config import load_config
from polymodal.encoders.efficientnet import EfficientNetConfig
from polymodal.interop.efficientnet_pth import load_efficientnet_pth, read_pth_state_dict
from polymodal.data.dual_encoder import pixels_from_uint8
from polymodal.encoders.efficientnet import EfficientNetTower
from polymodal.encoders.table import ENCODERS
from polymodal.models.contrastive import ContrastiveModel, clip_tiny
from polymodal.recipes.clip import ClipRecipeConfig, build_clip_and_tokenizer, clip_batches, load_image_tower
from polymodal.train.objectives import contrastive_loss

LIT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "clip" / "fashion_mnist_lit.yaml"
TINY_EFFICIENTNET = EfficientNetConfig(stages=[[1, 3, 1, 8, 8, 1], [6, 3, 2, 8, 16, 2]], stem_channels=8,
                                       head_channels=24, image_size=32, num_classes=0)


def _pixels(n: int, channels: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return pixels_from_uint8(torch.randint(0, 256, (n, size, size, channels), generator=g, dtype=torch.uint8)
                             .squeeze(-1).numpy())


def test_tiny_efficientnet_tower_trains_on_grayscale_28px():
    config = dataclasses.replace(clip_tiny(), image_tower="efficientnet_lite0", efficientnet=TINY_EFFICIENTNET)
    model = ContrastiveModel(config).train()
    assert "efficientnet_lite0" in ENCODERS and isinstance(model.vision_model, EfficientNetTower)
    assert model.vision_model.classifier is None and model.visual_projection.in_features == 24
    assert config.image_size == 32
    ids = torch.randint(3, 126, (4, 8))
    ids[:, -1] = config.text.eos_token_id
    pixels = _pixels(4, 1, 28)  # Fashion-MNIST-like: 1 channel, resized to the tower's 32 px inside
    loss = contrastive_loss(model, {"pixel_values": pixels, "input_ids": ids})
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.vision_model.parameters())
    assert model.encode_image(pixels).shape == (4, 32)


def test_efficientnet_tower_rejects_a_classifier():
    options = dataclasses.replace(TINY_EFFICIENTNET, num_classes=10)
    with pytest.raises(ValueError, match="num_classes"):
        ContrastiveModel(dataclasses.replace(clip_tiny(), image_tower="efficientnet_lite0", efficientnet=options))


def test_pretrained_efficientnet_loads_and_matches_its_own_preprocessing():
    config = dataclasses.replace(clip_tiny(), image_tower="efficientnet_lite0", freeze_image=True)
    model = ContrastiveModel(config)
    load_image_tower(model, "efficientnet-lite0")  # strict: raises on any missing / unexpected / mis-shaped tensor
    tensors = read_pth_state_dict(efficientnet_lite0_pth_path())
    torch.testing.assert_close(model.vision_model.stem.conv.weight, tensors["_conv_stem.weight"])
    torch.testing.assert_close(model.vision_model.head.norm.running_var, tensors["_bn1.running_var"])
    reference = load_efficientnet_pth(efficientnet_lite0_pth_path(), EfficientNetConfig(num_classes=0))
    pixels = _pixels(2, 3, 224)  # the family's [-1, 1] pixels
    model.train()  # the frozen tower stays in eval mode: BatchNorm uses the ImageNet statistics
    assert not model.vision_model.training
    with torch.no_grad():
        want = reference(reference.normalize((pixels + 1) / 2)).pooler_output  # (x - 127) / 128 of 0..255
        torch.testing.assert_close(model.vision_model(pixels).pooler_output, want, atol=1e-5, rtol=1e-5)
        gray = pixels[:, :1]
        torch.testing.assert_close(model.vision_model(gray).pooler_output,
                                   reference(reference.normalize((gray.expand(-1, 3, -1, -1) + 1) / 2)).pooler_output,
                                   atol=1e-5, rtol=1e-5)
    ids = torch.randint(3, 126, (2, 6))
    ids[:, -1] = config.text.eos_token_id
    contrastive_loss(model, {"pixel_values": pixels, "input_ids": ids}).backward()
    assert all(p.grad is None for p in model.vision_model.parameters())
    assert model.visual_projection.weight.grad is not None


def test_image_init_from_needs_the_efficientnet_tower_and_matching_sizes():
    with pytest.raises(ValueError, match="image_init_from"):
        load_image_tower(ContrastiveModel(clip_tiny()), "efficientnet-lite0")
    small = ContrastiveModel(dataclasses.replace(clip_tiny(), image_tower="efficientnet_lite0",
                                                 efficientnet=TINY_EFFICIENTNET))
    with pytest.raises(CheckpointMismatchError):
        load_image_tower(small, "efficientnet-lite0")


def test_lit_config_locks_the_real_minilm_tower():
    config = load_config(ClipRecipeConfig, LIT_CONFIG, ["data.batch_size=32"])
    assert config.text_init_from == "minilm" and config.model.freeze_text
    model, tokenizer = build_clip_and_tokenizer(config)
    batch = clip_batches(config, tokenizer).batch_fn(0)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert len(torch.unique(ids, dim=0)) < len(ids)  # template captions repeat: the frozen tower dedupes them
    hf = BertModel.from_pretrained(minilm_dir()).eval()
    with torch.no_grad():
        hidden = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        want = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # sentence-transformers mean pooling
        torch.testing.assert_close(model.text_model(ids, attention_mask=mask).pooler_output, want,
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.encode_text(ids, mask), model.text_projection(want), atol=1e-4, rtol=1e-4)
    text_before = {n: t.clone() for n, t in model.text_model.state_dict().items()}
    image_before = [p.detach().clone() for p in model.vision_model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    assert not model.text_model.training
    loss = contrastive_loss(model, batch)
    loss.backward()
    assert all(p.grad is None for p in model.text_model.parameters())
    optimizer.step()
    for name, tensor in model.text_model.state_dict().items():
        assert torch.equal(tensor, text_before[name]), name
    assert all(not torch.equal(p, before) for p, before in zip(model.vision_model.parameters(), image_before))
    assert model.text_projection.weight.grad is not None
    assert F.normalize(model.encode_text(ids, mask), dim=-1).shape == (32, config.model.embed_dim)
