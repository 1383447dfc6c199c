"""Shared fixtures for the data tests: small "real-ish" images written to disk."""

import numpy as np
import pytest
from PIL import Image


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image with smooth gradients, a bright disc and sensor-like noise (not flat color)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack([xx / width, yy / height, 0.5 + 0.5 * np.sin((xx + yy) / 9.0)], axis=-1) * 200
    disc = ((xx - width * 0.6) ** 2 + (yy - height * 0.4) ** 2) < (min(width, height) * 0.25) ** 2
    base[disc] = [230, 200, 40]
    pixels = base + rng.normal(0, 12, base.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), mode="RGB")


@pytest.fixture
def make_photo():
    """Factory fixture: `make_photo(width, height, seed)` -> RGB PIL image."""
    return photo_like
