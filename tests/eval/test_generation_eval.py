"""The generator evaluation against oracles: the scenes' own renders score perfectly, wrong
images are caught attribute by attribute, and the Fréchet distance has its closed form."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.eval.generation import score_generated, world_prompts
from polymodal.eval.world_features import (
    HEADS,
    WorldFeatureNet,
    cell_labels,
    frechet_distance,
    train_world_feature_net,
    world_feature_net,
)



@pytest.mark.parametrize("conditioning, objects", [("text", (1, 1)), ("text", (2, 2)), ("class", (1, 1))])
def test_the_scenes_own_renders_score_perfectly(conditioning, objects):
    config = SimpleNamespace(conditioning=conditioning)  # all world_prompts reads of a model config
    for prompt, scene in world_prompts(config, "val", objects, 10):
        assert prompt
        flags = score_generated(Image.fromarray(scene.render()), scene, conditioning)
        assert flags == {key: 1.0 for key in flags}, (prompt, flags)


def test_text_prompts_name_every_scored_attribute():
    config = SimpleNamespace(conditioning="text")
    prompt, scene = world_prompts(config, "val", (2, 2), 1)[0]
    for obj in scene.objects:
        assert obj.color in prompt and obj.shape in prompt and obj.size in prompt


def test_a_wrong_image_fails_exactly_the_attributes_it_gets_wrong():
    config = SimpleNamespace(conditioning="text")
    _, scene = world_prompts(config, "val", (1, 1), 1)[0]
    obj = scene.objects[0]
    other = next(c for c in ("red", "green", "blue") if c != obj.color)
    wrong = dataclasses.replace(scene, objects=(dataclasses.replace(obj, color=other),))
    flags = score_generated(Image.fromarray(wrong.render()), scene, "text")
    assert flags["color"] == 0.0 and flags["all_correct"] == 0.0 and flags["color_shape_position"] == 0.0
    assert flags["shape"] == flags["size"] == flags["position"] == flags["count"] == 1.0
    class_flags = score_generated(Image.fromarray(wrong.render()), scene, "class")
    assert class_flags["all_correct"] == 0.0


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20_000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + np.array([1.0, 2.0, 0.0])) == pytest.approx(5.0, rel=1e-6)
    # N(0, I) vs N(0, 4I) in 3 dims: Tr(I + 4I - 2 * 2I) = 3
    assert frechet_distance(a, 2 * rng.standard_normal((20_000, 3))) == pytest.approx(3.0, rel=0.05)


def test_cell_labels_and_a_short_training_run(tmp_path, monkeypatch):
    from polymodal.data.world import World

    scene = World("val", image_size=32, num_objects=(2, 2))[0]
    labels = cell_labels([scene])
    assert sorted((labels["color"][0] < HEADS["color"] - 1).nonzero().flatten().tolist()) == sorted(
        o.cell[0] * 3 + o.cell[1] for o in scene.objects)
    net = train_world_feature_net(16, steps=3)
    assert isinstance(net, WorldFeatureNet) and net(torch.zeros(2, 3, 16, 16)).shape == (2, 64)
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path))
    monkeypatch.setattr("polymodal.eval.world_features.TRAIN_STEPS", 2)
    first = world_feature_net(16)
    assert list(tmp_path.rglob("model.safetensors"))
    again = world_feature_net(16)  # from the cache: the same weights
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
