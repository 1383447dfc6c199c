"""World-feature Fréchet distance (WFD): FID's formula on the features of a small world attribute
classifier instead of Inception's (which is neither available offline nor meaningful here).

The classifier is a `ConvNet` whose flattened-map feature (`FEATURE_DIM` wide) feeds one linear
head per grid cell, predicting that cell's color, shape and size ("empty" included). It is trained
on demand on shapes-world train scenes (about a minute on 2 CPU cores) and cached under
`$POLYMODAL_CACHE` (default `~/.cache/polymodal`) as safetensors, one per image size. WFD is the
Fréchet distance between Gaussians fitted to the features of generated images and of the
rendered scenes their prompts describe: 0 for identical feature statistics; lower is closer.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from polymodal.data.world.objects import COLORS, SHAPES, SIZES
from polymodal.encoders.convnet import ConvNet, ConvNetConfig

VERSION = 1
FEATURE_DIM = 64
CELLS = 9
HEADS = {"color": len(COLORS) + 1, "shape": len(SHAPES) + 1, "size": len(SIZES) + 1}  # + "empty"
TRAIN_STEPS, TRAIN_BATCH = 600, 64


class WorldFeatureNet(nn.Module):
    """pixels (B, 3, S, S) in [-1, 1] -> features (B, FEATURE_DIM); `logits` gives per-cell
    {attribute: (B, 9, classes)} for training."""

    def __init__(self, image_size: int):
        super().__init__()
        self.image_size = image_size
        self.encoder = ConvNet(ConvNetConfig(image_size=image_size, widths=[32, 64, FEATURE_DIM], pool="flatten"))
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURE_DIM, CELLS * n) for name, n in HEADS.items()})

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixels).pooler_output

    def logits(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """{attribute: (B, 9, classes)} from the features."""
        features = F.gelu(self(pixels))
        return {name: head(features).view(len(pixels), CELLS, -1) for name, head in self.heads.items()}


def cell_labels(scenes) -> dict[str, torch.Tensor]:
    """{attribute: (B, 9) class ids} of each grid cell (the last class id means "empty")."""
    labels = {name: torch.full((len(scenes), CELLS), n - 1, dtype=torch.long) for name, n in HEADS.items()}
    vocab = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES)}
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            cell = obj.cell[0] * 3 + obj.cell[1]
            for name in HEADS:
                labels[name][i, cell] = vocab[name].index(getattr(obj, name))
    return labels


def _batch(world, index: int, batch: int):
    from polymodal.data.dual_encoder import scene_pixels

    scenes = list(world.scenes(batch, start=index * batch))
    return scene_pixels(scenes), cell_labels(scenes)


def train_world_feature_net(image_size: int, steps: int = TRAIN_STEPS, seed: int = 0) -> WorldFeatureNet:
    """Train the classifier on 1-3-object train scenes (plain backgrounds) at `image_size`."""
    # Callers may evaluate under no_grad; their RNG state is left as it was.
    with torch.enable_grad(), torch.random.fork_rng():
        return _train(image_size, steps, seed)


def _train(image_size: int, steps: int, seed: int) -> WorldFeatureNet:
    from polymodal.data.world import World

    torch.manual_seed(seed)
    net = WorldFeatureNet(image_size)
    world = World("train", image_size=image_size, num_objects=(1, 3), seed=seed + 1)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    for step in range(steps):
        pixels, labels = _batch(world, step, TRAIN_BATCH)
        logits = net.logits(pixels)
        loss = sum(F.cross_entropy(logits[name].flatten(0, 1), labels[name].flatten()) for name in HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return net.eval()


@torch.no_grad()
def cell_accuracy(net: WorldFeatureNet, n: int = 256) -> dict[str, float]:
    """Per-attribute accuracy over all 9 cells of n val scenes (a check that the features see the world)."""
    from polymodal.data.world import World

    pixels, labels = _batch(World("val", image_size=net.image_size, num_objects=(1, 3)), 0, n)
    logits = net.logits(pixels)
    return {name: float((logits[name].argmax(-1) == labels[name]).float().mean()) for name in HEADS}


def _cache_file(image_size: int) -> Path:
    root = Path(os.environ.get("POLYMODAL_CACHE", Path.home() / ".cache" / "polymodal"))
    return root / f"world_features_v{VERSION}_{image_size}px" / "model.safetensors"


def world_feature_net(image_size: int) -> WorldFeatureNet:
    """The cached classifier for `image_size`, trained and cached first if missing (atomically, so
    concurrent processes never read half a file)."""
    from safetensors.torch import load_file, save_file

    path = _cache_file(image_size)
    net = WorldFeatureNet(image_size)
    if path.is_file():
        net.load_state_dict(load_file(str(path)))
        return net.eval()
    print(f"training the world feature classifier for {image_size} px images once (cached in {path.parent})",
          file=sys.stderr, flush=True)
    net = train_world_feature_net(image_size, steps=TRAIN_STEPS)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file(net.state_dict(), str(tmp), metadata={"accuracy": json.dumps(cell_accuracy(net))})
    tmp.replace(path)
    return net


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature rows a (N, D) and b (M, D):
    ||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)) (Heusel et al. 2017)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # a singular product: nudge both covariances, as FID code does
        eps = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


def world_frechet_distance(generated: torch.Tensor, real: torch.Tensor) -> float:
    """WFD between two batches of pixels (N, 3, S, S) in [-1, 1] of one size."""
    net = world_feature_net(generated.shape[-1])
    with torch.no_grad():
        return frechet_distance(net(generated).double().numpy(), net(real).double().numpy())
