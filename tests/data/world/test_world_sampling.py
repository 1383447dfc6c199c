"""Scene sampling: determinism, seed-range splits, the compositional hold-out, serialisation."""
import numpy as np
import pytest

from polymodal.data.world import COLORS, HELD_OUT_PAIRS, SHAPES, SIZES, Scene, World
from polymodal.data.world.draws import SPLIT_STRIDE


def _signature(scene: Scene) -> str:
    """Everything that determines the pixels. (Object layouts alone may coincide: a single large
    object has no room to move in its cell, so there are only a few hundred such layouts.)"""
    d = scene.to_dict()
    for key in ("index", "split", "seed"):
        d.pop(key)
    return repr(d)


def test_scenes_are_deterministic_per_split_seed_and_index():
    a = World("train", background="mixed", seed=3)
    b = World("train", background="mixed", seed=3)
    assert a[17] == b[17]
    np.testing.assert_array_equal(a[17].render(), b[17].render())
    assert [s.index for s in a.scenes(3, start=5)] == [5, 6, 7]
    assert list(a.scenes(3, start=5)) == [a[5], a[6], a[7]]
    assert a[17] != World("train", background="mixed", seed=4)[17]
    assert a[17] != a[18]


def test_huge_and_invalid_indices():
    world = World("val")
    assert world[SPLIT_STRIDE - 1].seed == 2 * SPLIT_STRIDE - 1
    with pytest.raises(IndexError, match="World index"):
        world[-1]
    with pytest.raises(IndexError, match="World index"):
        world[SPLIT_STRIDE]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "dev"}, "split"),
        ({"background": "stars"}, "background"),
        ({"num_objects": (0, 2)}, "num_objects"),
        ({"num_objects": (3, 10)}, "num_objects"),
        ({"image_size": 8}, "image size"),
        ({"max_rotation": 90.0}, "max_rotation"),
    ],
)
def test_world_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        World(**kwargs)


def test_splits_are_disjoint_in_seeds_and_content():
    splits = ("train", "val", "test", "compositional")
    seeds, contents = {}, {}
    for split in splits:
        scenes = list(World(split, num_objects=(1, 4), background="mixed").scenes(300))
        assert {s.split for s in scenes} == {split}
        seeds[split] = {s.seed for s in scenes}
        contents[split] = {_signature(s) for s in scenes}
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            assert not seeds[a] & seeds[b], (a, b)
            assert not contents[a] & contents[b], (a, b)


def test_compositional_holdout():
    held = set(HELD_OUT_PAIRS)
    for split in ("train", "val", "test"):
        for scene in World(split, num_objects=(1, 9)).scenes(300):
            assert not {(o.color, o.shape) for o in scene.objects} & held, (split, scene.index)
            # Held-out pairs do not appear in the text either.
            text = " ".join(scene.captions() + [qa.question for qa in scene.questions()])
            assert not any(f"{c} {s}" in text for c, s in held), (split, scene.index)
    seen_pairs = set()
    for scene in World("compositional", num_objects=(1, 9)).scenes(300):
        pairs = {(o.color, o.shape) for o in scene.objects}
        assert pairs & held, scene.index
        seen_pairs |= pairs & held
    assert seen_pairs == held  # every held-out pair is exercised
    # Every color and every shape still occurs in training, only not in held-out combinations.
    train = [o for s in World("train", num_objects=(1, 9)).scenes(200) for o in s.objects]
    assert {o.color for o in train} == set(COLORS)
    assert {o.shape for o in train} == set(SHAPES)
    assert {o.size for o in train} == set(SIZES)


def test_objects_stay_in_distinct_cells_inside_their_cell():
    for max_rotation in (0.0, 30.0):
        world = World("train", num_objects=(1, 9), max_rotation=max_rotation)
        for scene in world.scenes(100):
            cells = [o.cell for o in scene.objects]
            assert len(set(cells)) == len(cells)
            assert cells == sorted(cells)
            for o in scene.objects:
                row, col = o.cell
                assert col / 3 < o.center[0] < (col + 1) / 3
                assert row / 3 < o.center[1] < (row + 1) / 3
                assert abs(o.rotation) <= max_rotation


def test_background_kinds_and_mixed():
    kinds = {s.background for s in World("train", background="mixed").scenes(60)}
    assert kinds == {"plain", "noise", "texture"}
    for kind in ("plain", "noise", "texture"):
        scene = World("train", background=kind)[0]
        assert scene.background == kind
        image = scene.render()
        corner = image[:3, :3].reshape(-1, 3).astype(int)
        # Backgrounds stay gray (near-equal channels) so no pixel reads as a named color.
        assert np.abs(corner - corner.mean(axis=1, keepdims=True)).max() <= 40
        if kind == "plain":
            assert (corner == scene.bg_color).all()


def test_to_dict_round_trip():
    scene = World("test", background="noise", max_rotation=20.0)[9]
    restored = Scene.from_dict(scene.to_dict())
    assert restored == scene
    np.testing.assert_array_equal(restored.render(48), scene.render(48))
