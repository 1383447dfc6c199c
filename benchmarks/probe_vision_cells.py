"""What a vision tower's grid-cell tokens carry, before any LM is trained on them.

For shapes-world scenes of 1-3 objects, the tower token of each object's grid cell (towers with
one token per 3x3 cell) is the feature of that object; a linear probe and an MLP probe (one
hidden layer of 256) trained on train scenes are scored on val scenes for the object's shape,
color and size, shape also per size. This compares vision towers for an MM-LLM cheaply:

- "quickstart": the quickstart's tower at its (seed-0) random initialisation, one convolution
  pooled per grid cell (`polymodal.encoders.gridpool`);
- "patch": the quickstart's earlier tower, a ViT patch projection (one 32 px patch per cell, no
  transformer layers) frozen at its random initialisation;
- a `clip`-recipe checkpoint, e.g. the CoCa tower of configs/clip/world_grid.yaml (as an
  MM-LLM's `vision_from` would take it);
- an mmllm checkpoint (its own vision tower).

Usage: python benchmarks/probe_vision_cells.py TOWER [--train 3000] [--val 600]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from probe_mmllm_features import probe_accuracy

from polymodal.data.conversation import ImageProcessor
from polymodal.data.world import COLORS, SHAPES, SIZES, World
from polymodal.models.mmllm import MMLLMConfig, tower_features

ATTRIBUTES = {"shape": list(SHAPES), "color": list(COLORS), "size": list(SIZES)}


def load_tower(source: str) -> tuple[nn.Module, MMLLMConfig]:
    """(vision tower, an MMLLMConfig describing it) for "quickstart", "patch", a clip checkpoint or an mmllm checkpoint."""
    from polymodal.api import load
    from polymodal.encoders.vit import ViTConfig
    from polymodal.models.mmllm import build_vision_tower
    from polymodal.quickstart import stage_config
    from polymodal.recipes.mmllm import vision_tower_from

    if source in ("quickstart", "patch"):
        config = stage_config("align").model
        if source == "patch":
            size = config.image_size
            config = MMLLMConfig(vision=ViTConfig(image_size=size, patch_size=size // 3, hidden_size=192,
                                                  num_layers=0), lm=config.lm, vision_feature_layer=-1)
        torch.manual_seed(0)  # the tower is an MM-LLM's first module, so this is its seed-0 tower
        return build_vision_tower(config).eval(), config
    model, _ = load(source)
    if getattr(model, "family", None) == "mmllm":
        return model.vision.eval(), model.config
    fields, tower = vision_tower_from(source)
    return tower.eval(), MMLLMConfig(**fields, vision_feature_layer=-1)


@torch.no_grad()
def cell_tokens(tower: nn.Module, config: MMLLMConfig, split: str, scenes: int, batch: int = 100):
    """(features (n, D) of each object's cell token, {attribute: labels (n,)}) over `scenes` scenes of `split`."""
    if config.vision_patches != 9:
        raise ValueError(f"the probe needs one token per 3x3 grid cell; this tower gives {config.vision_patches}")
    processor = ImageProcessor.for_model(config)
    world = list(World(split, image_size=config.image_size, num_objects=(1, 3)).scenes(scenes))
    features, labels = [], {name: [] for name in ATTRIBUTES}
    for start in range(0, scenes, batch):
        chunk = world[start:start + batch]
        tokens = tower_features(tower, config, torch.stack([processor(s.image()) for s in chunk]))  # (B, 9, D)
        for scene, cells in zip(chunk, tokens):
            for obj in scene.objects:
                features.append(cells[obj.cell[0] * 3 + obj.cell[1]])
                for name, values in ATTRIBUTES.items():
                    labels[name].append(values.index(getattr(obj, name)))
    return torch.stack(features).float(), {name: torch.tensor(v) for name, v in labels.items()}


def mlp_probe_correct(x_train, y_train, x_val, y_val, classes: int, steps: int = 600) -> torch.Tensor:
    """Per-example correctness (n_val,) of a standardised one-hidden-layer MLP probe fitted full-batch with Adam."""
    torch.manual_seed(0)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    probe = nn.Sequential(nn.Linear(x_train.shape[1], 256), nn.GELU(), nn.Linear(256, classes))
    optimizer = torch.optim.Adam(probe.parameters(), lr=3e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(probe((x_train - mean) / std), y_train).backward()
        optimizer.step()
    with torch.no_grad():
        return probe((x_val - mean) / std).argmax(1) == y_val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tower", help='"quickstart", "patch", a clip-recipe checkpoint or an mmllm checkpoint')
    parser.add_argument("--train", type=int, default=3000, help="train scenes")
    parser.add_argument("--val", type=int, default=600, help="val scenes")
    args = parser.parse_args()
    tower, config = load_tower(args.tower)
    x_train, y_train = cell_tokens(tower, config, "train", args.train)
    x_val, y_val = cell_tokens(tower, config, "val", args.val)
    print(f"{len(x_train)} train / {len(x_val)} val objects, {x_train.shape[1]}-d cell tokens")
    for name, values in ATTRIBUTES.items():
        linear = probe_accuracy(x_train, y_train[name], x_val, y_val[name], len(values))
        correct = mlp_probe_correct(x_train, y_train[name], x_val, y_val[name], len(values))
        line = f"{name:6s} linear {100 * linear:5.1f}%   MLP {100 * correct.float().mean():5.1f}%"
        if name == "shape":
            by_size = [f"{size} {100 * correct[y_val['size'] == i].float().mean():.1f}%" for i, size in enumerate(SIZES)]
            line += "   (MLP by size: " + ", ".join(by_size) + ")"
        print(line)


if __name__ == "__main__":
    main()
