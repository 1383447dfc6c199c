"""Exact resume: a run interrupted and resumed equals, bit for bit, a run that never stopped."""
from __future__ import annotations

import json

import pytest
import torch

from polymodal.checkpoint import load_checkpoint
from polymodal.train.data import IndexedBatches, ShuffledBatches
from polymodal.train.loop import TrainConfig, train
from polymodal.train.state import find_latest_checkpoint


class Crash(Exception):
    """Stands in for a killed process."""


def _config(out_dir, **kw) -> TrainConfig:
    base = dict(steps=10, lr=1e-2, warmup_steps=2, schedule="cosine", grad_accum=2, ckpt_every=5,
                keep_checkpoints=0, log_every=1, out_dir=str(out_dir), resume=True, seed=7)
    base.update(kw)
    return TrainConfig(**base)


def _shuffled(sequences):
    return ShuffledBatches(len(sequences), 4, lambda idx: sequences[idx], seed=3)


def _crash_at(step):
    def on_step(context):
        if context.step == step:
            raise Crash(step)
    return on_step


def test_resume_is_bit_identical_with_shuffling_and_dropout(tmp_path, sequences, make_model, lm_loss):
    straight_model = make_model(0)
    straight = train(straight_model, _shuffled(sequences), lm_loss, _config(tmp_path / "a"))

    with pytest.raises(Crash):
        train(make_model(0), _shuffled(sequences), lm_loss, _config(tmp_path / "b"), callbacks=[_crash_at(7)])
    assert find_latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step-0000005"
    resumed_model = make_model(12345)  # a different init: everything must come from the checkpoint
    resumed = train(resumed_model, _shuffled(sequences), lm_loss, _config(tmp_path / "b"))

    assert len(straight.losses) == len(resumed.losses) == 10
    assert torch.equal(torch.tensor(straight.losses, dtype=torch.float64),
                       torch.tensor(resumed.losses, dtype=torch.float64))
    resumed_weights = resumed_model.state_dict()
    for name, value in straight_model.state_dict().items():
        assert torch.equal(value, resumed_weights[name]), name
    assert straight.losses[-1] < straight.losses[0]
    # metrics.jsonl keeps each step once: the crashed run's steps 6-7 were dropped on resume.
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))
    final, _ = load_checkpoint(resumed.checkpoint)
    assert torch.equal(final.mlp[0].weight, resumed_model.mlp[0].weight)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_with_plain_iterable_fast_forwards(tmp_path, sequences, make_model, lm_loss, grad_accum):
    # With accumulation the fast-forward must skip steps x micro-batches, not steps.
    batches = [sequences[i * 4:(i + 1) * 4] for i in range(12)]  # a list: not resumable, but repeatable
    config = _config(tmp_path / "a", steps=6, ckpt_every=3, grad_accum=grad_accum)
    straight = train(make_model(0), batches, lm_loss, config)
    with pytest.raises(Crash):
        train(make_model(0), batches, lm_loss, _config(tmp_path / "b", steps=6, ckpt_every=3, grad_accum=grad_accum),
              callbacks=[_crash_at(4)])
    resumed = train(make_model(1), batches, lm_loss,
                    _config(tmp_path / "b", steps=6, ckpt_every=3, grad_accum=grad_accum))
    assert resumed.losses == straight.losses


def test_fresh_run_refuses_to_overwrite_checkpoints(tmp_path, sequences, make_model, lm_loss):
    data = IndexedBatches(lambda i: sequences[(4 * i) % 48:(4 * i) % 48 + 4])
    train(make_model(0), data, lm_loss, _config(tmp_path, steps=2, resume=False))
    with pytest.raises(FileExistsError, match="resume"):
        train(make_model(0), data, lm_loss, _config(tmp_path, steps=2, resume=False))


def test_resume_ignores_a_latest_pointer_to_a_missing_folder(tmp_path, sequences, make_model, lm_loss):
    data = IndexedBatches(lambda i: sequences[(4 * i) % 48:(4 * i) % 48 + 4])
    train(make_model(0), data, lm_loss, _config(tmp_path, steps=4, ckpt_every=2))
    root = tmp_path / "checkpoints"
    (root / "latest").write_text("step-0000099\n")
    assert find_latest_checkpoint(root).name == "step-0000004"
