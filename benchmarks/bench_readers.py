"""Samples per second through each data reader, on a shapes-world export and on Fashion-MNIST.

    python benchmarks/bench_readers.py [--n 300] [--image-size 64] [--repeats 3]

For each format the world is exported once into a temporary folder, then read `--repeats` times;
the best pass is reported (the first pass warms the page cache). "records" only parses the index
(paths, captions, messages); "+decode" also decodes every image with the safe loader, which is
what a training loop pays. WebDataset always decodes. Fashion-MNIST reports the one-off decoding
of the gzipped IDX files and then record access, and the CLIP preset (224 px) is timed on its
images as a preprocessing reference.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from PIL import Image

from polymodal.data.export import export_world
from polymodal.data.formats import (
    CocoCaptionsReader,
    FashionMNIST,
    ImageFolderReader,
    LlavaReader,
    WebDatasetReader,
)
from polymodal.data.image import load_image, preprocess


def best_rate(make: Callable[[], Iterable], repeats: int) -> tuple[float, int]:
    """Best samples/second over `repeats` full passes of `make()`, and the sample count."""
    best, count = 0.0, 0
    for _ in range(repeats):
        start = time.perf_counter()
        count = sum(1 for _ in make())
        best = max(best, count / (time.perf_counter() - start))
    return best, count


def decoded(records: Iterable, paths: Callable) -> Iterable:
    """Records with every image decoded (and dropped), as a training loop would."""
    for record in records:
        for path in paths(record):
            load_image(path)
        yield record


def main() -> None:
    """Run every reader and print one line per measurement."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="scenes per export")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}, n={args.n}, "
          f"image_size={args.image_size}, best of {args.repeats}")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = {f: Path(tmp) / f for f in ("llava", "coco", "webdataset", "folder")}
        targets = {f: export_world(f, out[f], args.n, image_size=args.image_size, shard_size=100) for f in out}

        def coco(per_caption: bool = False) -> CocoCaptionsReader:
            return CocoCaptionsReader(targets["coco"], image_root=out["coco"] / "images", per_caption=per_caption)

        cases = {
            "llava records": lambda: LlavaReader(targets["llava"]),
            "llava +decode": lambda: decoded(LlavaReader(targets["llava"]), lambda r: r.images),
            "coco records": coco,
            "coco +decode": lambda: decoded(coco(), lambda r: [r.image]),
            "coco per-caption pairs": lambda: coco(per_caption=True),
            "webdataset (decodes)": lambda: WebDatasetReader(targets["webdataset"]),
            "folder records": lambda: ImageFolderReader(targets["folder"]),
            "folder +decode": lambda: decoded(ImageFolderReader(targets["folder"]), lambda r: [r.image]),
        }
        for name, make in cases.items():
            rows.append((name, *best_rate(make, args.repeats)))

    start = time.perf_counter()
    train = FashionMNIST("train")
    load_s = time.perf_counter() - start
    rows.append((f"fashion-mnist train: read_idx of 60k images ({load_s:.2f} s)", len(train) / load_s, len(train)))
    rows.append(("fashion-mnist records", *best_rate(lambda: (train[i] for i in range(len(train))), args.repeats)))
    images = [Image.fromarray(train[i].image).convert("RGB") for i in range(500)]
    rows.append(
        ("clip preset 28px -> 224px", *best_rate(lambda: (preprocess(im, "clip") for im in images), args.repeats))
    )

    width = max(len(name) for name, _, _ in rows)
    for name, rate, count in rows:
        print(f"{name:<{width}}  {rate:>12,.0f} samples/s  ({count} samples)")


if __name__ == "__main__":
    main()
