"""Every registered family: build its tiny model, forward/backward, checkpoint round trip."""
import pytest
import torch

from polymodal.checkpoint import load_checkpoint, save_checkpoint
from polymodal.models.registry import get_family, list_families


def _output_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    for name in ("loss", "logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise AssertionError(f"cannot find a tensor in {type(out).__name__}")


@pytest.mark.parametrize("name", list_families())
def test_family_tiny_forward_backward_and_checkpoint_round_trip(name, tmp_path):
    family = get_family(name)
    torch.manual_seed(0)
    model = family.build(family.tiny())
    batch = family.example_batch(model)
    out = _output_tensor(model(**batch))
    assert torch.isfinite(out).all()
    out.float().pow(2).mean().backward() if out.dim() else out.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)

    model.eval()
    save_checkpoint(model, tmp_path / "ckpt")
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert type(loaded) is type(model) and loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(_output_tensor(loaded.eval()(**batch)), _output_tensor(model(**batch)))


def test_unknown_family_error_lists_known_ones():
    with pytest.raises(KeyError, match="known"):
        get_family("no-such-family")
