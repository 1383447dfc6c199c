"""Sample grids: images with captions or model answers under them, saved as one PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

GOOD, BAD, TEXT = (20, 130, 40), (200, 30, 30), (20, 20, 20)


def labelled_grid(images: Sequence[Image.Image], labels: Sequence[Sequence[str]], path: str | Path,
                  correct: Sequence[bool | None] | None = None, columns: int = 4, tile: int = 160) -> Path:
    """Save `images` in a grid, each with its text lines below (last line green/red by `correct`)."""
    font = ImageFont.load_default()
    line_h, pad = 12, 6
    text_h = line_h * max((len(lines) for lines in labels), default=1) + pad
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (tile + pad) + pad, rows * (tile + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, lines) in enumerate(zip(images, labels)):
        x = pad + (i % columns) * (tile + pad)
        y = pad + (i // columns) * (tile + text_h + pad)
        sheet.paste(image.convert("RGB").resize((tile, tile), Image.NEAREST), (x, y))
        for j, line in enumerate(lines):
            verdict = correct[i] if correct is not None and j == len(lines) - 1 else None
            color = TEXT if verdict is None else (GOOD if verdict else BAD)
            draw.text((x, y + tile + 2 + j * line_h), _fit(draw, line, font, tile), fill=color, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Shorten text with an ellipsis until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
