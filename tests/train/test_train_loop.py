"""The training loop: accumulation, NaN guard, checkpoints, metrics and the loss plot."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from polymodal.checkpoint import load_checkpoint
from polymodal.train.data import IndexedBatches
from polymodal.train.loop import NonFiniteLossError, TrainConfig, train
from polymodal.train.optim import Optimization
from polymodal.train.state import find_latest_checkpoint, list_training_checkpoints, load_training_state


def _regression_data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 5, generator=gen)
    y = x @ torch.randn(5, 2, generator=gen) + 0.1 * torch.randn(96, 2, generator=gen)
    return x, y


def _mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_grad_accumulation_equals_one_big_batch(optimizer):
    # SGD too: AdamW's update barely changes when every gradient is scaled (summed, not averaged).
    sgd = (lambda model, config: {"model": Optimization(torch.optim.SGD(model.parameters(), lr=config.lr))})
    x, y = _regression_data()
    results = []
    for accum, size in ((1, 16), (4, 4)):
        torch.manual_seed(0)
        model = nn.Linear(5, 2)
        # Every step sees rows 0..15: in one batch, or as four consecutive micro-batches of 4.
        data = IndexedBatches(lambda i, s=size: (x[(i * s) % 16:(i * s) % 16 + s], y[(i * s) % 16:(i * s) % 16 + s]))
        config = TrainConfig(steps=6, lr=0.05, grad_accum=accum, schedule="constant", max_grad_norm=None,
                             weight_decay=0.1)
        results.append((train(model, data, _mse, config, optimizers=sgd if optimizer == "sgd" else None), model))
    (big, big_model), (small, small_model) = results
    assert small.losses == pytest.approx(big.losses, rel=1e-5)
    assert torch.allclose(small_model.weight, big_model.weight, atol=1e-6)
    assert big.losses[-1] < big.losses[0]


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, sequences, make_model, lm_loss):
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss = lm_loss(model, batch)
        return loss * float("nan") if len(calls) == 3 else loss

    snapshots = {}
    model = make_model(0)
    config = TrainConfig(steps=10, lr=1e-2, ckpt_every=1, keep_checkpoints=0, out_dir=str(tmp_path))
    with pytest.raises(NonFiniteLossError, match="step 3, micro-batch 0") as info:
        train(model, IndexedBatches(lambda i: sequences[:4]), loss_fn, config,
              callbacks=[lambda c: snapshots.setdefault(c.step, {k: v.clone() for k, v in model.state_dict().items()})])
    assert info.value.step == 3 and info.value.micro_batch == 0
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_training_checkpoints(root)] == ["step-0000001", "step-0000002"]
    assert find_latest_checkpoint(root).name == "step-0000002"
    saved, _ = load_checkpoint(root / "step-0000002")
    for name, value in saved.state_dict().items():
        assert torch.equal(value, snapshots[2][name]), name
        assert torch.isfinite(value).all()
    # The poisoned step never reached the weights either.
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshots[2][name]), name


def test_non_finite_gradient_norm_is_caught():
    model = nn.Linear(3, 1)

    def loss_fn(model, batch):
        # sqrt has an infinite slope at 0, so the loss is finite (0) but its gradient is NaN.
        return torch.sqrt((model.weight * 0).pow(2).sum())

    with pytest.raises(NonFiniteLossError, match="gradient norm") as info:
        train(model, IndexedBatches(lambda i: None), loss_fn, TrainConfig(steps=3))
    assert info.value.step == 1 and info.value.micro_batch is None


def test_checkpoints_metrics_plot_and_pruning(tmp_path, sequences, make_model, lm_loss):
    logs = []
    config = TrainConfig(steps=6, lr=1e-2, warmup_steps=2, ckpt_every=2, keep_checkpoints=2, log_every=3,
                         out_dir=str(tmp_path))
    result = train(make_model(0), IndexedBatches(lambda i: sequences[(4 * i) % 48:(4 * i) % 48 + 4]), lm_loss,
                   config, tokens_in_batch=lambda b: b.numel(), callbacks=[lambda c: logs.append(c.log)])
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_training_checkpoints(root)] == ["step-0000004", "step-0000006"]
    assert result.checkpoint == root / "step-0000006" and result.step == 6 and len(result.losses) == 6
    assert (root / "latest").read_text().strip() == "step-0000006"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [3, 6]
    assert lines[0]["unit"] == "tokens/s" and lines[0]["throughput"] > 0
    assert [log.lr for log in logs[:3]] == pytest.approx([5e-3, 1e-2, 1e-2], rel=0.05)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = load_training_state(root / "step-0000006")
    assert state.step == 6 and state.losses == result.losses and state.data == {"index": 6}
    assert state.config["steps"] == 6
    restored, _ = load_checkpoint(result.checkpoint)
    assert restored.head.weight is restored.embed.weight


def test_only_trainable_params_change(sequences, make_model, lm_loss):
    model = make_model(0)
    model.norm.requires_grad_(False)
    frozen = model.norm.weight.clone()
    train(model, IndexedBatches(lambda i: sequences[:4]), lm_loss, TrainConfig(steps=3, lr=1e-2))
    assert torch.equal(model.norm.weight, frozen)


def test_bad_loss_and_exhausted_data_are_reported(sequences, make_model, lm_loss):
    with pytest.raises(TypeError, match="scalar"):
        train(make_model(0), [sequences[:4]], lambda m, b: m(b), TrainConfig(steps=1))
    with pytest.raises(RuntimeError, match="step 3, micro-batch 1"):
        train(make_model(0), [sequences[:4]] * 5, lm_loss, TrainConfig(steps=4, grad_accum=2))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="exp")


def test_bf16_autocast_trains_on_cpu(sequences, make_model, lm_loss):
    model = make_model(0)
    result = train(model, IndexedBatches(lambda i: sequences[:8]), lm_loss,
                   TrainConfig(steps=8, lr=3e-2, precision="bf16", device="cpu"))
    assert model.embed.weight.dtype == torch.float32  # autocast computes in bf16, weights stay fp32
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.losses[-1] < result.losses[0]


def test_a_packed_batch_moves_to_the_training_device():
    """The loop hands the model its batch on the training device, a `PackedBatch` included."""
    from polymodal.sequence import Document, pack_documents
    from polymodal.train.loop import _to_device

    packed = pack_documents([Document.from_tokens(torch.arange(6))], max_tokens=8)
    moved = _to_device({"packed": packed, "x": torch.zeros(2)}, torch.device("meta"))
    assert moved["packed"].token_ids.device.type == "meta" and moved["x"].device.type == "meta"
    assert moved["packed"].document_rows == packed.document_rows
