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
