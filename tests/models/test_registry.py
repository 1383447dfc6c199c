"""Every registered family: build its tiny model, one objective step, checkpoint round trip, on `meta` too."""
import pytest
import torch

from polymodal.checkpoint import load_checkpoint, save_checkpoint
from polymodal.models.registry import TASKS, get_family, list_families, resolve


def _output_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise AssertionError(f"cannot find a tensor in {type(out).__name__}")


def _score(family, model, batch) -> torch.Tensor:
    """The family's objective on the batch, or (a tower without one) the mean square of its output.
    Seeded: a diffusion objective draws its timesteps and noise, a VAE its posterior sample."""
    torch.manual_seed(1)
    if family.objective is not None:
        return resolve(family.objective)(model, batch)
    return _output_tensor(model(**batch)).float().pow(2).mean()


@pytest.mark.parametrize("name", list_families())
def test_family_tiny_objective_step_and_checkpoint_round_trip(name, tmp_path):
    family = get_family(name)
    assert set(family.tasks) <= set(TASKS)
    torch.manual_seed(0)
    model = family.build(family.tiny())
    batch = family.example_batch(model)
    loss = _score(family, model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)

    model.eval()
    save_checkpoint(model, tmp_path / "ckpt")
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert type(loaded) is type(model) and loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(_score(family, loaded.eval(), batch), _score(family, model, batch))


@pytest.mark.parametrize("name", list_families())
def test_family_builds_on_the_meta_device(name):
    """Loading validates shapes on a `meta` build before allocating: every builder must allow it."""
    family = get_family(name)
    with torch.device("meta"):
        model = family.build(family.tiny())
    assert all(t.device.type == "meta" for t in model.state_dict().values())


def test_unknown_family_error_lists_known_ones():
    with pytest.raises(KeyError, match="known"):
        get_family("no-such-family")
