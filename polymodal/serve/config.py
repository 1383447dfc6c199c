"""What a server may be asked, in one place: every limit, its default and why.

Each limit turns a request into an OpenAI-style error before it costs the model any work:
413 for a body over `max_body_bytes` (checked on Content-Length and again on the bytes as
they arrive), 400 for an image over `max_image_pixels` (read from the image header, before the
pixels are decoded: the decompression-bomb check), for more than `max_images` images in one
request or for a prompt that, with its `max_tokens`, does not fit the model's context, and 429
when `max_queue` requests already wait for the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from polymodal.errors import UsageError

DEFAULT_HOST = "127.0.0.1"  # loopback: a server is reachable from elsewhere only when told so
DEFAULT_PORT = 8000


@dataclass
class ServeConfig:
    """The server's settings (`polymodal serve` options map onto these fields one to one).

    model_name: the id clients name in `model` (default: the checkpoint's folder name).
    api_key: when set, every /v1 route and /metrics need `Authorization: Bearer <api_key>`.
    max_batch: most sequences (choices) decoded together; 1 turns batching off.
    max_queue: most requests waiting for the batch; one more is answered 429 at once.
    timeout_s: a request not answered within this many seconds (queueing included) fails with 504.
    max_body_bytes: largest request body (413 above it). TGI caps at 2 MB; ours leaves room for a few
        base64 photos (base64 adds a third).
    max_image_pixels: largest width * height of an input image (a 50-megapixel PNG can be a few KB).
    max_images: most images in one request.
    image_root: folder `file://` image URLs must stay inside; None refuses `file://` URLs.
    default_max_tokens: reply length when a request gives no max_tokens (cut to the context left).
    max_n: most choices (n) per request; max_image_n: most images per generation request.
    """

    model_name: str = "model"
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    timeout_s: float = 120.0
    max_body_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 16 * 1024 * 1024
    max_images: int = 4
    image_root: Path | None = None
    default_max_tokens: int = 256
    max_n: int = 8
    max_image_n: int = 4

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_body_bytes", "max_image_pixels", "max_n", "max_image_n",
                     "default_max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"serve: {name} must be an integer >= 1, got {value!r}")
        if isinstance(self.max_images, bool) or not isinstance(self.max_images, int) or self.max_images < 0:
            raise UsageError(f"serve: max_images must be an integer >= 0, got {self.max_images!r}")
        if not self.timeout_s > 0:
            raise UsageError(f"serve: timeout_s must be a number > 0, got {self.timeout_s!r}")
        if self.api_key is not None and not self.api_key:
            raise UsageError("serve: the API key must not be empty")
        if self.image_root is not None:
            root = Path(self.image_root)
            if not root.is_dir():
                raise UsageError(f"serve: --image-root {root} is not a folder")
            self.image_root = root.resolve()
