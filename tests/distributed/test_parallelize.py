"""`parallelize` pieces that run in one process: activation checkpointing, per-block compilation,
the units FSDP2 wraps, the mixed-precision policy, the context-parallel hook and config errors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from polymodal.distributed.config import ParallelConfig
from polymodal.distributed.env import World
from polymodal.distributed.parallelize import (
    apply_activation_checkpointing, blocks_of, compile_blocks, mixed_precision_policy, parallelize, shard_units,
)
from polymodal.errors import ConfigError
from polymodal.models.registry import get_family, resolve
from polymodal.nn.transformer import TransformerBlock

CPU = torch.device("cpu")


def _lm():
    family = get_family("lm")
    torch.manual_seed(0)
    config = family.tiny()
    config.num_layers = 4
    model = family.build(config)
    return model, family.example_batch(model), resolve(family.objective)


def _loss_and_grads(model, batch, objective):
    loss = objective(model, batch)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode,every,expected", [("full", 2, 4), ("selective", 2, 2), ("selective", 3, 1)])
def test_activation_checkpointing_leaves_loss_and_gradients_unchanged(mode, every, expected):
    model, batch, objective = _lm()
    twin = copy.deepcopy(model)
    want_loss, want_grads = _loss_and_grads(model, batch, objective)
    names = [name for name, _ in twin.named_parameters()]
    assert len(apply_activation_checkpointing(twin, mode, every)) == expected
    assert [name for name, _ in twin.named_parameters()] == names  # checkpoints keep their keys
    loss, grads = _loss_and_grads(twin, batch, objective)
    assert torch.equal(loss, want_loss)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=0, atol=1e-7, msg=name)


def test_compiled_block_gives_the_same_outputs():
    # CPU inductor works here (it needs a C++ compiler, which CI has): compile for real.
    model, _, _ = _lm()
    x = torch.randn(2, 8, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    block = blocks_of(model)[0]
    want = block(x)
    names = [name for name, _ in model.named_parameters()]
    compile_blocks(model)
    torch.testing.assert_close(block(x), want, rtol=1e-5, atol=1e-6)
    assert [name for name, _ in model.named_parameters()] == names


def test_blocks_and_shard_units_of_a_multimodal_lm():
    family = get_family("mmllm")
    model = family.build(family.tiny())
    blocks = blocks_of(model)
    assert blocks and all(isinstance(b, TransformerBlock) for b in blocks)
    assert len(blocks) == model.config.lm.num_layers + len(model.vision.encoder.layers)
    units = shard_units(model)
    assert len(units) == 2 * len(blocks)  # attention and MLP of each block; norms stay with the root
    assert not any("Norm" in type(u).__name__ for u in units)


def test_mixed_precision_policy_is_bf16_params_fp32_reduce_on_cuda():
    cuda = torch.device("cuda", 0)
    policy = mixed_precision_policy(ParallelConfig(), cuda)
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert mixed_precision_policy(ParallelConfig(), CPU).param_dtype is None
    forced = mixed_precision_policy(ParallelConfig(mixed_precision="bf16"), CPU)
    assert (forced.param_dtype, forced.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert mixed_precision_policy(ParallelConfig(mixed_precision="fp32"), cuda).param_dtype is None


def test_context_parallel_hook_runs_first_and_its_result_is_trained():
    model, _, _ = _lm()
    seen = []

    def hook(module: nn.Module, world: World) -> nn.Module:
        seen.append((module, world.size, len(blocks_of(module))))
        return module

    world = World(rank=0, local_rank=0, size=1, device=CPU)
    assert parallelize(model, ParallelConfig(), world, context_parallel=hook) is model
    assert seen == [(model, 1, 4)]
    with pytest.raises(ConfigError, match="context-parallel hook needs a process group"):
        parallelize(model, ParallelConfig(), None, context_parallel=hook)


def test_single_process_defaults_change_nothing():
    model, _, _ = _lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert parallelize(model, ParallelConfig(), None) is model
    assert type(model).__name__ == "DecoderLM"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("field,value,match", [
    ("strategy", "zero3", "train.parallel.strategy must be one of"),
    ("activation_checkpointing", "some", "train.parallel.activation_checkpointing must be one of"),
    ("checkpoint_every", 0, "train.parallel.checkpoint_every"),
    ("peak_tflops", -1.0, "train.parallel.peak_tflops"),
])
def test_bad_parallel_config_names_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        ParallelConfig(**{field: value})


def test_strategies_that_need_a_process_group_say_so():
    model, _, _ = _lm()
    with pytest.raises(ConfigError, match="strategy=fsdp needs a process group"):
        parallelize(model, ParallelConfig(strategy="fsdp"), None)
    with pytest.raises(ConfigError, match="strategy=none cannot run on 2 processes"):
        ParallelConfig(strategy="none").resolved_strategy(2)
    assert ParallelConfig().resolved_strategy(2) == "ddp"
    assert ParallelConfig().resolved_strategy(1) == "none"
