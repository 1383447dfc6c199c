"""DiT: parity with diffusers' DiTTransformer2DModel (import and export), every conditioning mode
forward/backward, the adaLN-Zero init, and the errors a user can hit."""
from __future__ import annotations

import json

import diffusers
import pytest
import torch
import torch.nn.functional as F

from polymodal.checkpoint import CheckpointMismatchError
from polymodal.errors import ConfigError
from polymodal.generators.dit import DiT, DiTConfig, dit_tiny
from polymodal.interop.diffusers_dit import (
    diffusers_config_from_dit,
    dit_config_from_diffusers,
    dit_state_from_diffusers,
    dit_state_to_diffusers,
)
from polymodal.interop.safetensors_io import DIFFUSERS_STEM, HFWeights, write_hf_weights


def _randomise(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Every parameter random, the zero-initialised ones included, so parity exercises them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _reference(out_channels: int | None, activation: str, attention_bias: bool):
    """A tiny random diffusers DiT whose blocks share one embedder (as DiT checkpoints do)."""
    ref = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=out_channels, num_layers=2,
        sample_size=8, patch_size=2, activation_fn=activation, num_embeds_ada_norm=10, attention_bias=attention_bias)
    _randomise(ref)
    first = ref.transformer_blocks[0].norm1.emb.state_dict()
    for block in ref.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first)
    return ref.eval()


def _import(folder) -> DiT:
    """Read a diffusers folder through the converter as `import_hf` does: meta check, then load."""
    cfg = json.loads((folder / "config.json").read_text())
    weights = HFWeights(folder)
    config = dit_config_from_diffusers(cfg, str(folder / "config.json"))
    with torch.device("meta"):
        probe = DiT(config)
        dit_state_from_diffusers(weights.meta(), probe, str(weights.source))
    model = DiT(config)
    model.load_state_dict(dit_state_from_diffusers(weights.load(), model, str(weights.source)))
    return model.eval()


def _inputs(channels: int = 4, size: int = 8, batch: int = 3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, channels, size, size, generator=g), torch.tensor([0, 417, 999])[:batch],
            torch.tensor([3, 9, 10])[:batch])  # label 10 = the null class


@pytest.mark.parametrize("out_channels,activation,attention_bias", [
    (None, "gelu-approximate", True),  # epsilon only, diffusers' defaults
    (8, "gelu", False),  # learned sigma
])
def test_import_matches_diffusers(tmp_path, out_channels, activation, attention_bias):
    ref = _reference(out_channels, activation, attention_bias)
    ref.save_pretrained(tmp_path)
    ours = _import(tmp_path)
    assert ours.config.learn_sigma == (out_channels is not None)
    with torch.no_grad():
        for size in (8, 12):  # native size, and another one (interpolated positions)
            latents, t, labels = _inputs(size=size)
            expected = ref(latents, t, labels).sample
            got = ours(latents, t, labels)
            assert got.shape == expected.shape == (3, out_channels or 4, size, size)
            assert (got - expected).abs().max() <= 1e-4


def test_export_loads_in_diffusers(tmp_path):
    ours = DiT(dit_tiny(learn_sigma=True, intermediate_size=128, mlp_norm_eps=1e-5)).eval()
    _randomise(ours, seed=3)
    cfg = diffusers_config_from_dit(ours.config)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    write_hf_weights(dit_state_to_diffusers(ours.state_dict(), ours.config), tmp_path, None, stem=DIFFUSERS_STEM)
    ref = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path).eval()
    latents, t, labels = _inputs()
    with torch.no_grad():
        assert (ref(latents, t, labels).sample - ours(latents, t, labels)).abs().max() <= 1e-4
    assert _import(tmp_path).config == ours.config


def test_export_names_what_diffusers_cannot_express():
    model = DiT(dit_tiny(cross_attention_dim=16, pooled_dim=8))
    with pytest.raises(ValueError, match="cross_attention_dim=16.*pooled_dim=8.*intermediate_size=64"):
        diffusers_config_from_dit(model.config)


def test_import_refuses_per_block_embedders_that_differ(tmp_path):
    ref = _reference(None, "gelu-approximate", True)
    with torch.no_grad():
        ref.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(1.0)
    ref.save_pretrained(tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"transformer_blocks\.1\.norm1\.emb\.timestep_embedder"):
        _import(tmp_path)


def test_import_refuses_unsupported_settings():
    with pytest.raises(ValueError, match="norm_type='ada_norm'.*out_channels=5"):
        dit_config_from_diffusers({"norm_type": "ada_norm", "out_channels": 5}, "x/config.json")


MODES = {
    "unconditional": dict(num_classes=0),
    "class": dict(),
    "pooled": dict(num_classes=0, pooled_dim=12),
    "cross": dict(num_classes=0, cross_attention_dim=16),
    "all": dict(pooled_dim=12, cross_attention_dim=16, learn_sigma=True),
}


def _conditioning(config: DiTConfig, batch: int = 2) -> dict:
    return {"class_labels": torch.tensor([1, 10])[:batch] if config.num_classes else None,
            "pooled": torch.randn(batch, config.pooled_dim) if config.pooled_dim else None,
            "encoder_hidden_states": torch.randn(batch, 5, config.cross_attention_dim)
            if config.cross_attention_dim else None}


@pytest.mark.parametrize("mode", list(MODES))
def test_forward_backward_each_conditioning(mode):
    torch.manual_seed(0)
    model = DiT(dit_tiny(**MODES[mode]))
    _randomise(model)
    cond = _conditioning(model.config)
    latents = torch.randn(2, 4, 8, 8)
    out = model(latents, torch.tensor([5.0, 700.5]), **cond)
    assert out.shape == (2, model.config.out_channels, 8, 8)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    with torch.no_grad():  # each conditioning input reaches the output
        for key, value in cond.items():
            if value is not None:
                other = {**cond, key: value.flip(0) if key == "class_labels" else value + 1.0}
                assert not torch.allclose(model(latents, torch.tensor([5.0, 700.5]), **other), out)


def test_scalar_timestep_broadcasts():
    model = DiT(dit_tiny())
    _randomise(model)
    latents, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(model(latents, 250, labels), model(latents, torch.tensor([250, 250]), labels))


def test_fresh_model_is_zero_and_its_blocks_are_identities():
    """adaLN-Zero: zero gates make every block the identity, the zero output layer predicts 0,
    and so the first gradient reaches only the output layer."""
    torch.manual_seed(0)
    model = DiT(dit_tiny(**MODES["all"]))
    cond = _conditioning(model.config)
    latents = torch.randn(2, 4, 8, 8)
    out = model(latents, torch.tensor([3, 900]), **cond)
    assert torch.equal(out, torch.zeros_like(out))
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    for block in model.blocks:
        assert torch.equal(block(x, c, cond["encoder_hidden_states"]), x)
    (out - 1).square().mean().backward()
    moved = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved == {"final_proj.weight", "final_proj.bias"}


def test_errors_name_the_problem():
    model = DiT(dit_tiny())
    with pytest.raises(ValueError, match="7x8 is not a multiple of patch_size 2"):
        model(torch.randn(1, 4, 7, 8), 10, torch.tensor([1]))
    with pytest.raises(ValueError, match=r"timesteps must be a scalar or of shape \(1,\), got \(2,\)"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([1]))
    with pytest.raises(ValueError, match="class_labels must be given"):
        model(torch.randn(1, 4, 8, 8), 10)
    with pytest.raises(ValueError, match="encoder_hidden_states must be None"):
        model(torch.randn(1, 4, 8, 8), 10, torch.tensor([1]), encoder_hidden_states=torch.randn(1, 2, 4))
    for fields, name in ((dict(num_heads=5), "hidden_size"), (dict(sample_size=9), "sample_size"),
                         (dict(act="relu"), "act"), (dict(num_classes=-1), "num_classes")):
        with pytest.raises(ConfigError, match=f"DiTConfig.{name}"):
            dit_tiny(**fields)


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    model = DiT(dit_tiny())
    latents, labels, target = torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 2, 10]), torch.randn(4, 4, 8, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = F.mse_loss(model(latents, torch.tensor([1, 2, 3, 4]), labels), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
