"""Clips: constant-velocity motion that agrees with the caption and with the pixels."""
import numpy as np

from polymodal.data.world import HELD_OUT_PAIRS, World, parse_image
from polymodal.data.world.clips import DIRECTIONS


def test_clip_frames_and_determinism():
    world = World("train", image_size=48, num_objects=(1, 3), background="noise")
    clip = world.clip(3, frames=6)
    assert clip.frames.shape == (6, 48, 48, 3) and clip.frames.dtype == np.uint8
    np.testing.assert_array_equal(clip.frames, world.clip(3, frames=6).frames)
    assert clip.render(32).shape == (6, 32, 32, 3)
    assert clip.caption() != "" and clip.seed == world[3].seed


def test_motion_matches_caption_velocity_and_pixels():
    world = World("val", image_size=64, num_objects=(1, 3), background="mixed")
    for index in range(25):
        clip = world.clip(index, frames=8)
        caption = clip.caption()
        for k, (obj, motion) in enumerate(zip(clip.objects, clip.motions)):
            assert f"{obj.color} {obj.shape}" in caption and f"moves {motion}" in caption
            track = np.array([scene.objects[k].center for scene in clip.scenes])  # (T, 2)
            steps = np.diff(track, axis=0)
            np.testing.assert_allclose(steps, np.broadcast_to(clip.velocities[k], steps.shape), atol=1e-12)
            direction = np.array(DIRECTIONS[motion])
            assert (steps @ direction > 0).all() and np.allclose(steps @ direction[::-1], 0)
        # The pixels move too: the scorer finds every object in the first and last frame,
        # displaced in the captioned direction.
        first, last = parse_image(clip.frames[0]), parse_image(clip.frames[-1])
        assert len(first) == len(last) == len(clip.objects)
        for obj, motion in zip(clip.objects, clip.motions):
            (a,) = [p for p in first if (p.color, p.shape) == (obj.color, obj.shape) and p.size == obj.size][:1]
            (b,) = [p for p in last if (p.color, p.shape) == (obj.color, obj.shape) and p.size == obj.size][:1]
            shift = np.subtract(b.center, a.center) @ np.array(DIRECTIONS[motion])
            assert shift > 0.2, (index, motion, shift)


def test_clip_objects_never_overlap_and_respect_holdout():
    for split in ("train", "compositional"):
        world = World(split, image_size=32, num_objects=(3, 3))
        for index in range(15):
            clip = world.clip(index, frames=5)
            for scene in clip.scenes:
                masks = scene.masks()
                assert not (masks.sum(axis=0) > 1).any()
            pairs = {(o.color, o.shape) for o in clip.objects}
            assert bool(pairs & set(HELD_OUT_PAIRS)) == (split == "compositional")
