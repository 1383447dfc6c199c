"""An exponential moving average of a model's weights (EMA), kept in training checkpoints.

Diffusion models and GANs sample with averaged weights, which are smoother than the last step's.
`EMA` is both a training callback (called after every optimizer step, it updates the average)
and a state object (`state_dict` / `load_state_dict`), so `train(..., state={"ema": ema},
callbacks=[ema])` saves it in every checkpoint and restores it exactly on resume; `copy_to`
writes the averaged weights into a model for sampling or for the final checkpoint.

    shadow <- decay_t * shadow + (1 - decay_t) * weight,   decay_t = min(decay, (1 + t) / (10 + t))
with the warm-up form of decay_t (on by default) so early averages are not dominated by the
random initialisation.

On several processes (`polymodal.distributed`) FSDP2 turns the weights into DTensors, sharded
(fsdp) or replicated (ddp). `match_layout` then gives each average its weight's layout, so every
rank averages only its own shard (no communication per update) and a sharded checkpoint stores
the average in shards like the weights; `copy_to` gathers the whole averages.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor


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
    def match_layout(self) -> None:
        """Give every average the device and layout of its tensor in the module: once FSDP2 made the
        weights DTensors, each average becomes a DTensor of the same mesh and placements holding
        rank 0's values. Collective when a layout changes (every rank calls it); else a no-op."""
        for name, tensor in self.module.state_dict().items():
            if name in self.shadow:
                self.shadow[name] = _laid_out_like(self.shadow[name], tensor)

    @torch.no_grad()
    def update(self) -> None:
        """Move the average one step towards the module's current weights (each rank its own shard)."""
        weight = 1.0 - self.current_decay()
        self.match_layout()  # the module may have moved (e.g. to the GPU) or been sharded since
        for name, tensor in self.module.state_dict().items():
            if name in self.shadow:
                self.shadow[name].lerp_(tensor.detach().float(), weight)
        self.updates += 1

    def __call__(self, context=None) -> None:
        """As a `train` callback: update after each optimizer step."""
        self.update()

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> nn.Module:
        """Write the averaged weights into `module` (same architecture, plain tensors), cast to its
        dtypes; returns it. Collective when the averages are DTensors (every rank calls it)."""
        own = module.state_dict()
        for name, shadow in self.shadow.items():
            whole = shadow.full_tensor() if isinstance(shadow, DTensor) else shadow
            own[name].copy_(whole.to(own[name].dtype))
        return module

    def state_dict(self) -> dict:
        """{"decay", "warmup", "updates", "shadow": {name: tensor}} (tensors go to safetensors; a
        sharded checkpoint stores DTensor averages in shards)."""
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        """Restore an average saved by `state_dict`; its tensor names must be this module's. Whole
        tensors are laid out like the module's weights (collective when those are DTensors)."""
        if set(state["shadow"]) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(state["shadow"]))
            unexpected = sorted(set(state["shadow"]) - set(self.shadow))
            raise ValueError(f"EMA state does not fit the module: missing {missing}, unexpected {unexpected}")
        self.decay, self.warmup, self.updates = state["decay"], state["warmup"], int(state["updates"])
        current = self.module.state_dict()
        self.shadow = {name: _laid_out_like(t.float().clone(), current[name]) for name, t in state["shadow"].items()}


def _laid_out_like(shadow: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """`shadow` on `tensor`'s device and, for a DTensor `tensor`, as a DTensor of its mesh and
    placements (distributed from rank 0's whole values when it is not one already)."""
    if isinstance(tensor, DTensor):
        if isinstance(shadow, DTensor) and (shadow.device_mesh, shadow.placements) == (tensor.device_mesh,
                                                                                      tensor.placements):
            return shadow
        whole = shadow.full_tensor() if isinstance(shadow, DTensor) else shadow
        return distribute_tensor(whole.to(tensor.device), tensor.device_mesh, tensor.placements)
    return shadow if shadow.device == tensor.device else shadow.to(tensor.device)
