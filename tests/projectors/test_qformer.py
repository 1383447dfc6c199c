"""QFormerProjector: shapes, gradients, cross-attention placement, the instruction-aware variant, MultimodalLM use."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from polymodal.backbones.decoder import shift_labels
from polymodal.models.mmllm import MultimodalLM, mmllm_tiny
from polymodal.projectors import ProjectorConfig, build_projector
from polymodal.projectors.qformer import QFormerProjector
from polymodal.train.objectives import token_cross_entropy

VISION_DIM, LM_DIM = 24, 40


def _config(**overrides) -> ProjectorConfig:
    base = dict(kind="qformer", num_queries=4, num_layers=3, num_heads=4, hidden_size=32, intermediate_size=48,
                cross_attention_every=2, layer_norm_eps=1e-12)
    return ProjectorConfig(**{**base, **overrides})


def _instruct_config() -> ProjectorConfig:
    return _config(instruction_aware=True, text_vocab_size=50, max_text_positions=8)


def _features(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 17, VISION_DIM, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_cross_attention_every_kth_layer():
    proj = build_projector(_config(), VISION_DIM, LM_DIM)
    assert isinstance(proj, QFormerProjector)
    assert proj.num_tokens(17) == proj.num_tokens(257) == 4
    assert [layer.cross_attn is not None for layer in proj.layers] == [True, False, True]
    assert all(layer.text_mlp is None for layer in proj.layers)
    out = proj(_features())
    assert out.shape == (2, 4, LM_DIM)
    # Each image is read through cross-attention: other features give other embeddings.
    assert not torch.allclose(out, proj(_features(seed=1)))


def test_gradients_reach_every_parameter():
    proj = build_projector(_config(), VISION_DIM, LM_DIM)
    features = _features().requires_grad_()
    proj(features).square().mean().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    for name, p in proj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_instruction_aware_shapes_gradients_and_padding():
    proj = build_projector(_instruct_config(), VISION_DIM, LM_DIM)
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    out = proj(_features(), qformer_input_ids=ids, qformer_attention_mask=mask)
    assert out.shape == (2, 4, LM_DIM)
    out.square().mean().backward()
    for name, p in proj.named_parameters():
        assert p.grad is not None, name
    # Only the 5 used ids / positions receive gradient; the instruction changes the queries.
    assert proj.text_embed.weight.grad[ids.unique()].abs().sum() > 0
    assert proj.text_pos.weight.grad[5:].abs().sum() == 0
    with torch.no_grad():
        other = ids.clone()
        other[0, 0] = (ids[0, 0] + 1) % 50
        assert not torch.allclose(proj(_features(), qformer_input_ids=other, qformer_attention_mask=mask)[0], out[0])
        # A padded (mask 0) instruction token is never attended to: its id cannot matter.
        padded = ids.clone()
        padded[1, 4] = (ids[1, 4] + 7) % 50
        again = proj(_features(), qformer_input_ids=padded, qformer_attention_mask=mask)
        assert torch.allclose(again, out, atol=1e-6)


def test_instruction_inputs_are_checked():
    plain = build_projector(_config(), VISION_DIM, LM_DIM)
    instruct = build_projector(_instruct_config(), VISION_DIM, LM_DIM)
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="not instruction_aware"):
        plain(_features(), qformer_input_ids=ids)
    with pytest.raises(ValueError, match="needs qformer_input_ids"):
        instruct(_features())
    with pytest.raises(ValueError, match="3 rows for 2 images"):
        instruct(_features(), qformer_input_ids=torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_text_positions"):
        instruct(_features(), qformer_input_ids=torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="text_vocab_size"):
        build_projector(_config(instruction_aware=True), VISION_DIM, LM_DIM)
    with pytest.raises(ValueError, match="num_heads"):
        build_projector(_config(hidden_size=30), VISION_DIM, LM_DIM)


def test_multimodal_lm_with_qformer_projector():
    base = mmllm_tiny()
    config = dataclasses.replace(base, projector=_config(), vision_feature_layer=-1, drop_class_token=False)
    torch.manual_seed(0)
    model = MultimodalLM(config)
    assert model.image_tokens == 4
    ids = torch.randint(0, config.lm.vocab_size - 1, (2, 10))
    ids[:, 3:7] = config.image_token_id
    pixels = torch.randn(2, 3, config.vision.image_size, config.vision.image_size)
    out = model(ids, pixels)
    assert out.logits.shape == (2, 10, config.lm.vocab_size)
    token_cross_entropy(out.logits, shift_labels(ids)).backward()
    assert model.projector.query_tokens.grad.abs().sum() > 0
    assert model.vision.patch_embed.proj.weight.grad.abs().sum() > 0
