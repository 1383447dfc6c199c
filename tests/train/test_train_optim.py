"""Optimizer parameter groups and learning-rate schedules."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from polymodal.train.optim import build_optimizer, build_scheduler, keep_implementation, lr_at, param_groups


def test_decay_only_matrices_and_skip_frozen_params():
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[3].weight.requires_grad_(False)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[1].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[1].bias), id(model[2].weight),
                                                   id(model[2].bias), id(model[3].bias)}


def test_plain_parameters_get_the_fused_adamw_and_it_steps_as_the_default_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    reference = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    reference.load_state_dict(model.state_dict())
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    assert opt.defaults["fused"]
    groups = [{"params": [p for p in reference.parameters() if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in reference.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    ref_opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    x = torch.randn(8, 6)
    for _ in range(5):
        for net, optimizer in ((model, opt), (reference, ref_opt)):
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_resumed_state_keeps_the_kernel_the_optimizer_was_built_with():
    model = nn.Linear(4, 3)
    older = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-3, foreach=False)  # a state from before fused
    model(torch.randn(2, 4)).sum().backward()
    older.step()
    opt = build_optimizer(model, lr=1e-3)
    opt.load_state_dict(older.state_dict())
    assert not opt.param_groups[0]["fused"]  # load_state_dict copied the old group's settings
    keep_implementation(opt)
    assert all(group["fused"] and group["foreach"] is None for group in opt.param_groups)
    opt.step()


def test_fully_frozen_model_is_an_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        build_optimizer(model, lr=1e-3)


def test_warmup_then_cosine_values():
    kw = dict(base_lr=1.0, total_steps=110, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(pi/2) = 0
    assert lr_at(85, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.75)))
    assert lr_at(109, **kw) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(500, **kw) == pytest.approx(0.1)


def test_linear_and_constant_values():
    lin = dict(base_lr=2.0, total_steps=10, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert [lr_at(s, **lin) for s in (0, 5, 9)] == pytest.approx([2.0, 1.0, 0.2])
    const = dict(base_lr=2.0, total_steps=10, warmup_steps=4, schedule="constant")
    assert [lr_at(s, **const) for s in (0, 3, 4, 9)] == pytest.approx([0.5, 2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="step_decay"):
        lr_at(0, base_lr=1.0, total_steps=10, schedule="step_decay")


def test_scheduler_follows_lr_at():
    param = nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([param], lr=3e-3)
    sched = build_scheduler(opt, total_steps=20, warmup_steps=5, schedule="cosine", min_lr_ratio=0.2)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [lr_at(s, base_lr=3e-3, total_steps=20, warmup_steps=5, min_lr_ratio=0.2) for s in range(20)]
    assert seen == pytest.approx(expected, rel=1e-12)
