"""IDX files (the MNIST family's array format) and the Fashion-MNIST data set built on them.

IDX layout (big-endian): two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16,
0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions, then one uint32 per
dimension, then the data in C order. Files are often gzipped; `read_idx` detects gzip from its
magic bytes, not from the name.

Fashion-MNIST (Zalando, 70k 28×28 grayscale clothes images, 10 classes) is a small real image
set that Debian packages: `apt-get install -y dataset-fashion-mnist` puts the four `.gz` files
in `/usr/share/datasets/fashion-mnist`. `FashionMNIST` pairs each image with its label and a
caption "a photo of a {class name, lowercased}", for classification and contrastive smoke tests on real
pixels.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from polymodal.data.loading import DataError

IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
GZIP_MAGIC = b"\x1f\x8b"

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw or gzipped) into a native-endian numpy array of its declared shape.

    Raises:
        DataError: naming the file, for a bad magic number, unknown type code, zero dimensions,
            a truncated or over-long body, or a corrupt gzip stream.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except FileNotFoundError as err:
        raise DataError(f"{path}: IDX file not found") from err
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: corrupt gzip stream: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (magic must start with two zero bytes, got {raw[:4].hex()})")
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX type code 0x{code:02x}; expected one of {[hex(c) for c in IDX_DTYPES]}")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header: {ndim} dimensions need {header} bytes, file has {len(raw)}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    body = len(raw) - header
    if body != expected:
        problem = "truncated" if body < expected else "has trailing bytes"
        raise DataError(f"{path}: {problem}: shape {shape} of {dtype.name} needs {expected} data bytes, found {body}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def fashion_mnist_dir() -> Path:
    """Folder holding the Fashion-MNIST `.gz` files: `$POLYMODAL_FASHION_MNIST` or Debian's path.

    Raises:
        FileNotFoundError: telling how to install the data if the files are not there.
    """
    folder = Path(os.environ.get("POLYMODAL_FASHION_MNIST", FASHION_MNIST_DIR))
    missing = [name for pair in FASHION_MNIST_FILES.values() for name in pair if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files {missing} not found in {folder}. Install Debian's package with "
            "`apt-get install -y dataset-fashion-mnist` (it writes /usr/share/datasets/fashion-mnist), "
            "or point $POLYMODAL_FASHION_MNIST at a folder holding the four .gz files."
        )
    return folder


@dataclass
class FashionMNISTRecord:
    """One Fashion-MNIST sample: image uint8 (28, 28), label in [0, 10), caption."""

    image: np.ndarray
    label: int
    caption: str


class FashionMNIST(torch.utils.data.Dataset):
    """Map-style Fashion-MNIST: `ds[i] -> FashionMNISTRecord` (image uint8 (28, 28), label, caption).

    The whole split is decoded once into one uint8 array (47 MB for train); records are views.

    Args:
        split: "train" (60,000 samples) or "test" (10,000).
        root: folder of the `.gz` files (default: `fashion_mnist_dir()`).
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(self, split: str = "train", root: str | Path | None = None):
        if split not in FASHION_MNIST_FILES:
            raise ValueError(f"FashionMNIST: split must be one of {list(FASHION_MNIST_FILES)}, got {split!r}")
        folder = Path(root) if root is not None else fashion_mnist_dir()
        image_file, label_file = (folder / name for name in FASHION_MNIST_FILES[split])
        self.images = read_idx(image_file)
        self.labels = read_idx(label_file)
        if self.images.ndim != 3 or self.images.shape[1:] != (28, 28) or self.images.dtype != np.uint8:
            raise DataError(
                f"{image_file}: expected uint8 images of shape (N, 28, 28), got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.shape != (len(self.images),):
            raise DataError(f"{label_file}: {self.labels.shape} labels for {len(self.images)} images in {image_file}")
        if len(self.labels) and int(self.labels.max()) >= len(self.classes):
            raise DataError(f"{label_file}: label {int(self.labels.max())} out of range [0, {len(self.classes)})")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> FashionMNISTRecord:
        label = int(self.labels[index])
        return FashionMNISTRecord(image=self.images[index], label=label, caption=caption_for(label))


def caption_for(label: int) -> str:
    """The caption of Fashion-MNIST class `label`: "a photo of a {class name, lowercased}"."""
    return f"a photo of a {FASHION_MNIST_CLASSES[label].lower()}"
