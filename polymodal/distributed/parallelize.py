"""`parallelize(model, config, world)`: parallelism, activation checkpointing and compilation,
applied from outside a single-device model (the torchtitan way; the model code never changes).

Order, per block first and then the whole model:
1. the context-parallel hook (`context_parallel(model, world)`): a function the long-context
   work passes in to shard the sequence dimension; applied first so the rest wraps its result;
2. activation checkpointing: "full" recomputes every block's activations in backward,
   "selective" every `checkpoint_every`-th block (memory and recompute traded per block);
   composable `checkpoint`, so parameter names, and thus checkpoints, stay unchanged;
3. `torch.compile` of each block (`Module.compile`: in place, names unchanged);
4. data parallelism on FSDP2, per unit of `shard_units` (the sub-layers of each block) and then
   on the root: "ddp" replicates weights (FSDP2's `replicate`, gradients all-reduced; see
   `_data_parallel` for why not `DistributedDataParallel`), "fsdp" shards them (`fully_shard`),
   both with a bf16-params / fp32-reduce `MixedPrecisionPolicy` where asked. The module keeps
   its class, so objectives call its methods (`output_logits`, `scale`) as on one device.
   Frozen parameters (a frozen vision tower or VAE) are left out of FSDP and kept whole on every
   rank (`frozen="replicate"`) or sharded without gradients (`frozen="shard"`). Scalar
   parameters (CLIP's logit scale), which FSDP2 cannot shard, stay whole on every rank with
   their gradients averaged by a hook. Model methods that objectives call before or instead of
   the forward (`FORWARD_METHODS`: a diffusion model's `encode_text`) gather the root's weights
   as the forward does.

A "block" is an element of a module list: the repeated transformer blocks of the LM and the
towers (`TransformerStack.layers`), the DiT blocks, the U-Net stages. Only the outermost lists
count, so a block is never wrapped inside another block.
"""
from __future__ import annotations

import copy
import warnings
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from polymodal.distributed.config import ParallelConfig
from polymodal.distributed.env import World
from polymodal.errors import ConfigError

ContextParallel = Callable[[nn.Module, World], nn.Module]
# Methods an objective may call before the model's forward, or without it: FSDP2 gathers the
# root's weights (embeddings, heads, norms) only around a forward, so these count as forwards.
FORWARD_METHODS = ("encode_text", "from_pixels")
# False while `set_gradient_sync(model, False)`: the gradient hooks of replicated parameters
# (scalars, side modules) leave gradients on their rank, as FSDP2 does for its units.
_hooks_sync = True


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The model's repeated units: the elements of its outermost `nn.ModuleList`s, in module order."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                found.extend(child)
            else:
                visit(child)

    visit(model)
    return found


def shard_units(model: nn.Module) -> list[nn.Module]:
    """FSDP2's units: the sub-layers of every block (attention, MLP, cross-attention, ...), each
    gathered when called. Normalisation layers stay with the root, which is gathered for the
    whole forward: they are tiny, and some code calls them more than once or from outside their
    block's forward (the pooled-only last ViT block of the contrastive towers runs its block's
    `attn_norm`, `attn` and `mlp` directly), which a per-block unit would not see."""
    units: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                for element in child:
                    visit(element)
            elif "Norm" not in type(child).__name__ and any(True for _ in child.parameters()):
                units.append(child)

    for block in blocks_of(model):
        visit(block)
    return units


def mixed_precision_policy(config: ParallelConfig, device: torch.device):
    """FSDP2's `MixedPrecisionPolicy`: bf16 parameters in compute with fp32 gradient reduction
    for "bf16" ("auto" on CUDA); fp32 everything otherwise. The sharded master weights and the
    optimizer state stay fp32 either way."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if config.mixed_precision == "bf16" or (config.mixed_precision == "auto" and device.type == "cuda"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2) -> list[nn.Module]:
    """Recompute block activations in backward: every block ("full") or every `every`-th
    ("selective"); returns the blocks checkpointed. Losses and gradients are unchanged."""
    from torch.distributed._composable import checkpoint

    if mode == "none":
        return []
    blocks = blocks_of(model)
    chosen = blocks if mode == "full" else blocks[every - 1::every]
    for block in chosen:
        checkpoint(block)
    return chosen


def compile_blocks(model: nn.Module) -> list[nn.Module]:
    """`torch.compile` each block in place (all blocks share one graph: same code, same shapes)."""
    blocks = blocks_of(model)
    for block in blocks:
        block.compile()
    return blocks


def parallelize(model: nn.Module, config: ParallelConfig, world: World | None, *,
                context_parallel: ContextParallel | None = None) -> nn.Module:
    """Apply `config` to `model` (already on its device) and return the module to train.

    world: this process's `World` (None: a plain single process; then only checkpointing and
    compilation apply). context_parallel(model, world) -> model: the sequence-sharding hook.
    The returned module is `model` itself (changed in place) for every strategy, so optimizers,
    callbacks and objectives keep using the model they were given.
    """
    strategy = config.resolved_strategy(world.size if world is not None else 1)
    if strategy != "none" and world is None:
        raise ConfigError(f"train.parallel.strategy={strategy} needs a process group (launch with torchrun)")
    if context_parallel is not None:
        if world is None:
            raise ConfigError("a context-parallel hook needs a process group (launch with torchrun)")
        model = context_parallel(model, world)
    apply_activation_checkpointing(model, config.activation_checkpointing, config.checkpoint_every)
    if config.compile:
        compile_blocks(model)
    if strategy in ("ddp", "fsdp"):
        return _data_parallel(model, config, world, shard=strategy == "fsdp")
    return model


def _data_parallel(model: nn.Module, config: ParallelConfig, world: World, shard: bool) -> nn.Module:
    """FSDP2 `fully_shard` (shard) or its replicating twin `replicate` (DDP) on each unit of
    `shard_units`, then on the root (which holds what no unit holds: embeddings, heads, norms).

    DDP runs on FSDP2's replicate rather than `DistributedDataParallel`: DDP's reducer expects
    every parameter to be used inside `forward`, exactly once, while objectives call model methods
    after it (`output_logits`, CLIP's `scale()`) and some parameters go unused (SigLIP's bias
    under the CLIP loss); FSDP2 reduces each unit's gradients when its backward is done, wherever
    the parameters were used. Weights are broadcast from rank 0 first: FSDP2 does not
    synchronise them, and a rank that built or loaded different weights would silently train a
    different model."""
    from torch.distributed._composable.replicate_with_fsdp import replicate
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    wrap = fully_shard if shard else replicate
    # FSDP2 warns for every unit returning a view, in case the caller modifies it in place; the
    # blocks' residual adds are out of place, which the multi-process parity tests check.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

    _broadcast(model)
    policy = mixed_precision_policy(config, world.device)
    frozen = {p for p in model.parameters() if not p.requires_grad}
    scalars = {p for p in model.parameters() if p.ndim == 0}  # FSDP2 shards along dim 0: a 0-d tensor has none
    for param in scalars - frozen:
        param.register_post_accumulate_grad_hook(_average_gradient)
    ignored = (frozen if config.frozen == "replicate" else set()) | scalars
    for unit in shard_units(model):
        params = set(unit.parameters())
        if params and not params <= ignored:
            wrap(unit, mp_policy=policy, ignored_params=ignored & params or None)
    wrap(model, mp_policy=policy, ignored_params=ignored or None)
    for name in FORWARD_METHODS:
        if callable(getattr(model, name, None)):
            register_fsdp_forward_method(model, name)
    return model


def average_gradients(module: nn.Module) -> nn.Module:
    """Keep a small side module (a VAE's discriminator, trained by the objective) equal on every
    rank without wrapping it: broadcast its weights from rank 0, then average each gradient over
    the ranks as it is accumulated. Its parameters stay plain tensors, checkpointed as extra
    state like in a single process; unbucketed, so meant for modules far smaller than the model."""
    _broadcast(module)
    for param in module.parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(_average_gradient)
    return module


def _broadcast(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor, src=0)


def _average_gradient(param: torch.Tensor) -> None:
    """Average a replicated parameter's gradient over ranks, as FSDP does for the ones it shards
    (SUM then divide: gloo has no AVG); skipped while gradient sync is off (the last micro-batch
    averages the accumulated sum)."""
    if not _hooks_sync:
        return
    dist.all_reduce(param.grad)
    param.grad.div_(dist.get_world_size())


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Whether the next backwards reduce gradients over the ranks (DDP's `no_sync`, inverted): off,
    each rank accumulates its micro-batches' gradients locally; the first backward with it on
    reduces the accumulated sum. Sets FSDP2's `set_requires_gradient_sync` on every unit of
    `model` and the same switch for the hook-averaged parameters (`average_gradients`, scalars);
    for a model FSDP2 does not manage only the latter (a no-op without a process group)."""
    global _hooks_sync
    _hooks_sync = enabled
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)


def full_state_dict(model: nn.Module, *, main_only: bool = False) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with whole tensors: DTensors (FSDP2's sharded or replicated weights)
    are gathered. Collective when any is a DTensor: every rank calls it. main_only: only rank 0
    keeps the gathered tensors, on the CPU (the other ranks get {}, holding one whole tensor at a
    time, never the whole model)."""
    from torch.distributed.tensor import DTensor

    keep = not main_only or not dist.is_initialized() or dist.get_rank() == 0
    full = {}
    for name, value in model.state_dict().items():
        whole = value.full_tensor() if isinstance(value, DTensor) else value
        if keep:
            full[name] = whole.cpu() if main_only else whole
    return full


def plain_copy(model: nn.Module, *, main_only: bool = False) -> nn.Module | None:
    """A plain single-device copy of `model` with its whole weights (for sampling during or after
    training, or saving): a deep copy, or for a model FSDP2 manages, a fresh build of its family
    and config loaded with the gathered weights (a copy would carry the sharding). Collective
    then: every rank calls it and gets the copy on the model's device; with `main_only`, rank 0
    alone gets it, on the CPU, and the other ranks None (they never hold the whole model)."""
    if not is_sharded(model):
        return copy.deepcopy(model)
    from polymodal.checkpoint import load_state_dict_checked
    from polymodal.models.registry import family_of

    full = full_state_dict(model, main_only=main_only)
    if main_only and dist.is_initialized() and dist.get_rank() != 0:
        return None
    plain = family_of(model).build(model.config)
    if not main_only:
        plain = plain.to(next(model.parameters()).device)
    load_state_dict_checked(plain, full, source="the gathered FSDP2 weights")
    return plain


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 (`fully_shard` or its `replicate`) manages `model`: its parameters are DTensors."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gather_in_place(model: nn.Module) -> None:
    """After training: every FSDP2 unit of `model` gathers its whole parameters and keeps them, so
    the model's own methods (encoding for a scale factor, merging) run as on one device, with no
    further collectives. Collective; every rank then holds the whole model."""
    from torch.distributed._composable.replicate_with_fsdp import ReplicateModule
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        if not isinstance(unit, ReplicateModule):  # replicated units never reshard after forward
            unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
