"""Safe image input, preprocessing presets and any-resolution tiling (Pillow only, no torchvision).

`load_image` is the one door through which files from a user's dataset become pixels:
- paths are resolved under the dataset root and rejected if they escape it (`../`, absolute
  paths, symlinks pointing outside), because dataset JSON is untrusted input;
- the pixel count is checked from the header *before* decoding (a decompression bomb is a tiny
  file that declares a gigantic image), raising `ImageError` instead of Pillow's warning;
- EXIF orientation is applied (phone photos are stored sideways) and every mode (palette, alpha,
  grayscale, 16-bit, CMYK) becomes RGB, transparency composited onto white like transformers;
- missing, truncated or non-image files raise `ImageError` naming the file.

`Preprocess` reproduces the slow (PIL/numpy) image processors of transformers exactly: the same
PIL bicubic resize on uint8 pixels, the same floor/offset arithmetic, so outputs agree to float
rounding (see tests/data/test_image_io.py).

`select_grid` / `tile_image` prepare a LLaVA-NeXT style any-resolution input: the best-fitting
grid of square tiles plus a low-resolution base view of the whole image.
"""

from __future__ import annotations

import io
import math
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

from polymodal.data.loading import DataError, clip, short_repr

# About 67 megapixels (8192 x 8192): well under Pillow's own warning threshold (~89.5M), far above
# any training image; a larger image is almost surely a bomb or a mistake.
DEFAULT_MAX_PIXELS = 8192 * 8192

# Mean/std used by OpenAI CLIP (and LLaVA, which reuses its vision tower), from the CLIP repo.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(DataError):
    """An image file is missing, unreadable, truncated, too large or outside the dataset root."""


def resolve_under(root: str | Path, path: str | Path) -> Path:
    """Resolve the relative `path` under the dataset `root`, rejecting anything that escapes it.

    Symlinks are followed before the check, so a link inside the root pointing outside is
    rejected too. Returns the resolved absolute path (which need not exist).

    Raises:
        DataError: if `path` is absolute, resolves outside `root`, or cannot be resolved at all
            (a symlink loop, a NUL byte, a name longer than the file system allows).
    """
    rel = Path(path)
    if rel.is_absolute():
        raise DataError(f"path {short_repr(str(path))} is absolute; dataset paths must be relative to the root {root}")
    try:
        base = Path(root).resolve()
        full = (base / rel).resolve()
    except (OSError, RuntimeError, ValueError) as err:
        # Python 3.11 raises RuntimeError for a symlink loop and ValueError for an embedded NUL.
        reason = err.strerror if isinstance(err, OSError) else clip(err)
        raise DataError(f"path {short_repr(str(path))} cannot be resolved under {root}: {reason}") from err
    if not full.is_relative_to(base):
        raise DataError(f"path {short_repr(str(path))} escapes the dataset root {base} (resolves to {clip(full)})")
    return full


def check_image_file(path: Path) -> Path:
    """Return `path` if it is a non-empty regular file, else raise `DataError` saying what it is.

    Readers call this when listing samples, so a directory named `x.png`, an empty file or an
    unreadable entry is skipped there, naming the record, instead of failing later in a worker.
    """
    try:
        info = path.stat()
    except FileNotFoundError as err:
        raise DataError(f"image file {clip(path)} not found") from err
    except (OSError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) else err
        raise DataError(f"image file {clip(path)} cannot be accessed: {reason}") from err
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"image file {clip(path)} is not a regular file (a directory or device)")
    if info.st_size == 0:
        raise DataError(f"image file {clip(path)} is empty (0 bytes)")
    return path


def load_image(path: str | Path, root: str | Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load an image file as an RGB `PIL.Image`, safely (see the module docstring).

    Args:
        path: image file; relative to `root` when `root` is given.
        root: dataset root the path must stay inside; None trusts `path` as is.
        max_pixels: largest width * height accepted.

    Raises:
        ImageError: naming the file, for any path, size or decoding problem.
    """
    try:
        full = resolve_under(root, path) if root is not None else Path(path)
    except DataError as err:
        raise ImageError(str(err)) from err
    try:
        with open(full, "rb") as handle:
            return _decode(handle, str(full), max_pixels)
    except FileNotFoundError as err:
        raise ImageError(f"{full}: image file not found") from err
    except (OSError, ValueError) as err:
        # A directory, no permission, a name too long, an embedded NUL: all name the file.
        raise ImageError(f"{full}: cannot open image file: {err}") from err


def decode_image(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes (e.g. a WebDataset member) with the same checks as `load_image`.

    `name` identifies the bytes in error messages (e.g. "shard-000000.tar:000042.png").
    """
    return _decode(io.BytesIO(data), name, max_pixels)


def _decode(handle: BinaryIO, name: str, max_pixels: int) -> Image.Image:
    """Open, size-check, fully decode, orient and RGB-convert one image."""
    with warnings.catch_warnings():
        # Our own max_pixels check below replaces Pillow's warning; its hard error (at twice its
        # limit) is still caught and reported as an ImageError.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(handle) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageError(
                        f"{name}: {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels} "
                        "(possible decompression bomb)"
                    )
                image.load()
                return _to_rgb(ImageOps.exif_transpose(image))
        except ImageError:
            raise
        except Image.DecompressionBombError as err:
            raise ImageError(f"{name}: rejected as a decompression bomb: {err}") from err
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise ImageError(f"{name}: cannot decode image: {err}") from err


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited onto white (as transformers does)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        # 16-bit grayscale: Pillow's convert clips to 255, turning most of the image white.
        pixels = np.asarray(image, dtype=np.uint16)
        image = Image.fromarray((pixels // 257).astype(np.uint8), mode="L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class Preprocess:
    """Image → normalized float tensor (3, size, size), matching a transformers image processor.

    Steps, in order: optional pad to square with the mean color (LLaVA's `expand2square`);
    bicubic resize, either of the shortest side to `size` ("shortest", then center crop) or of
    both sides to `size` ("square"); scale to [0, 1]; normalize with `mean`/`std`.

    Use `Preprocess.preset("clip" | "siglip" | "llava", size)` for the standard recipes. (With
    resize="shortest" and center_crop=False the output keeps the aspect: (3, H, W), min(H, W) = size.)
    """

    size: int = 224
    resize: str = "shortest"
    center_crop: bool = True
    pad_to_square: bool = False
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self):
        if self.resize not in ("shortest", "square"):
            raise ValueError(f"Preprocess.resize must be 'shortest' or 'square', got {self.resize!r}")
        if self.size < 1:
            raise ValueError(f"Preprocess.size must be positive, got {self.size}")

    @classmethod
    def preset(cls, name: str, size: int | None = None) -> Preprocess:
        """The recipe of a model family: "clip", "siglip" or "llava" (default size 224)."""
        size = 224 if size is None else size
        if name == "clip":
            return cls(size=size)
        if name == "siglip":
            return cls(size=size, resize="square", center_crop=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        if name == "llava":
            return cls(size=size, pad_to_square=True)
        raise ValueError(f"unknown preprocessing preset {name!r}; expected one of {PRESETS}")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Preprocess one image (any mode); returns float32 (3, size, size) (see the class note)."""
        image = _to_rgb(image)
        if self.pad_to_square:
            # transformers' LLaVA processor uses int(m * 255) (floor) for the fill color.
            image = pad_to_square(image, tuple(int(m * 255) for m in self.mean))
        width, height = image.size
        if self.resize == "square":
            image = image.resize((self.size, self.size), Image.BICUBIC)
        else:
            short, long = min(width, height), max(width, height)
            # Floor, as transformers' get_resize_output_image_size does (int(size * long / short)).
            new_long = int(self.size * long / short)
            target = (self.size, new_long) if width <= height else (new_long, self.size)
            image = image.resize(target, Image.BICUBIC)
        if self.center_crop:
            width, height = image.size
            left, top = (width - self.size) // 2, (height - self.size) // 2
            # PIL fills out-of-bounds areas with black, which is exactly transformers' zero padding.
            image = image.crop((left, top, left + self.size, top + self.size))
        # Go channels-first on the uint8 pixels, once: per-channel arithmetic over a trailing
        # axis of 3 (or on a permuted view) is an order of magnitude slower.
        pixels = np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))  # (3, H, W)
        pixels = pixels.astype(np.float32) / 255.0
        pixels -= np.asarray(self.mean, np.float32)[:, None, None]
        pixels /= np.asarray(self.std, np.float32)[:, None, None]
        return torch.from_numpy(pixels)


PRESETS = ("clip", "siglip", "llava")


def preprocess(image: Image.Image, preset: str = "clip", size: int | None = None) -> torch.Tensor:
    """Preprocess `image` with a named preset; returns float32 (3, size, size). See `Preprocess`."""
    return Preprocess.preset(preset, size)(image)


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad an RGB image to a square of its longest side, centered, with color `fill`."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new("RGB", (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def select_grid(image_size: tuple[int, int], candidate_grids: Sequence[tuple[int, int]], tile: int) -> tuple[int, int]:
    """Pick the grid of `tile`-pixel squares that best fits an image (LLaVA-NeXT's rule).

    Args:
        image_size: (width, height) of the image, as PIL's `Image.size`.
        candidate_grids: allowed grids as (rows, cols), e.g. [(1, 2), (2, 1), (2, 2)].
        tile: side of one square tile in pixels.

    Returns:
        the (rows, cols) grid where the image, scaled to fit without distortion, keeps the most
        of its original pixels (capped at the original count: upscaling gains nothing); ties go
        to the grid wasting the least canvas area.
    """
    if not candidate_grids:
        raise ValueError("select_grid: candidate_grids is empty")
    width, height = image_size
    best, best_key = None, None
    for rows, cols in candidate_grids:
        if rows < 1 or cols < 1:
            raise ValueError(f"select_grid: grid {(rows, cols)} must have positive rows and cols")
        canvas_w, canvas_h = cols * tile, rows * tile
        scale = min(canvas_w / width, canvas_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = canvas_w * canvas_h - kept
        key = (kept, -wasted)
        if best_key is None or key > best_key:
            best, best_key = (rows, cols), key
    return best


def tile_image(
    image: Image.Image, grid: tuple[int, int], tile: int, fill: tuple[int, int, int] = (0, 0, 0)
) -> list[Image.Image]:
    """Split an image into a `grid` of `tile`×`tile` crops, preceded by a base view.

    The image is resized (bicubic, aspect kept) to fit the grid's canvas and padded centered with
    `fill`; the result is cut row-major. Returns `[base, tile_00, tile_01, ...]` where `base` is
    the whole image resized to `tile`×`tile`: 1 + rows * cols PIL images, all `tile`×`tile`.
    """
    rows, cols = grid
    image = _to_rgb(image)
    width, height = image.size
    canvas_w, canvas_h = cols * tile, rows * tile
    scale = min(canvas_w / width, canvas_h / height)
    new_w = min(math.ceil(width * scale), canvas_w)
    new_h = min(math.ceil(height * scale), canvas_h)
    canvas = Image.new("RGB", (canvas_w, canvas_h), fill)
    canvas.paste(image.resize((new_w, new_h), Image.BICUBIC), ((canvas_w - new_w) // 2, (canvas_h - new_h) // 2))
    views = [image.resize((tile, tile), Image.BICUBIC)]
    for r in range(rows):
        for c in range(cols):
            views.append(canvas.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)))
    return views
