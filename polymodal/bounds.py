"""The bounds every config dataclass is checked against before anything is built.

Validate before you allocate: a config.json, a YAML recipe or an imported Hugging Face config may
carry any number, and a layer count of 10**9 would make even a shapes-only build on the `meta`
device create 10**9 module objects. So each config's `__post_init__` checks its fields with the
helpers below, which raise `ConfigError` with one line naming the class, the field, the allowed
range and the value: "DecoderConfig.num_layers must be in [1, 1024], got 1000000000".

The ceilings are deliberately generous. They are not a statement about which models make sense,
only a guard against absurd or hostile values, so every real model fits far below them. For
scale, from the published configs:
  Llama-3.1-405B   126 layers, width 16384, MLP 53248, 128 heads (8 KV), vocab 128256, 131072 positions
  Qwen2-72B        80 layers, width 8192, MLP 29568, 64 heads (8 KV), vocab 152064
  Nemotron-4-340B  96 layers, width 18432, MLP 73728 (4x): why MLP widths get their own ceiling
  Gemma            vocab 256000, head_dim 256
  CLIP ViT-bigG/14 48 layers, width 1664, MLP 8192, 16 heads, 224 px
  SigLIP so400m    27 layers, width 1152, MLP 4304, 16 heads, 384 px at patch 14 (729 patches)
  Llama 4 Scout    a 10M-token context: why positions go to 2**24 rather than 2**22
"""
from __future__ import annotations

import math
from numbers import Integral, Real

from polymodal.errors import ConfigError

MAX_LAYERS = 1024  # transformer layers, conv stages and blocks, MLP depth
MAX_WIDTH = 65536  # hidden sizes, head dims, channel counts, projection sizes, LoRA rank
MAX_INTERMEDIATE = 2 ** 18  # MLP hidden widths: 4x the widest real model's 4x MLP
MAX_HEADS = 1024  # attention heads
MAX_VOCAB = 2 ** 22  # token vocabularies, token-type and class counts
MAX_POSITIONS = 2 ** 24  # position tables, context lengths, tokens per image
MAX_IMAGE_SIZE = 16384  # native image side in pixels
MAX_IMAGE_CHANNELS = 1024  # input channels: RGB is 3, multispectral a few hundred
MAX_KERNEL_SIZE = 128  # convolution kernels and strides (the largest published kernels are ~51)
MAX_EXPAND_RATIO = 64  # inverted-residual expansion (MobileNet / EfficientNet use 1, 4 or 6)
MAX_STEPS = 10 ** 9  # training steps and step intervals


def check_int(owner: str, name: str, value, low: int, high: int) -> None:
    """Raise `ConfigError` unless `value` is an integer (not a bool) in [low, high]."""
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise ConfigError(f"{owner}.{name} must be an integer in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{owner}.{name} must be in [{low}, {high}], got {value}")


def check_float(owner: str, name: str, value, low: float, high: float = math.inf, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise `ConfigError` unless `value` is a finite real number in the interval low..high.

    low_open / high_open exclude the ends; infinite ends are always excluded (NaN and inf never
    pass: a NaN eps or learning rate would only show up later, as NaN losses)."""
    low_open, high_open = low_open or math.isinf(low), high_open or math.isinf(high)
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if not isinstance(value, Real) or isinstance(value, bool):
        raise ConfigError(f"{owner}.{name} must be a finite number in {interval}, got {value!r}")
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):
        raise ConfigError(f"{owner}.{name} must be a finite number in {interval}, got {value}")


def check_multiple(owner: str, name: str, value: int, divisor_name: str, divisor: int) -> None:
    """Raise `ConfigError` unless `value` (field `name`) is a multiple of `divisor` (field `divisor_name`)."""
    if value % divisor:
        raise ConfigError(f"{owner}.{name} ({value}) must be a multiple of {divisor_name} ({divisor})")


def check_transformer_sizes(owner: str, config, min_layers: int = 1) -> None:
    """Check a transformer config's hidden_size, num_layers, num_heads (hidden_size a multiple of
    it) and intermediate_size against the bounds above, in that order."""
    check_int(owner, "hidden_size", config.hidden_size, 1, MAX_WIDTH)
    check_int(owner, "num_layers", config.num_layers, min_layers, MAX_LAYERS)
    check_int(owner, "num_heads", config.num_heads, 1, MAX_HEADS)
    check_multiple(owner, "hidden_size", config.hidden_size, "num_heads", config.num_heads)
    check_int(owner, "intermediate_size", config.intermediate_size, 1, MAX_INTERMEDIATE)


def check_token_id(owner: str, name: str, value, vocab_size: int) -> None:
    """Raise `ConfigError` unless `value` is None or a token id of a `vocab_size` vocabulary."""
    if value is not None:
        check_int(owner, name, value, 0, vocab_size - 1)


def check_length(owner: str, name: str, value, low: int, high: int) -> None:
    """Raise `ConfigError` unless `value` is a list or tuple of low..high items."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{owner}.{name} must be a list, got {value!r}")
    if not low <= len(value) <= high:
        count = f"{low}" if low == high else f"{low} to {high}"
        raise ConfigError(f"{owner}.{name} must have {count} items, got {len(value)}")
