"""The open training loop: named optimizers, extra state (EMA, modules), callbacks, the parallelize
hook, Ctrl-C, and resuming past a corrupt checkpoint — each restored exactly on resume."""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from polymodal.errors import CheckpointError, TrainingStopped
from polymodal.models.registry import Family, register
from polymodal.train.data import IndexedBatches
from polymodal.train.ema import EMA
from polymodal.train.loop import StepContext, TrainConfig, every, train
from polymodal.train.optim import Optimization, build_scheduler


@dataclass
class GeneratorConfig:
    hidden: int = 8
    dropout: float = 0.1


class Generator(nn.Sequential):
    """x (B, 5) -> (B, 2): Linear, dropout, Linear (a registered family, so checkpoints can name it)."""

    family = "test_open_loop_generator"

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__(nn.Linear(5, config.hidden), nn.Dropout(config.dropout), nn.Linear(config.hidden, 2))
        self.config = config


register(Family(Generator.family, GeneratorConfig, Generator, GeneratorConfig, lambda model: None))


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=gen)
    y = torch.tanh(x @ torch.randn(5, 2, generator=gen))
    return IndexedBatches(lambda i: (x[(8 * i) % 64:(8 * i) % 64 + 8], y[(8 * i) % 64:(8 * i) % 64 + 8]))


class Setup:
    """A generator (the model), a discriminator (an extra module), two optimizers and an EMA."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = Generator(GeneratorConfig())
        self.disc = nn.Linear(2, 1)
        self.ema = EMA(self.model, decay=0.9)

    def optimizers(self, model, config):
        g = torch.optim.AdamW(model.parameters(), lr=config.lr)
        d = torch.optim.AdamW(self.disc.parameters(), lr=config.lr)
        return {"model": Optimization(g, build_scheduler(g, total_steps=config.steps, warmup_steps=2)),
                "disc": Optimization(d)}

    def objective(self, model, batch):
        x, y = batch
        fake = model(x)
        generator = F.mse_loss(fake, y) - 0.1 * self.disc(fake).mean()  # also reaches into the discriminator
        disc = F.softplus(self.disc(fake.detach())).mean() + F.softplus(-self.disc(y)).mean()
        return {"model": generator, "disc": disc}

    def run(self, out_dir, steps=8, **kw):
        config = TrainConfig(steps=steps, lr=1e-2, ckpt_every=2, keep_checkpoints=0, log_every=1, out_dir=str(out_dir),
                             resume=True, seed=3)
        return train(self.model, _data(), self.objective, config, optimizers=self.optimizers,
                     state={"ema": self.ema, "disc": self.disc}, **kw)


def _crash_at(step):
    def callback(context: StepContext):
        if context.step == step:
            raise RuntimeError("killed")
    return callback


def test_resume_with_ema_two_optimizers_and_an_extra_module_is_exact(tmp_path):
    straight = Setup(0)
    result = straight.run(tmp_path / "a", callbacks=[straight.ema])
    assert result.losses[-1] < result.losses[0]
    first = Setup(0)
    with pytest.raises(RuntimeError, match="killed"):
        first.run(tmp_path / "b", callbacks=[first.ema, _crash_at(5)])
    resumed = Setup(99)  # other initial weights: everything must come back from the checkpoint
    again = resumed.run(tmp_path / "b", callbacks=[resumed.ema])
    assert again.losses == result.losses
    for a, b in ((straight.model, resumed.model), (straight.disc, resumed.disc)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
    assert straight.ema.updates == resumed.ema.updates == 8
    for name, shadow in straight.ema.shadow.items():
        assert torch.equal(shadow, resumed.ema.shadow[name]), name


def test_each_optimizer_steps_on_its_own_loss_only():
    """The generator's loss reaches the discriminator's weights, but only the discriminator's own
    loss may move them: one SGD step equals the step on that loss's gradient alone."""
    setup = Setup(0)
    setup.model[1].p = 0.0  # no dropout: the step sees exactly what `expected` was computed on
    before = {n: p.detach().clone() for n, p in setup.disc.named_parameters()}
    batch = next(iter(_data()))
    expected = torch.autograd.grad(setup.objective(setup.model, batch)["disc"], list(setup.disc.parameters()))

    def sgd(model, config):
        return {"model": Optimization(torch.optim.SGD(model.parameters(), lr=0.5)),
                "disc": Optimization(torch.optim.SGD(setup.disc.parameters(), lr=0.5))}

    train(setup.model, [batch], setup.objective, TrainConfig(steps=1, max_grad_norm=None), optimizers=sgd,
          state={"disc": setup.disc})
    for (name, param), grad in zip(setup.disc.named_parameters(), expected):
        torch.testing.assert_close(param.detach(), before[name] - 0.5 * grad)


def test_ema_follows_the_closed_form():
    model = nn.Linear(1, 1, bias=False)
    # decay 0.75, not 0.5: with 0.5 the decay and (1 - decay) would be interchangeable.
    ema = EMA(model, decay=0.75, warmup=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema.shadow["weight"].fill_(0.0)
    for value in (4.0, 8.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update()
    assert ema.shadow["weight"].item() == pytest.approx(0.75 * (0.25 * 4.0) + 0.25 * 8.0)  # 2.75
    copy = EMA(nn.Linear(1, 1, bias=False)).copy_to(nn.Linear(1, 1, bias=False))
    assert copy.weight.shape == (1, 1)


def test_ema_warmup_ramps_the_decay_from_one_tenth():
    """decay_t = min(decay, (1 + t) / (10 + t)): 0.1 at the first update, 2/11 at the second."""
    model = nn.Linear(1, 1, bias=False)
    ema = EMA(model, decay=0.999)
    ema.shadow["weight"].fill_(0.0)
    with torch.no_grad():
        model.weight.fill_(10.0)
    ema.update()
    assert ema.shadow["weight"].item() == pytest.approx(9.0)  # 0.1 * 0 + 0.9 * 10
    assert ema.current_decay() == pytest.approx(2 / 11)
    ema.updates = 10_000
    assert ema.current_decay() == pytest.approx(0.999)


def test_parallelize_hook_wraps_the_model_for_the_objective_only(tmp_path):
    seen = []

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            seen.append(1)
            return self.inner(x)

    model = Generator(GeneratorConfig())
    train(model, _data(), lambda m, b: F.mse_loss(m(b[0]), b[1]),
          TrainConfig(steps=3, out_dir=str(tmp_path), log_every=1), parallelize=Wrapper)
    assert len(seen) == 3
    from polymodal.checkpoint import read_weights

    saved = read_weights(tmp_path / "checkpoints" / "step-0000003")
    assert set(saved) == set(model.state_dict())  # the model's own names, not the wrapper's


def test_every_runs_periodically_in_eval_mode_without_gradients():
    calls = []

    def probe(context):
        calls.append((context.step, context.model.training, torch.is_grad_enabled()))

    model = nn.Sequential(nn.Linear(5, 2), nn.Dropout(0.5))
    train(model, _data(), lambda m, b: F.mse_loss(m(b[0]), b[1]), TrainConfig(steps=7), callbacks=[every(3, probe)])
    assert calls == [(3, False, False), (6, False, False), (7, False, False)]
    assert model.training


def test_ctrl_c_saves_the_current_step_and_resume_is_exact(tmp_path):
    straight = Setup(0)
    result = straight.run(tmp_path / "a", callbacks=[straight.ema])

    def interrupt(context):
        if context.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    first = Setup(0)
    with pytest.raises(TrainingStopped, match="interrupted .*SIGINT.* after step 3 of 8") as info:
        first.run(tmp_path / "b", callbacks=[first.ema, interrupt])
    assert info.value.checkpoint.name == "step-0000003"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back
    resumed = Setup(5)
    assert resumed.run(tmp_path / "b", callbacks=[resumed.ema]).losses == result.losses


def test_a_corrupt_latest_checkpoint_is_named_and_the_run_resumes_from_the_previous_one(tmp_path, capsys):
    straight = Setup(0)
    result = straight.run(tmp_path / "a", callbacks=[straight.ema])
    first = Setup(0)
    with pytest.raises(RuntimeError):
        first.run(tmp_path / "b", callbacks=[first.ema, _crash_at(7)])
    latest = tmp_path / "b" / "checkpoints" / "step-0000006"
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # truncated mid-header
    resumed = Setup(1)
    assert resumed.run(tmp_path / "b", callbacks=[resumed.ema]).losses == result.losses
    err = capsys.readouterr().err
    assert "step-0000006" in err and "truncated or corrupt" in err


def test_no_intact_checkpoint_is_a_checkpoint_error(tmp_path):
    setup = Setup(0)
    setup.run(tmp_path, steps=2, callbacks=[setup.ema])
    state = tmp_path / "checkpoints" / "step-0000002" / "trainer_state.json"
    state.write_text("{not json")
    with pytest.raises(CheckpointError, match="no intact checkpoint.*step-0000002"):
        Setup(0).run(tmp_path, steps=4)


def test_a_checkpoint_of_other_optimizers_is_refused_by_name(tmp_path):
    setup = Setup(0)
    setup.run(tmp_path, steps=2, callbacks=[setup.ema])
    plain = Generator(GeneratorConfig())
    config = TrainConfig(steps=4, out_dir=str(tmp_path), resume=True)
    with pytest.raises(CheckpointError, match=r"optimizers \['disc', 'model'\], this run has \['model'\]"):
        train(plain, _data(), lambda m, b: F.mse_loss(m(b[0]), b[1]), config)
