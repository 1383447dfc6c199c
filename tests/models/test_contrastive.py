"""The `clip` family: encode APIs, SigLIP / CoCa / LiT / patch-dropout options, parity with transformers."""
import dataclasses
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from polymodal.encoders.convnet import ConvNetConfig
from polymodal.encoders.bert import BertConfig
from polymodal.encoders.table import ENCODERS
from polymodal.models.contrastive import ContrastiveConfig, ContrastiveModel, clip_tiny
from polymodal.models.registry import get_family
from polymodal.train.objectives import caption_loss, contrastive_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_clip  # noqa: E402  (benchmarks/ is a script folder, not a package)


def _batch(config: ContrastiveConfig, n: int = 4) -> dict:
    torch.manual_seed(1)
    ids = torch.randint(3, config.text.vocab_size - 1, (n, 8))
    ids[:, -1] = config.text.eos_token_id
    size = config.cnn.image_size if config.image_tower == "cnn" else config.vision.image_size
    return {"pixel_values": torch.randn(n, 3, size, size), "input_ids": ids}


def test_registered_and_encode_shapes():
    assert get_family("clip").config_cls is ContrastiveConfig
    image = {n for n, spec in ENCODERS.items() if spec.modality == "image" and spec.pooled}
    text = {n for n, spec in ENCODERS.items() if spec.modality == "text" and spec.pooled}
    assert {"vit", "cnn"} <= image and {"transformer", "bert"} <= text
    model = ContrastiveModel(clip_tiny()).eval()
    batch = _batch(model.config)
    image, text = model.encode_image(batch["pixel_values"]), model.encode_text(batch["input_ids"])
    assert image.shape == text.shape == (4, 32)
    out = model(**batch)
    expected = model.scale() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    torch.testing.assert_close(out.logits_per_image, expected)
    # The scale itself, from the raw parameter: CLIP's exp(log(1 / 0.07)) = 1 / 0.07 at init.
    torch.testing.assert_close(model.scale(), torch.tensor(1 / 0.07))
    torch.testing.assert_close(model.similarity(batch["pixel_values"], batch["input_ids"]), expected)
    probs = model.zero_shot_classify(batch["pixel_values"], batch["input_ids"])
    torch.testing.assert_close(probs.sum(1), torch.ones(4))


def test_encode_matches_transformers_clip_features():
    config = bench_clip.bench_config(quick=True)
    torch.manual_seed(0)
    ours = ContrastiveModel(config).eval()
    hf = bench_clip.to_hf_clip(ours).eval()
    batch = bench_clip.make_batch(config, 3)
    with torch.no_grad():
        want = hf(**batch)
        hf_image = hf.visual_projection(hf.vision_model(batch["pixel_values"]).pooler_output)  # get_image_features
        torch.testing.assert_close(ours.encode_image(batch["pixel_values"]), hf_image, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(F.normalize(ours.encode_image(batch["pixel_values"]), dim=-1), want.image_embeds,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(F.normalize(ours.encode_text(batch["input_ids"], batch["attention_mask"]), dim=-1),
                                   want.text_embeds, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(**batch).logits_per_image, want.logits_per_image, atol=1e-4, rtol=1e-4)


def test_pooled_only_vit_path_equals_full_forward():
    from polymodal.models.contrastive import vit_features

    model = ContrastiveModel(clip_tiny()).eval()
    pixels = _batch(model.config)["pixel_values"]
    full = model.vision_model(pixels).pooler_output
    torch.testing.assert_close(vit_features(model.vision_model, pixels, pooled_only=True).pooler_output, full,
                               atol=1e-5, rtol=1e-5)


def test_siglip_loss_uses_bias_and_coca_adds_caption_loss():
    siglip = ContrastiveModel(dataclasses.replace(clip_tiny(), loss="siglip"))
    batch = _batch(siglip.config)
    contrastive_loss(siglip, batch).backward()
    assert siglip.logit_bias.grad is not None and siglip.logit_bias.grad.abs() > 0
    coca = ContrastiveModel(dataclasses.replace(clip_tiny(), caption_layers=1))
    optimizer = torch.optim.AdamW(coca.parameters(), lr=3e-3)
    losses = []
    def captioning(captions):
        return caption_loss(coca(**batch, captions=captions).caption_logits, captions, None)

    for _ in range(8):
        out = coca(**batch)
        loss = contrastive_loss(coca, batch)
        assert out.caption_logits is not None and torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(captioning(batch["input_ids"]).item())
    assert losses[-1] < losses[0]
    assert not torch.isclose(captioning(batch["input_ids"].flip(0)), captioning(batch["input_ids"]))


def test_coca_needs_causal_text_tower():
    config = dataclasses.replace(clip_tiny(), caption_layers=1)
    config.text.causal = False
    with pytest.raises(ValueError, match="caption_layers"):
        ContrastiveModel(config)


def test_freeze_text_and_patch_dropout():
    model = ContrastiveModel(dataclasses.replace(clip_tiny(), freeze_text=True, patch_dropout=0.5)).train()
    assert not model.text_model.training and model.vision_model.training
    batch = _batch(model.config)
    contrastive_loss(model, batch).backward()
    assert all(p.grad is None for p in model.text_model.parameters())
    assert model.text_projection.weight.grad is not None
    model.eval()  # no dropout at evaluation: deterministic features
    torch.testing.assert_close(model.encode_image(batch["pixel_values"]), model.encode_image(batch["pixel_values"]))
    # ... and every patch is kept: the features equal the ViT's own full forward (its own token
    # assembly, every token through every layer, no patch dropout code) and the projection.
    with torch.no_grad():
        full = model.visual_projection(model.vision_model(batch["pixel_values"]).pooler_output)
        torch.testing.assert_close(model.encode_image(batch["pixel_values"]), full, atol=1e-5, rtol=1e-5)
    model.train()
    torch.manual_seed(0)
    a = model.encode_image(batch["pixel_values"])
    torch.manual_seed(1)
    assert not torch.allclose(a, model.encode_image(batch["pixel_values"]))


def test_cnn_tower():
    config = dataclasses.replace(clip_tiny(), image_tower="cnn", cnn=ConvNetConfig(image_size=28, widths=[16, 32],
                                                                                  pool="flatten"))
    assert config.cnn.grid == 7
    model = ContrastiveModel(config)
    contrastive_loss(model, _batch(config)).backward()
    assert model.encode_image(_batch(config)["pixel_values"]).shape == (4, 32)


def test_bad_tower_name_is_named():
    with pytest.raises(ValueError, match="image_tower"):
        ContrastiveModel(dataclasses.replace(clip_tiny(), image_tower="resnet"))


def test_lit_bert_text_tower_frozen():
    options = dict(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                   max_position_embeddings=16)
    config = dataclasses.replace(clip_tiny(), text_tower="bert", bert=BertConfig(**options), freeze_text=True)
    model = ContrastiveModel(config).train()
    batch = _batch(config)
    batch["input_ids"] = batch["input_ids"] % 64
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    contrastive_loss(model, batch).backward()
    assert all(p.grad is None for p in model.text_model.parameters())
    assert model.visual_projection.weight.grad is not None and model.text_projection.weight.grad is not None
    assert model.encode_text(batch["input_ids"], batch["attention_mask"]).shape == (4, 32)
