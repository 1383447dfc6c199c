"""Safe image loading, preprocessing parity with transformers, and any-resolution tiling."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    LlavaImageProcessorPil,
    SiglipImageProcessorPil,
)
from transformers.image_processing_utils import select_best_resolution

from polymodal.data.image import (
    ImageError,
    Preprocess,
    decode_image,
    load_image,
    preprocess,
    resolve_under,
    select_grid,
    tile_image,
)
from polymodal.data.loading import DataError


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height pixels but which holds almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


def test_load_rgb_roundtrip_exact(tmp_path, make_photo):
    image = make_photo(40, 30)
    image.save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png")
    assert loaded.mode == "RGB" and loaded.size == (40, 30)
    assert np.array_equal(np.asarray(loaded), np.asarray(image))


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide x 20 high: left half red, right half blue. Orientation 6 = rotate 90° clockwise
    # to display, so the displayed image is 20 x 40 with red on top.
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = [255, 0, 0]
    stored[:, 20:] = [0, 0, 255]
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "rot.png", exif=exif)
    loaded = np.asarray(load_image(tmp_path / "rot.png"))
    assert loaded.shape == (40, 20, 3)
    assert loaded[5, 10].tolist() == [255, 0, 0]
    assert loaded[35, 10].tolist() == [0, 0, 255]


def test_modes_convert_to_rgb(tmp_path):
    # Palette with a transparent index, RGBA, grayscale, 16-bit grayscale and CMYK.
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.save(tmp_path / "p.png", transparency=0)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent: composited onto white
    rgba[0, 0, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.new("L", (4, 4), 77).save(tmp_path / "l.png")
    Image.fromarray(np.full((4, 4), 40000, np.uint16)).save(tmp_path / "i16.png")
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")

    p = np.asarray(load_image(tmp_path / "p.png"))
    assert p[0, 0].tolist() == [255, 255, 255] and p[1, 1].tolist() == [10, 200, 30]
    a = np.asarray(load_image(tmp_path / "rgba.png"))
    assert a[0, 0].tolist() == [200, 0, 0] and a[1, 1].tolist() == [255, 255, 255]
    assert np.asarray(load_image(tmp_path / "l.png"))[2, 2].tolist() == [77, 77, 77]
    assert np.asarray(load_image(tmp_path / "i16.png"))[2, 2].tolist() == [40000 // 257] * 3
    cmyk = load_image(tmp_path / "cmyk.jpg")
    assert cmyk.mode == "RGB" and np.asarray(cmyk).min() >= 250  # no ink = white


def test_decompression_bomb_rejected_with_image_error(tmp_path, make_photo):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(100_000, 100_000))
    assert bomb.stat().st_size < 100
    with pytest.raises(ImageError, match="bomb.png"):
        load_image(bomb)
    make_photo(64, 64).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match=r"4096 pixels exceeds max_pixels=1000"):
        load_image(tmp_path / "big.png", max_pixels=1000)


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_truncated_file(tmp_path, make_photo, suffix):
    path = tmp_path / f"t.{suffix}"
    make_photo(64, 64).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageError, match=f"t.{suffix}"):
        load_image(path)


def test_missing_non_image_and_directory(tmp_path):
    with pytest.raises(ImageError, match="nope.png: image file not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "notes.png").write_text("hello, not an image")
    with pytest.raises(ImageError, match="notes.png: cannot decode"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(ImageError, match="cannot open"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="junk"):
        decode_image(b"\x00" * 10, "shard.tar:junk.jpg")


def test_paths_escaping_the_root_are_rejected(tmp_path, make_photo):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    make_photo(8, 8).save(tmp_path / "outside.png")
    make_photo(8, 8).save(root / "sub" / "inside.png")
    (root / "link_out.png").symlink_to(tmp_path / "outside.png")
    (root / "link_in.png").symlink_to(root / "sub" / "inside.png")

    assert load_image("sub/inside.png", root=root).size == (8, 8)
    assert load_image("link_in.png", root=root).size == (8, 8)
    assert load_image("sub/../sub/inside.png", root=root).size == (8, 8)
    for bad in ["../outside.png", "sub/../../outside.png", str(tmp_path / "outside.png"), "link_out.png"]:
        with pytest.raises(ImageError, match="absolute|escapes"):
            load_image(bad, root=root)
    with pytest.raises(DataError, match="escapes the dataset root"):
        resolve_under(root, "../outside.png")


@pytest.mark.parametrize("size", [224, 96])
def test_preprocess_matches_transformers(make_photo, size):
    # Same PIL bicubic resize on uint8 pixels and same crop arithmetic as transformers' slow (PIL
    # backend) processors, so the outputs agree to float32 rounding: tolerance 1e-5.
    images = [make_photo(300, 200, 1), make_photo(180, 333, 2), make_photo(97, 61, 3), make_photo(size, size, 4)]
    references = {
        "clip": CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        "siglip": SiglipImageProcessorPil(size={"height": size, "width": size}),
        "llava": LlavaImageProcessorPil(
            do_pad=True, size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        ),
    }
    for name, processor in references.items():
        for image in images:
            ref = processor(image, return_tensors="np")["pixel_values"][0]
            ours = preprocess(image, name, size=size)
            assert ours.shape == (3, size, size) and ours.dtype == torch.float32
            assert np.abs(ours.numpy() - ref).max() < 1e-5, (name, image.size)


def test_preprocess_llava_pads_with_mean_color():
    # A wide white strip: the padded rows must normalize to ~0 (the mean color), not to black.
    strip = Image.new("RGB", (200, 50), (255, 255, 255))
    out = preprocess(strip, "llava", size=64)
    assert out[:, 0, :].abs().max() < 0.02
    assert out[:, 32, 32].min() > 1.5
    assert Preprocess.preset("siglip", 32)(strip).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="unknown preprocessing preset 'dino'"):
        preprocess(strip, "dino")


def test_select_grid_matches_llava_next_rule():
    grids = [(1, 2), (2, 1), (2, 2), (1, 3), (3, 1), (1, 1)]
    tile = 336
    rng = np.random.default_rng(0)
    for width, height in [(1000, 500), (500, 1000), (336, 336), (2000, 2000), (100, 900)] + [
        tuple(int(v) for v in rng.integers(50, 2500, 2)) for _ in range(30)
    ]:
        ref_h, ref_w = select_best_resolution((height, width), [(r * tile, c * tile) for r, c in grids])
        assert select_grid((width, height), grids, tile) == (ref_h // tile, ref_w // tile)
    assert select_grid((1000, 500), grids, tile) == (1, 2)


def test_tile_image_views():
    image = np.zeros((200, 100, 3), np.uint8)  # 100 wide, 200 high: top red, bottom blue
    image[:100] = [255, 0, 0]
    image[100:] = [0, 0, 255]
    views = tile_image(Image.fromarray(image), (2, 1), tile=32)
    assert len(views) == 3 and all(v.size == (32, 32) for v in views)
    assert np.asarray(views[1])[16, 16].tolist() == [255, 0, 0]
    assert np.asarray(views[2])[16, 16].tolist() == [0, 0, 255]
    base = np.asarray(views[0])
    assert base[2, 16].tolist() == [255, 0, 0] and base[29, 16].tolist() == [0, 0, 255]
    wide = tile_image(Image.new("RGB", (90, 30), (9, 9, 9)), (2, 3), tile=16)
    assert len(wide) == 7  # image fills the middle row band; the rest is padding
    assert np.asarray(wide[1])[0, 0].tolist() == [0, 0, 0]
