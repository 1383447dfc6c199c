"""The exact scorer: ground truth scores ~100%, errors are detected, noise and blur degrade it."""
import dataclasses
import itertools

import numpy as np
import pytest
from PIL import Image, ImageFilter

from polymodal.data.world import World, WorldObject, parse_image, score_image


def _accuracy(scenes, images, **kwargs) -> float:
    return float(np.mean([score_image(image, scene, **kwargs)["all_correct"] for scene, image in zip(scenes, images)]))


def test_ground_truth_scores_at_least_99_percent():
    correct, total = 0, 0
    for size in (32, 48, 64, 96, 128):
        world = World("test", image_size=size, num_objects=(1, 9), background="mixed", seed=size)
        for scene in world.scenes(60):
            result = score_image(scene.render(), scene)
            correct += result["all_correct"]
            total += 1
    assert correct / total >= 0.99, correct / total


def test_rotated_ground_truth_scores_at_least_99_percent():
    world = World("test", image_size=64, num_objects=(1, 4), background="mixed", max_rotation=30.0)
    scenes = list(world.scenes(40))
    assert _accuracy(scenes, [s.render() for s in scenes]) >= 0.99


def test_parse_reports_objects_in_reading_order_with_boxes():
    scene = World("val", image_size=96, num_objects=(3, 6), background="noise")[2]
    parsed = parse_image(scene.image())  # PIL input
    assert [(p.shape, p.color, p.size, p.cell) for p in parsed] == [
        (o.shape, o.color, o.size, o.cell) for o in scene.objects
    ]
    assert [p.bbox for p in parsed] == scene.boxes()
    for p, o in zip(parsed, scene.objects):
        assert abs(p.center[0] - o.center[0]) < 1.5 / 96 and abs(p.center[1] - o.center[1]) < 1.5 / 96


def test_wrong_expectations_are_flagged():
    scene = World("train", image_size=64, num_objects=(2, 2))[0]
    image = scene.render()
    first, second = scene.objects
    other_color = next(c for c in ("red", "blue") if c != first.color)
    other_shape = next(s for s in ("circle", "square") if s != first.shape)
    moved_cell = next((r, c) for r in range(3) for c in range(3) if (r, c) not in (first.cell, second.cell))
    cases = {
        "color": WorldObject(first.shape, other_color, first.size, first.cell, first.center),
        "shape": WorldObject(other_shape, first.color, first.size, first.cell, first.center),
        "position": WorldObject(first.shape, first.color, first.size, moved_cell, first.center),
    }
    for flag, wrong in cases.items():
        result = score_image(image, [wrong, second])
        assert not result["all_correct"], flag
        assert result["objects"][0][flag] is False, flag
        assert result["objects"][1]["correct"] is True
    extra = score_image(image, list(scene.objects)[:1])
    assert not extra["all_correct"] and not extra["count_correct"] and extra["num_parsed"] == 2
    empty = score_image(np.full((64, 64, 3), 200, np.uint8), scene)
    assert empty["num_parsed"] == 0 and empty["presence"] == 0.0 and not empty["all_correct"]


def test_each_attribute_that_differs_alone_is_reported_and_nothing_else():
    """Oracle: the scene's own ground truth with exactly one attribute of the first object changed.
    The scorer must flag that attribute (and the correctness it implies) and only it: every other
    flag, the other object and the per-attribute rates stay exactly as on the ground truth."""
    scene = World("train", image_size=64, num_objects=(2, 2))[0]
    image = scene.render()
    first, second = scene.objects
    assert score_image(image, scene)["all_correct"]
    other_color = next(c for c in ("red", "green", "blue") if c not in (first.color, second.color))
    other_shape = next(s for s in ("circle", "triangle", "cross") if s not in (first.shape, second.shape))
    other_size = next(z for z in ("small", "medium", "large") if z != first.size)
    moved_cell = next((r, c) for r in range(3) for c in range(3) if (r, c) not in (first.cell, second.cell))
    truth = {"present": True, "matched": True, "color": True, "shape": True, "size": True, "position": True,
             "correct": True}
    cases = {  # attribute changed -> the flags that must turn False
        "color": (dataclasses.replace(first, color=other_color), {"color", "present"}),
        "shape": (dataclasses.replace(first, shape=other_shape), {"shape", "present"}),
        "size": (dataclasses.replace(first, size=other_size), {"size"}),
        "position": (dataclasses.replace(first, cell=moved_cell), {"position"}),
    }
    for attribute, (wrong, flagged) in cases.items():
        result = score_image(image, [wrong, second])
        first_flags = {k: v for k, v in result["objects"][0].items() if k != "expected"}
        assert first_flags == {**truth, **{f: False for f in flagged}, "correct": False}, attribute
        assert {k: v for k, v in result["objects"][1].items() if k != "expected"} == truth, attribute
        assert result["all_correct"] is False and result["count_correct"] is True, attribute
        for rate in ("presence", "color", "shape", "size", "position"):
            want = 0.5 if (rate if rate != "presence" else "present") in flagged else 1.0
            assert result[rate] == want, (attribute, rate)
    # Count: one object too many expected (the image holds 2); both real ones still match exactly.
    absent = WorldObject(other_shape, other_color, first.size, moved_cell, first.center)
    result = score_image(image, [first, second, absent])
    assert (result["count_correct"], result["all_correct"], result["num_parsed"]) == (False, False, 2)
    assert [r["correct"] for r in result["objects"]] == [True, True, False]
    # Presence: that extra object's color + shape is nowhere in the image, nor matched to anything.
    assert (result["objects"][2]["present"], result["objects"][2]["matched"]) == (False, False)
    assert result["presence"] == pytest.approx(2 / 3)
    # Count the other way: one object too few expected; the one expected is still exactly right.
    result = score_image(image, [first])
    assert (result["count_correct"], result["all_correct"], result["num_parsed"]) == (False, False, 2)
    assert result["objects"][0]["correct"] is True and result["size"] == result["presence"] == 1.0


def _non_increasing(values, slack=0.05):
    return all(b <= a + slack for a, b in itertools.pairwise(values))


def test_scores_degrade_gradually_with_noise_and_blur():
    world = World("test", image_size=64, num_objects=(1, 5), background="mixed")
    scenes = list(world.scenes(60))
    images = [s.render() for s in scenes]
    rng = np.random.default_rng(0)
    noise = []
    for std in (0, 20, 35, 50, 80):
        noisy = [np.clip(im + rng.normal(0, std, im.shape), 0, 255).astype(np.uint8) for im in images]
        noise.append(_accuracy(scenes, noisy))
    blur = []
    for radius in (0, 0.5, 0.8, 1.0, 2.0):
        blurred = [np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(radius))) for im in images]
        blur.append(_accuracy(scenes, blurred))
    for curve in (noise, blur):
        assert curve[0] == 1.0 and curve[-1] <= 0.2, curve
        assert _non_increasing(curve), curve
        # Gradual: at least one intermediate level is neither perfect nor hopeless.
        assert any(0.2 < v < 1.0 for v in curve[1:-1]), curve
