"""Sample grids: images with captions or model answers under them, saved as one PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

GOOD, BAD, TEXT = (20, 130, 40), (200, 30, 30), (20, 20, 20)


def labelled_grid(images: Sequence[Image.Image], labels: Sequence[Sequence[str]], path: str | Path,
                  correct: Sequence[bool | None] | None = None, columns: int = 4, tile: int = 160) -> Path:
    """Save `images` in a grid, each with its text lines below, wrapped at word boundaries to the
    tile's width (the last line green/red by `correct`)."""
    font = ImageFont.load_default()
    line_h, pad = 12, 6
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [[(row, j == len(lines) - 1) for j, line in enumerate(lines) for row in wrap(measure, line, font, tile)]
               for lines in labels]
    text_h = line_h * max((len(rows) for rows in wrapped), default=1) + pad
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (tile + pad) + pad, rows * (tile + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, lines) in enumerate(zip(images, wrapped)):
        x = pad + (i % columns) * (tile + pad)
        y = pad + (i // columns) * (tile + text_h + pad)
        sheet.paste(image.convert("RGB").resize((tile, tile), Image.NEAREST), (x, y))
        for j, (line, last) in enumerate(lines):
            verdict = correct[i] if correct is not None and last else None
            color = TEXT if verdict is None else (GOOD if verdict else BAD)
            draw.text((x, y + tile + 2 + j * line_h), line, fill=color, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """`text` as lines of at most `width` pixels, broken between words (a single word longer than
    the width is broken inside it)."""
    lines, current = [], ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if draw.textlength(candidate, font=font) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while draw.textlength(word, font=font) > width:  # a word wider than the tile: cut it
            cut = max(k for k in range(1, len(word) + 1) if draw.textlength(word[:k], font=font) <= width or k == 1)
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    return lines + [current] if current or not lines else lines
