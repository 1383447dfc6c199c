"""The CLI's one error boundary, tried as a user would: every bad input ends in one stderr line that
names the culprit, exit code 2 (1 for a stopped run), no traceback, and no file lost."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from polymodal.checkpoint import save_checkpoint
from polymodal.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LM = str(CONFIGS / "lm" / "tiny.yaml")


def _one_error_line(capsys, *needles: str, kind: str = "error") -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("polymodal ")]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and f": {kind}: " in lines[0], err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory):
    from polymodal.backbones.decoder import DecoderLM
    from polymodal.data.world import world_tokenizer
    from polymodal.models.lm import lm_tiny

    tokenizer = world_tokenizer()
    config = lm_tiny()
    config.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    return save_checkpoint(DecoderLM(config), tmp_path_factory.mktemp("lm") / "ckpt", tokenizer)


def test_bad_recipe_files_are_named(tmp_path, capsys):
    assert main(["train", str(tmp_path / "none.yaml")]) == 2
    _one_error_line(capsys, "none.yaml", "does not exist")
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    assert main(["train", str(listed)]) == 2
    _one_error_line(capsys, "list.yaml", "mapping")
    broken = tmp_path / "broken.yaml"
    broken.write_text("recipe: lm\nmodel: {hidden_size: [\n")
    assert main(["train", str(broken)]) == 2
    _one_error_line(capsys, "broken.yaml", "YAML")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("recipe: gan\n")
    assert main(["train", str(unknown)]) == 2
    _one_error_line(capsys, "unknown recipe 'gan'", "lm", "mmllm")
    assert main(["train", LM, "train.steps=-3"]) == 2
    _one_error_line(capsys, "steps")


def test_train_never_writes_over_what_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["train", LM, f"train.out_dir={out}", "train.steps=2"]) == 2
    _one_error_line(capsys, str(out), "did not write", "overwrite")
    assert main(["train", LM, f"train.out_dir={out}", "train.steps=2", "train.overwrite=true"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "final" / "config.json").exists()
    capsys.readouterr()
    assert main(["train", LM, f"train.out_dir={out}", "train.steps=2"]) == 2
    _one_error_line(capsys, "earlier training run", "train.resume=true")
    assert main(["train", LM, f"train.out_dir={out}", "train.steps=3", "train.overwrite=true"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-0000003"]  # the old run's were removed


def test_two_runs_of_one_config_are_identical_from_step_one(tmp_path):
    """The recipe seeds every RNG before it builds the model."""
    def losses(out):
        assert main(["train", LM, f"train.out_dir={out}", "train.steps=4", "train.log_every=1"]) == 0
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_a_non_finite_loss_stops_the_run_with_exit_code_1(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", LM, f"train.out_dir={out}", "train.steps=30", "train.lr=1e12", "train.warmup_steps=0",
                 "train.max_grad_norm=null", "train.ckpt_every=1"])
    assert code == 1
    line = _one_error_line(capsys, "non-finite", kind="stopped")
    assert "step" in line


def test_ctrl_c_saves_the_step_exits_1_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "polymodal.cli", "train", LM, f"train.out_dir={out}", "train.steps=100000",
               "train.ckpt_every=0", "train.log_every=1"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
        assert process.poll() is None and time.time() < deadline, process.stderr.read()
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=120)[1]
    assert process.returncode == 1 and "Traceback" not in err, err
    assert "polymodal train: stopped: interrupted (SIGINT) after step" in err
    saved = sorted((out / "checkpoints").glob("step-*"))
    assert len(saved) == 1
    step = int(saved[0].name.split("-")[1])
    assert main(["train", LM, f"train.out_dir={out}", f"train.steps={step + 2}", "train.resume=true",
                 "train.log_every=1"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 3))


def test_convert_never_loses_files(lm_checkpoint, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert main(["convert", str(lm_checkpoint), str(foreign)]) == 2
    _one_error_line(capsys, str(foreign), "did not write")
    assert main(["convert", str(lm_checkpoint), str(foreign), "--overwrite"]) == 2
    assert (foreign / "keep.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1
    capsys.readouterr()
    assert main(["convert", str(lm_checkpoint), str(lm_checkpoint)]) == 2
    _one_error_line(capsys, "overlaps the source")
    assert main(["convert", str(lm_checkpoint), str(lm_checkpoint / "inside")]) == 2
    _one_error_line(capsys, "overlaps the source")
    a_file = tmp_path / "model.bin"
    a_file.write_bytes(b"data")
    assert main(["convert", str(lm_checkpoint), str(a_file)]) == 2
    _one_error_line(capsys, "is a file")
    assert a_file.read_bytes() == b"data"
    out = tmp_path / "converted"
    assert main(["convert", str(lm_checkpoint), str(out)]) == 0
    assert "wrote polymodal checkpoint" in capsys.readouterr().err
    assert main(["convert", str(lm_checkpoint), str(out)]) == 2
    _one_error_line(capsys, "earlier convert output", "--overwrite")
    assert main(["convert", str(lm_checkpoint), str(out), "--to", "hf", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_damaged_checkpoints_are_named(lm_checkpoint, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(lm_checkpoint, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["complete", str(bad), "hi"]) == 2
    _one_error_line(capsys, "model.safetensors", "truncated or corrupt")
    weights.write_bytes(b"\x00" * 64)
    assert main(["eval", str(bad)]) == 2
    _one_error_line(capsys, "model.safetensors")
    shutil.copy(lm_checkpoint / "model.safetensors", weights)
    (bad / "tokenizer.json").write_text("{not a tokenizer")
    assert main(["complete", str(bad), "hi"]) == 2
    _one_error_line(capsys, "tokenizer.json")
    (bad / "config.json").write_text("[1, 2]")
    assert main(["complete", str(bad), "hi"]) == 2
    _one_error_line(capsys, "config.json")


def test_eval_arguments_are_checked_before_loading(lm_checkpoint, capsys):
    assert main(["eval", str(lm_checkpoint), "--n", "0"]) == 2
    _one_error_line(capsys, "--n must be >= 1, got 0")
    assert main(["eval", str(lm_checkpoint), "--data", "coco", "--n", "1"]) == 2
    _one_error_line(capsys, "--data", "world")


def test_debug_shows_the_traceback_and_an_internal_error_is_still_one_line(monkeypatch, tmp_path, capsys):
    with pytest.raises(Exception):
        main(["train", str(tmp_path / "none.yaml"), "--debug"])
    import polymodal.recipes.runner as runner

    def broken(*args, **kwargs):
        raise RuntimeError("something internal broke")

    monkeypatch.setattr(runner, "run_recipe", broken)
    monkeypatch.setattr("polymodal.recipes.run_recipe", broken)
    assert main(["train", LM]) == 3
    _one_error_line(capsys, "internal error RuntimeError", "something internal broke", "--debug")
    monkeypatch.setenv("POLYMODAL_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["train", LM])


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: polymodal)" in out and "--dtype" in out and "dequantized" in out
    assert os.environ.get("POLYMODAL_DEBUG") is None
