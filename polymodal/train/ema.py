"""An exponential moving average of a model's weights (EMA), kept in training checkpoints.

Diffusion models and GANs sample with averaged weights, which are smoother than the last step's.
`EMA` is both a training callback (called after every optimizer step, it updates the average)
and a state object (`state_dict` / `load_state_dict`), so `train(..., state={"ema": ema},
callbacks=[ema])` saves it in every checkpoint and restores it exactly on resume; `copy_to`
writes the averaged weights into a model for sampling or for the final checkpoint.

    shadow <- decay_t * shadow + (1 - decay_t) * weight,   decay_t = min(decay, (1 + t) / (10 + t))
with the warm-up form of decay_t (on by default) so early averages are not dominated by the
random initialisation.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class EMA:
    """The moving average of every floating-point tensor of `module.state_dict()`, in float32.

    decay: the long-run decay in (0, 1); warmup: use the (1 + t) / (10 + t) ramp (see module doc).
    """

    def __init__(self, module: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.module, self.decay, self.warmup = module, decay, warmup
        self.updates = 0
        self.shadow = {name: t.detach().float().clone() for name, t in module.state_dict().items()
                       if t.is_floating_point()}

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        """Move the average one step towards the module's current weights."""
        weight = 1.0 - self.current_decay()
        for name, tensor in self.module.state_dict().items():
            if name in self.shadow:
                shadow = self.shadow[name]
                if shadow.device != tensor.device:  # the module moved (e.g. to the GPU) after the EMA was made
                    shadow = self.shadow[name] = shadow.to(tensor.device)
                shadow.lerp_(tensor.detach().float(), weight)
        self.updates += 1

    def __call__(self, context=None) -> None:
        """As a `train` callback: update after each optimizer step."""
        self.update()

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> nn.Module:
        """Write the averaged weights into `module` (same architecture), cast to its dtypes; returns it."""
        own = module.state_dict()
        for name, shadow in self.shadow.items():
            own[name].copy_(shadow.to(own[name].dtype))
        return module

    def state_dict(self) -> dict:
        """{"decay", "warmup", "updates", "shadow": {name: tensor}} (tensors go to safetensors)."""
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        """Restore an average saved by `state_dict`; its tensor names must be this module's."""
        if set(state["shadow"]) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(state["shadow"]))
            unexpected = sorted(set(state["shadow"]) - set(self.shadow))
            raise ValueError(f"EMA state does not fit the module: missing {missing}, unexpected {unexpected}")
        self.decay, self.warmup, self.updates = state["decay"], state["warmup"], int(state["updates"])
        device = {name: t.device for name, t in self.module.state_dict().items()}
        self.shadow = {name: t.float().to(device[name]).clone() for name, t in state["shadow"].items()}
