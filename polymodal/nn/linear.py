"""When a linear layer's weights may be used directly, outside its own forward."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.modules.module as module_hooks


def plain_linear(*layers: nn.Module) -> bool:
    """True when every layer is a plain `nn.Linear` and no hook would see it, so a fused kernel may
    use its weights directly and skip nothing: no LoRA or other wrapper, no forward or backward
    hook on the layer, and no global module hook."""
    if (module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks
            or module_hooks._global_backward_hooks or module_hooks._global_backward_pre_hooks):
        return False
    return all(type(layer) is nn.Linear and not (layer._forward_hooks or layer._forward_pre_hooks
                                                 or layer._backward_hooks or layer._backward_pre_hooks)
               for layer in layers)
