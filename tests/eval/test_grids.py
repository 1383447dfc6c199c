"""Sample grids: every word of a label is drawn, wrapped at word boundaries within the tile."""
from PIL import Image, ImageDraw, ImageFont

from polymodal.eval.grids import labelled_grid, wrap


def test_wrap_keeps_every_word_and_fits_the_width():
    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), ImageFont.load_default()
    text = "Is there a small purple diamond to the left of the large cyan star in the bottom right?"
    lines = wrap(draw, text, font, 100)
    assert len(lines) > 1 and " ".join(lines) == text
    assert all(draw.textlength(line, font=font) <= 100 for line in lines)
    long_word = "x" * 60
    assert "".join(wrap(draw, long_word, font, 40)) == long_word
    assert wrap(draw, "", font, 40) == [""]


def test_grid_grows_to_hold_wrapped_labels(tmp_path):
    images = [Image.new("RGB", (8, 8), "red")] * 3
    short = labelled_grid(images, [["a"]] * 3, tmp_path / "short.png", columns=3, tile=64)
    long = labelled_grid(images, [["a " * 40, "model: yes"]] * 3, tmp_path / "long.png", [True, False, None],
                         columns=3, tile=64)
    assert Image.open(long).height > Image.open(short).height
    assert Image.open(long).width == Image.open(short).width


def test_the_verdict_colors_each_label_green_or_red(tmp_path):
    """Known answer per tile: right -> green text, wrong -> red text, no verdict -> neither.
    The font is antialiased, so colors are told apart by channel differences, not exact RGB."""
    import numpy as np

    images = [Image.new("RGB", (8, 8), "white")] * 3
    path = labelled_grid(images, [["question one", "model: yes"]] * 3, tmp_path / "grid.png", [True, False, None],
                         columns=3, tile=64)
    sheet = np.asarray(Image.open(path)).astype(int)
    counts = []
    for i in range(3):
        below = sheet[6 + 64:, 6 + i * 70:6 + i * 70 + 64]  # under tile i (pad 6, tile 64)
        red, green = below[..., 0], below[..., 1]
        dark = (255 - below).sum(-1) > 150
        counts.append((int((green - red > 40).sum()), int((red - green > 60).sum()), int(dark.sum())))
    (green0, red0, _), (green1, red1, _), (green2, red2, dark2) = counts
    assert green0 > 20 and red0 == 0  # right: a green line
    assert red1 > 20 and green1 == 0  # wrong: a red line
    assert green2 == red2 == 0 and dark2 > 100  # no verdict: both lines in the text color
