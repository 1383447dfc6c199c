"""When a linear layer's weights may be used directly, outside its own forward."""
from __future__ import annotations

import torch.nn as nn


def plain_linear(*layers: nn.Module) -> bool:
    """True when every layer is a plain `nn.Linear` without hooks, so a fused kernel may use its
    weights directly and skip nothing: no LoRA or other wrapper, no forward (pre-)hook."""
    return all(type(layer) is nn.Linear and not (layer._forward_hooks or layer._forward_pre_hooks)
               for layer in layers)
