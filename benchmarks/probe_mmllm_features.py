"""What an MM-LLM's image tokens carry: linear probes for color and shape on single-object scenes.

For each shapes-world scene with one object, the projected image token of the object's grid
cell (9-token models: one token per cell) is the feature; a logistic-regression probe trained on
train scenes is scored on val scenes. A high probe accuracy with a low VQA accuracy means the
LM does not use what the vision side provides; a low one means the vision side lacks it.

Usage: python benchmarks/probe_mmllm_features.py CHECKPOINT [--train 1500] [--val 300]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from polymodal.api import load
from polymodal.data.conversation import ImageProcessor
from polymodal.data.world import COLORS, SHAPES, World


@torch.no_grad()
def cell_features(model, processor: ImageProcessor, split: str, n: int):
    """(features (n, D) of the object's cell token, color labels (n,), shape labels (n,))."""
    if model.image_tokens != 9:
        raise ValueError(f"the probe needs one image token per 3x3 grid cell, the model has {model.image_tokens}")
    features, colors, shapes = [], [], []
    for scene in World(split, image_size=processor.size, num_objects=(1, 1)).scenes(n):
        obj = scene.objects[0]
        tokens = model.encode_images(processor(scene.image())[None])[0]  # (9, D)
        features.append(tokens[obj.cell[0] * 3 + obj.cell[1]])
        colors.append(list(COLORS).index(obj.color))
        shapes.append(list(SHAPES).index(obj.shape))
    return torch.stack(features), torch.tensor(colors), torch.tensor(shapes)


def probe_accuracy(x_train, y_train, x_val, y_val, classes: int, steps: int = 300) -> float:
    """Val accuracy of a standardised logistic-regression probe fitted with Adam."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    weight = torch.zeros(x_train.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy((x_train - mean) / std @ weight + bias, y_train).backward()
        optimizer.step()
    with torch.no_grad():
        return float((((x_val - mean) / std @ weight + bias).argmax(1) == y_val).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--train", type=int, default=1500)
    parser.add_argument("--val", type=int, default=300)
    args = parser.parse_args()
    model, _ = load(args.checkpoint)
    model.eval()
    processor = ImageProcessor.for_model(model.config)
    x_train, c_train, s_train = cell_features(model, processor, "train", args.train)
    x_val, c_val, s_val = cell_features(model, processor, "val", args.val)
    print(f"image token norm (mean): {x_train.norm(dim=1).mean():.1f}")
    print(f"color probe accuracy: {100 * probe_accuracy(x_train, c_train, x_val, c_val, len(COLORS)):.1f}%")
    print(f"shape probe accuracy: {100 * probe_accuracy(x_train, s_train, x_val, s_val, len(SHAPES)):.1f}%")


if __name__ == "__main__":
    main()
