"""Rendering: every shape and color renders and parses; masks and boxes match the pixels."""
import numpy as np
import pytest

from polymodal.data.world import (
    COLORS,
    SHAPES,
    SIZES,
    Scene,
    World,
    WorldObject,
    parse_image,
)
from polymodal.data.world.objects import SIZE_FRACTIONS
from polymodal.data.world.render import shape_raster


def _single(shape: str, color: str, size: str, background: str = "plain") -> Scene:
    obj = WorldObject(shape, color, size, (1, 1), (0.5, 0.5))
    return Scene((obj,), background, (230, 230, 230), 7, 8.0, 3.0, 0.4, 0, "train", 0, 64)


@pytest.mark.parametrize("image_size", [16, 32, 57, 64, 128, 256])
def test_render_shapes_and_dtype(image_size):
    scene = World("train", image_size=image_size, background="mixed", num_objects=(1, 9))[4]
    image = scene.render()
    assert image.shape == (image_size, image_size, 3) and image.dtype == np.uint8
    assert scene.image().size == (image_size, image_size)
    assert scene.render(40).shape == (40, 40, 3)


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_renders_and_parses(shape):
    for size in SIZES:
        for color in COLORS:
            for image_size in (32, 96):
                scene = _single(shape, color, size)
                parsed = parse_image(scene.render(image_size))
                assert len(parsed) == 1, (shape, size, color, image_size)
                p = parsed[0]
                assert (p.shape, p.color, p.size, p.cell) == (shape, color, size, (1, 1))
                assert p.fit == 1.0


def test_every_color_is_painted_exactly():
    for color, rgb in COLORS.items():
        scene = _single("square", color, "large", background="noise")
        image = scene.render(64)
        mask = scene.masks(64)[0]
        assert (image[mask] == rgb).all()
        assert not (image[~mask] == rgb).all(axis=1).any()


def test_size_classes_and_shapes_rasterise_differently_at_every_size():
    # The scorer can only be exact if no two (shape, size) pairs give the same pixels.
    for image_size in range(28, 257):
        half_cell = image_size / 3 / 2
        seen = {}
        for shape in SHAPES:
            for size, frac in SIZE_FRACTIONS.items():
                raster = shape_raster(shape, frac * half_cell, 0.0)[0]
                ys, xs = np.nonzero(raster)
                crop = raster[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
                key = (crop.shape, crop.tobytes())
                assert key not in seen, (image_size, shape, size, seen.get(key))
                seen[key] = (shape, size)


@pytest.mark.parametrize("image_size", [32, 64, 100])
def test_masks_and_boxes_match_the_render(image_size):
    world = World("val", image_size=image_size, num_objects=(1, 9), background="mixed", max_rotation=25.0)
    for scene in world.scenes(20):
        image = scene.render()
        masks = scene.masks()
        boxes = scene.boxes()
        assert masks.shape == (len(scene.objects), image_size, image_size) and masks.dtype == bool
        assert not (masks.sum(axis=0) > 1).any()  # no overlaps
        for obj, mask, (x0, y0, x1, y1) in zip(scene.objects, masks, boxes):
            assert mask.any()
            assert (image[mask] == COLORS[obj.color]).all()
            ys, xs = np.nonzero(mask)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            # The mask stays inside the object's cell.
            row, col = obj.cell
            cell = image_size / 3
            assert col * cell <= x0 and x1 <= (col + 1) * cell + 1e-9
            assert row * cell <= y0 and y1 <= (row + 1) * cell + 1e-9
