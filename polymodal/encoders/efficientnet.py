"""EfficientNet-Lite CNN image encoder (Tan & Le, 2019; the "Lite" variants of the TF model zoo).

Lite is EfficientNet-B0's MBConv layout made friendly to integer accelerators: no
squeeze-excite, ReLU6 instead of swish, and a stem (32 channels) and head (1280 channels) that
stay fixed when the network is scaled. A block is: 1x1 expand conv (skipped when the expansion
ratio is 1) -> k x k depthwise conv (stride s) -> 1x1 linear projection, each followed by
BatchNorm, with a residual connection when the block keeps shape. Convolutions pad as
TensorFlow's "SAME" (asymmetric for stride 2 on even inputs) because the published weights were
trained that way; PyTorch's symmetric padding would shift every stride-2 feature map by a pixel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from polymodal.bounds import (
    MAX_EXPAND_RATIO,
    MAX_IMAGE_CHANNELS,
    MAX_IMAGE_SIZE,
    MAX_KERNEL_SIZE,
    MAX_LAYERS,
    MAX_VOCAB,
    MAX_WIDTH,
    check_float,
    check_int,
    check_length,
)
from polymodal.errors import ConfigError

# (expand_ratio, kernel, stride, in_channels, out_channels, repeats) per stage: EfficientNet-B0,
# which Lite0 keeps unscaled (width and depth multipliers 1.0).
LITE0_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)


@dataclass
class EfficientNetConfig:
    """EfficientNet-Lite sizes (defaults: Lite0, 224 px, 1000 ImageNet classes).

    stages: (expand_ratio, kernel, stride, in_channels, out_channels, repeats) per stage.
    num_classes: 0 drops the classifier (feature extractor only).
    pixel_mean / pixel_std: the normalisation the weights expect, applied by `normalize`; the
    Lite models were trained on (x - 127) / 128 of 0..255 pixels (TF `efficientnet_lite_builder`
    MEAN_RGB / STDDEV_RGB), i.e. roughly [-1, 1].
    """

    stages: list = field(default_factory=lambda: [list(s) for s in LITE0_STAGES])
    in_channels: int = 3
    stem_channels: int = 32
    head_channels: int = 1280
    num_classes: int = 1000
    bn_eps: float = 1e-3
    dropout: float = 0.2
    image_size: int = 224
    pixel_mean: tuple = (127 / 255,) * 3
    pixel_std: tuple = (128 / 255,) * 3

    def __post_init__(self) -> None:
        """Check every size against `polymodal.bounds` before anything is built."""
        owner = "EfficientNetConfig"
        check_int(owner, "in_channels", self.in_channels, 1, MAX_IMAGE_CHANNELS)
        check_int(owner, "stem_channels", self.stem_channels, 1, MAX_WIDTH)
        check_int(owner, "head_channels", self.head_channels, 1, MAX_WIDTH)
        check_int(owner, "num_classes", self.num_classes, 0, MAX_VOCAB)
        check_float(owner, "bn_eps", self.bn_eps, 0, 1, low_open=True)
        check_float(owner, "dropout", self.dropout, 0, 1, high_open=True)
        check_int(owner, "image_size", self.image_size, 1, MAX_IMAGE_SIZE)
        check_length(owner, "pixel_mean", self.pixel_mean, self.in_channels, self.in_channels)
        check_length(owner, "pixel_std", self.pixel_std, self.in_channels, self.in_channels)
        for i, (mean, std) in enumerate(zip(self.pixel_mean, self.pixel_std)):
            check_float(owner, f"pixel_mean[{i}]", mean, -math.inf)
            check_float(owner, f"pixel_std[{i}]", std, 0, low_open=True)  # `normalize` divides by it
        self._check_stages(owner)

    def _check_stages(self, owner: str) -> None:
        """Each stage is 6 bounded integers, chained: its in_channels are the previous stage's out."""
        check_length(owner, "stages", self.stages, 1, MAX_LAYERS)
        ceilings = {"expand_ratio": MAX_EXPAND_RATIO, "kernel": MAX_KERNEL_SIZE, "stride": MAX_KERNEL_SIZE,
                    "in_channels": MAX_WIDTH, "out_channels": MAX_WIDTH, "repeats": MAX_LAYERS}
        channels = self.stem_channels
        for i, stage in enumerate(self.stages):
            check_length(owner, f"stages[{i}]", stage, len(ceilings), len(ceilings))
            for (name, ceiling), value in zip(ceilings.items(), stage):
                check_int(owner, f"stages[{i}].{name}", value, 1, ceiling)
            if stage[3] != channels:
                raise ConfigError(f"{owner}.stages[{i}].in_channels must be {channels} (the previous stage's "
                                  f"out_channels, or stem_channels), got {stage[3]}")
            channels = stage[4]
        blocks = sum(stage[5] for stage in self.stages)  # one module per repeat
        if blocks > MAX_LAYERS:
            raise ConfigError(f"{owner}.stages must hold at most {MAX_LAYERS} blocks in all, got {blocks}")


@dataclass
class EfficientNetOutput:
    """last_hidden_state (B, h*w, C_head): the final feature map as tokens; pooler_output (B, C_head);
    logits (B, num_classes) or None."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    logits: torch.Tensor | None = None


def same_padding(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Zero-pad x (B, C, H, W) as TF "SAME": output size ceil(H / stride), extra pixel at the bottom/right."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dim first
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class ConvNormAct(nn.Module):
    """conv (no bias, TF-SAME padding) -> BatchNorm -> ReLU6 (or none). (B, C_in, H, W) -> (B, C_out, H/s, W/s)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
                 eps: float = 1e-3, act: bool = True):
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, groups=groups, bias=False)
        self.norm = nn.BatchNorm2d(out_ch, eps=eps)
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(same_padding(x, self.kernel, self.stride))))


class MBConv(nn.Module):
    """Inverted-residual block without squeeze-excite. (B, C_in, H, W) -> (B, C_out, H/s, W/s)."""

    def __init__(self, expand_ratio: int, kernel: int, stride: int, in_ch: int, out_ch: int, eps: float):
        super().__init__()
        hidden = in_ch * expand_ratio
        self.expand = ConvNormAct(in_ch, hidden, 1, eps=eps) if expand_ratio != 1 else None
        self.depthwise = ConvNormAct(hidden, hidden, kernel, stride, groups=hidden, eps=eps)
        self.project = ConvNormAct(hidden, out_ch, 1, eps=eps, act=False)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


class EfficientNet(nn.Module):
    """pixel_values (B, 3, H, W), already normalised (see `normalize`) -> EfficientNetOutput.

    Any H, W work (global average pooling); the weights were trained at `config.image_size`.
    """

    family = "efficientnet"

    def __init__(self, config: EfficientNetConfig):
        super().__init__()
        self.config = c = config
        self.stem = ConvNormAct(c.in_channels, c.stem_channels, 3, 2, eps=c.bn_eps)
        blocks = []
        for expand, kernel, stride, in_ch, out_ch, repeats in c.stages:
            for i in range(repeats):
                # Only a stage's first block changes stride and width.
                blocks.append(MBConv(expand, kernel, stride if i == 0 else 1, in_ch if i == 0 else out_ch, out_ch,
                                     c.bn_eps))
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvNormAct(c.stages[-1][4], c.head_channels, 1, eps=c.bn_eps)
        self.dropout = nn.Dropout(c.dropout)
        self.classifier = nn.Linear(c.head_channels, c.num_classes) if c.num_classes else None

    @property
    def hidden_size(self) -> int:
        """Width of the pooled feature (1280 for Lite0)."""
        return self.config.head_channels

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> the normalised pixel_values the weights expect."""
        mean = torch.tensor(self.config.pixel_mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.config.pixel_std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        return (images - mean) / std

    def forward(self, pixel_values: torch.Tensor) -> EfficientNetOutput:
        x = self.head(self.blocks(self.stem(pixel_values)))  # (B, C_head, H/32, W/32)
        tokens = x.flatten(2).transpose(1, 2)  # (B, h*w, C_head)
        pooled = tokens.mean(1)  # (B, C_head)
        logits = self.classifier(self.dropout(pooled)) if self.classifier is not None else None
        return EfficientNetOutput(tokens, pooled, logits)


class EfficientNetTower(EfficientNet):
    """EfficientNet-Lite as an image tower of the families that feed [-1, 1] pixels: (B, C, H, W) pixels in [-1, 1] -> EfficientNetOutput.

    The family's pixels ((x - 127.5) / 127.5 of 0..255 values) are mapped to the weights' own
    normalisation ((x - 127) / 128, `EfficientNet.normalize`), grayscale (C = 1) is repeated to the
    tower's 3 channels, and other sizes are resized (bilinear) to `config.image_size`, so the same
    recipe and evaluation pixels (e.g. 28 px Fashion-MNIST) feed it. A subclass rather than a
    wrapper: tensor names stay those of `EfficientNet`, which the `.pth` importer maps.
    """

    def forward(self, pixel_values: torch.Tensor) -> EfficientNetOutput:
        x = pixel_values
        if x.shape[1] == 1 and self.config.in_channels != 1:
            x = x.expand(-1, self.config.in_channels, -1, -1)  # (B, 3, H, W)
        size = self.config.image_size
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # (B, 3, S, S)
        return super().forward(self.normalize((x + 1) / 2))
