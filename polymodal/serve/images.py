"""Images in and out of the server: `image_url` references -> checked PIL images; PIL -> base64 PNG.

A server that fetched any URL it was handed could be made to scan its own network, so only
these references are read:
- `data:image/<type>;base64,<data>`: decoded in memory;
- `file:///path`: only with --image-root, and only inside it (`..` and symlinks out are refused);
- `http(s)://` and everything else: refused with a 400 that says to send a data URL.
Every image goes through `polymodal.data.image`'s checked decoder: the pixel count is read from
the header and compared with the server's limit before any pixel is decoded (the
decompression-bomb check), and a corrupt or truncated file is a 400 naming the message part.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from polymodal.data.image import decode_image, load_image, resolve_under
from polymodal.data.loading import DataError
from polymodal.serve.errors import APIError

_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


def read_image_url(url: str, param: str, max_pixels: int, image_root: Path | None) -> Image.Image:
    """The RGB image an `image_url.url` names (see the module docstring); `param` names the field in errors.

    Raises `APIError` 400 for a refused scheme, bad base64, a file outside the root, an image
    over `max_pixels` or one that does not decode.
    """
    try:
        if url[:5].lower() == "data:":
            return decode_image(_data_url_bytes(url, param), param, max_pixels)
        scheme = urlparse(url).scheme.lower()
        if scheme == "file":
            return _file_image(url, param, max_pixels, image_root)
    except DataError as err:
        raise APIError(400, f"{param}: {_without_prefix(str(err), param)}", param, "invalid_image") from err
    if scheme in ("http", "https"):
        raise APIError(400, f"{param}: this server does not fetch remote URLs; send the image inline as a data URL "
                       "(data:image/png;base64,...)", param, "remote_url_refused")
    shown = url if len(url) <= 40 else url[:40] + "..."
    raise APIError(400, f"{param}: unsupported image URL {shown!r}; send a data URL (data:image/png;base64,...)",
                   param, "invalid_image_url")


def _without_prefix(message: str, param: str) -> str:
    """The decoder's message without the leading name and with Pillow's in-memory file repr dropped."""
    return _BUFFER_REPR.sub("the image data", message.removeprefix(f"{param}: "))


def _data_url_bytes(url: str, param: str) -> bytes:
    """The bytes of a base64 data URL (an image MIME type, or none)."""
    match = _DATA_URL.match(url)
    if match is None:
        raise APIError(400, f"{param}: malformed data URL; expected data:image/<type>;base64,<data>", param,
                       "invalid_image_url")
    mime = (match.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise APIError(400, f"{param}: the data URL holds {mime!r}, not an image", param, "invalid_image_url")
    if not match.group("b64"):
        raise APIError(400, f"{param}: the data URL must be base64-encoded (data:image/png;base64,...)", param,
                       "invalid_image_url")
    try:
        return base64.b64decode(url[match.end():], validate=True)
    except (binascii.Error, ValueError) as err:
        raise APIError(400, f"{param}: the data URL's base64 does not decode: {err}", param, "invalid_image") from err


def _file_image(url: str, param: str, max_pixels: int, image_root: Path | None) -> Image.Image:
    """A `file://` URL's image, read only under `image_root`."""
    if image_root is None:
        raise APIError(400, f"{param}: file:// image URLs are refused unless the server runs with --image-root",
                       param, "file_url_refused")
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise APIError(400, f"{param}: file:// URLs must name a local path", param, "invalid_image_url")
    path = Path(unquote(parsed.path))
    try:
        relative = path.relative_to(image_root) if path.is_absolute() else path
    except ValueError:
        raise APIError(400, f"{param}: {path} is outside the server's --image-root", param,
                       "file_url_refused") from None
    try:
        resolve_under(image_root, relative)  # refuses `..` and symlinks that leave the root
    except DataError:  # its message names server paths: answer with the client's own
        raise APIError(400, f"{param}: {parsed.path} is outside the server's --image-root", param,
                       "file_url_refused") from None
    return load_image(relative, root=image_root, max_pixels=max_pixels)


def png_base64(image: Image.Image) -> str:
    """A PIL image as base64-encoded PNG bytes (OpenAI's `b64_json`)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
