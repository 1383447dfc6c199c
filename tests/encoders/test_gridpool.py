"""The grid-pooled conv tower: one token per grid cell, the same wherever an object sits in its cell."""
import pytest
import torch

from polymodal.encoders.gridpool import GridPoolConfig, GridPoolConvNet


def _square_at(top: int, left: int, size: int = 48, side: int = 8) -> torch.Tensor:
    """(1, 3, size, size): a plain gray image holding one colored square."""
    image = torch.full((1, 3, size, size), 0.2)
    image[0, :, top:top + side, left:left + side] = torch.tensor([0.9, -0.5, 0.1]).view(3, 1, 1)
    return image


def test_one_token_per_cell_at_any_resolution_with_unit_norm_zero_mean_filters():
    torch.manual_seed(0)
    tower = GridPoolConvNet(GridPoolConfig(image_size=48, filters=8, kernel_size=5, stride=2, grid=3))
    out = tower(torch.randn(2, 3, 48, 48))
    assert out.last_hidden_state.shape == (2, 9, 16) and out.pooler_output.shape == (2, 16)
    assert tower(torch.randn(1, 3, 72, 72)).last_hidden_state.shape == (1, 9, 16)
    weight = tower.conv.weight.flatten(1)
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(8))
    torch.testing.assert_close(weight.mean(dim=1), torch.zeros(8), atol=1e-6, rtol=0)


def test_a_shift_inside_the_cell_leaves_every_token_unchanged_and_a_move_to_another_cell_does_not():
    torch.manual_seed(0)
    tower = GridPoolConvNet(GridPoolConfig(image_size=48, filters=16, kernel_size=5, stride=2, grid=3)).eval()
    with torch.no_grad():
        here = tower(_square_at(4, 4)).last_hidden_state
        shifted = tower(_square_at(6, 4)).last_hidden_state  # one stride down, still inside cell (0, 0)
        elsewhere = tower(_square_at(20, 4)).last_hidden_state  # cell (1, 0)
    torch.testing.assert_close(shifted, here)
    assert (elsewhere[0, 0] - here[0, 0]).abs().max() > 0.1 and (elsewhere[0, 3] - here[0, 3]).abs().max() > 0.1


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="GridPoolConfig.filters must be positive"):
        GridPoolConfig(filters=0)
    with pytest.raises(ValueError, match="8 px image gives a 2 x 2 feature map at stride 4, smaller than the 3 x 3 grid"):
        GridPoolConfig(image_size=8, kernel_size=3, stride=4, grid=3)


def test_an_empty_cell_is_silent_and_an_object_is_not():
    """No norm on the tokens: a flat cell gives a zero token (zero-mean filters), so presence shows as length."""
    torch.manual_seed(0)
    tower = GridPoolConvNet(GridPoolConfig(image_size=48, filters=16, kernel_size=5, stride=2, grid=3)).eval()
    with torch.no_grad():
        empty = tower(torch.full((1, 3, 48, 48), 0.2)).last_hidden_state[0, 4]  # the center cell, away from the padding
        full = tower(_square_at(20, 20)).last_hidden_state[0, 4]
    torch.testing.assert_close(empty, torch.zeros(32), atol=1e-6, rtol=0)
    assert full.norm() > 1.0
