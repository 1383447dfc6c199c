"""IDX reader (synthetic and broken files) and the real Fashion-MNIST files from Debian."""

import gzip
import struct

import numpy as np
import pytest

from polymodal.data.formats import (
    FASHION_MNIST_CLASSES,
    FashionMNIST,
    fashion_mnist_dir,
    read_idx,
)
from polymodal.data.loading import DataError


def _idx(array: np.ndarray, code: int) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize(
    "dtype,code", [(np.uint8, 0x08), (np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D), (np.float64, 0x0E)]
)
def test_read_idx_roundtrip_raw_and_gzip(tmp_path, dtype, code):
    array = (
        (np.arange(2 * 3 * 4) - 7).reshape(2, 3, 4).astype(dtype)
        if dtype != np.uint8
        else np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    )
    raw = tmp_path / "a.idx"
    raw.write_bytes(_idx(array, code))
    gz = tmp_path / "a.idx.gz"
    gz.write_bytes(gzip.compress(_idx(array, code)))
    for path in (raw, gz):
        out = read_idx(path)
        assert out.dtype == np.dtype(dtype) and out.shape == (2, 3, 4)
        assert np.array_equal(out, array)


def test_read_idx_errors_name_the_file(tmp_path):
    good = _idx(np.zeros((4, 5), np.uint8), 0x08)
    cases = {
        "magic.idx": (b"\x01\x00" + good[2:], "not an IDX file"),
        "code.idx": (good[:2] + b"\x07" + good[3:], "unknown IDX type code 0x07"),
        "short.idx": (good[:-3], r"truncated: shape \(4, 5\) of uint8 needs 20 data bytes, found 17"),
        "long.idx": (good + b"\x00", "has trailing bytes"),
        "header.idx": (good[:6], "truncated header"),
        "gz.idx": (gzip.compress(good)[:-10], "corrupt gzip stream"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=f"{name}: {message}"):
            read_idx(tmp_path / name)
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "absent.idx")


def test_real_fashion_mnist_files():
    folder = fashion_mnist_dir()
    images = read_idx(folder / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(folder / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and np.bincount(labels).tolist() == [1000] * 10  # balanced test split
    test = FashionMNIST("test")
    assert len(test) == 10000 and len(FASHION_MNIST_CLASSES) == 10
    record = test[0]
    assert record.image.shape == (28, 28) and record.label == int(labels[0])
    assert record.caption == f"a photo of a {FASHION_MNIST_CLASSES[record.label].lower()}"
    assert 0 < record.image.mean() < 255  # real pixels, not an empty array


def test_fashion_mnist_missing_tells_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYMODAL_FASHION_MNIST", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        FashionMNIST("train")
    with pytest.raises(ValueError, match="split must be one of"):
        FashionMNIST("validation", root=tmp_path)
