"""Multi-part checkpoints: a model of named parts (each its own family, config and safetensors file)
saves, loads and trains as one model."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn

import polymodal
from polymodal.backbones.decoder import DecoderConfig, DecoderLM
from polymodal.checkpoint import read_weights, save_checkpoint, stored_shapes
from polymodal.encoders.vit import ViTConfig, VisionTransformer
from polymodal.errors import CheckpointError
from polymodal.models.lm import lm_tiny
from polymodal.models.registry import Family, register
from polymodal.models.vit import vit_tiny

NAME = "test_two_part_model"


@dataclass
class PairConfig:
    """A language model and an image tower, plus a bridge of the composite's own."""

    lm: DecoderConfig = field(default_factory=lm_tiny)
    tower: ViTConfig = field(default_factory=vit_tiny)
    scale: float = 0.5


class Pair(nn.Module):
    """Parts `lm` (family "lm") and `tower` (family "vit"), and a bridge Linear of its own."""

    family = NAME

    def __init__(self, config: PairConfig) -> None:
        super().__init__()
        self.config = config
        self.lm = DecoderLM(config.lm)
        self.tower = VisionTransformer(config.tower)
        self.bridge = nn.Linear(config.tower.hidden_size, config.lm.hidden_size)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        image = self.bridge(self.tower(pixel_values).pooler_output)[:, None]  # (B, 1, D)
        text = self.lm.embed_tokens(input_ids)  # (B, T, D)
        return self.lm(inputs_embeds=torch.cat([image, text], 1)).logits * self.config.scale


register(Family(NAME, PairConfig, Pair, PairConfig, lambda m: None, parts=("lm", "tower")))


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 256, (2, 5), generator=g)


def test_parts_are_stored_in_their_own_folders_and_load_as_one_model(tmp_path):
    torch.manual_seed(0)
    model = Pair(PairConfig(scale=0.25)).eval()
    folder = save_checkpoint(model, tmp_path / "pair")
    meta = json.loads((folder / "config.json").read_text())
    assert meta["parts"] == ["lm", "tower"] and meta["config"] == {"scale": 0.25}  # parts hold their own configs
    for part, family in (("lm", "lm"), ("tower", "vit")):
        assert json.loads((folder / part / "config.json").read_text())["family"] == family
        assert (folder / part / "model.safetensors").is_file()
    assert set(read_weights(folder)) == set(model.state_dict())
    assert stored_shapes(folder)["lm.embed_tokens.weight"] == (256, 64)
    loaded, _ = polymodal.load(folder)
    assert type(loaded) is Pair and loaded.config == model.config
    assert loaded.lm.lm_head.weight is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded(*_inputs()), model(*_inputs()))
    # A part is a checkpoint of its own family: it loads alone too.
    part, _ = polymodal.load(folder / "tower")
    assert type(part) is VisionTransformer


def test_a_damaged_part_is_named(tmp_path):
    folder = save_checkpoint(Pair(PairConfig()), tmp_path / "pair")
    weights = folder / "tower" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="tower/model.safetensors is truncated or corrupt"):
        polymodal.load(folder)
    config = folder / "lm" / "config.json"
    meta = json.loads(config.read_text())
    meta["config"]["hidden_size"] = 32  # the lm part no longer fits its weights: refused before allocating
    config.write_text(json.dumps(meta))
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError):
        polymodal.load(folder)


def test_a_multi_part_model_trains_and_resumes_exactly(tmp_path):
    from polymodal.train.data import IndexedBatches
    from polymodal.train.loop import TrainConfig, train

    def objective(model, batch):
        pixels, ids = batch
        return model(pixels, ids).float().pow(2).mean()

    def crash_at_3(context):
        if context.step == 3:
            raise RuntimeError("killed")

    def run(out, **kw):
        torch.manual_seed(0)
        config = TrainConfig(steps=4, lr=1e-2, ckpt_every=2, out_dir=str(out), resume=True)
        return train(Pair(PairConfig()), IndexedBatches(lambda i: _inputs()), objective, config, **kw)

    straight = run(tmp_path / "a")
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "b", callbacks=[crash_at_3])
    resumed = run(tmp_path / "b")
    assert resumed.losses == straight.losses
    assert (resumed.checkpoint / "lm" / "model.safetensors").is_file()
