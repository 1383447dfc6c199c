"""Projectors linear / mlp / resampler: output shapes, token counts and gradients."""
import pytest
import torch

from polymodal.projectors import ProjectorConfig, build_projector
from polymodal.projectors.resampler import sincos_2d


@pytest.mark.parametrize("config, tokens", [
    (ProjectorConfig(kind="linear"), 16),
    (ProjectorConfig(kind="mlp", mlp_depth=2), 16),
    (ProjectorConfig(kind="resampler", num_queries=5, num_heads=4), 5),
    (ProjectorConfig(kind="resampler", num_queries=3, num_heads=2, num_layers=2, hidden_size=32), 3),
])
def test_projector_shapes_and_gradients(config, tokens):
    torch.manual_seed(0)
    projector = build_projector(config, vision_dim=24, lm_dim=40)
    features = torch.randn(3, 16, 24, requires_grad=True)
    out = projector(features)
    assert out.shape == (3, tokens, 40) and projector.num_tokens(16) == tokens
    out.square().mean().backward()
    assert features.grad.abs().sum() > 0
    for name, param in projector.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    # each image is projected on its own: image 0's output ignores image 1's features
    alone = projector(features[:1].detach())
    torch.testing.assert_close(alone, out[:1].detach(), atol=1e-5, rtol=1e-5)


def test_resampler_keys_carry_positions():
    """Permuting the patches changes the output (keys know where each patch sits)."""
    torch.manual_seed(0)
    projector = build_projector(ProjectorConfig(kind="resampler", num_queries=4, num_heads=2), 8, 8)
    features = torch.randn(1, 9, 8)
    moved = features[:, torch.randperm(9, generator=torch.Generator().manual_seed(1))]
    assert not torch.allclose(projector(features), projector(moved), atol=1e-4)


def test_sincos_2d_layout_and_errors():
    table = sincos_2d(2, 3, 8)
    assert table.shape == (6, 8)
    # row channels (first half) equal within a row; column channels equal within a column
    torch.testing.assert_close(table[0, :4], table[2, :4])
    torch.testing.assert_close(table[1, 4:], table[4, 4:])
    assert not torch.allclose(table[0, :4], table[3, :4])
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_2d(2, 2, 6)
    projector = build_projector(ProjectorConfig(kind="resampler", num_queries=2, num_heads=2), 8, 8)
    with pytest.raises(ValueError, match="square patch grid"):
        projector(torch.randn(1, 10, 8))
