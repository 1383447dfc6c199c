"""The generator recipes end to end: `polymodal train` of the tiny diffusion, VAE and latent
diffusion configs (falling loss, the output layout, exact resume with the EMA), `polymodal.load`
and `generate_images` (same seed, same images), `polymodal generate` and `polymodal eval`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.api import load
from polymodal.checkpoint import read_weights
from polymodal.cli import main
from polymodal.infer.images import generate_images
from polymodal.recipes.runner import run_recipe
from polymodal.train.state import load_training_state

TINY = "configs/diffusion/tiny.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("diffusion") / "run"
    result = run_recipe(TINY, [f"train.out_dir={out}"])
    return out, result


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_tiny_recipe_trains_and_writes_the_output_layout(tiny_run):
    out, result = tiny_run
    for name in ("final/config.json", "final/tokenizer.json", "metrics.jsonl", "loss.png", "samples.png",
                 "samples/step-0000010.png", "recipe.yaml"):
        assert (out / name).is_file(), name
    losses = result.result.losses
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    with Image.open(out / "samples.png") as grid:
        assert grid.size[0] > 96


def test_final_weights_are_the_ema_of_the_last_checkpoint(tiny_run):
    out, _ = tiny_run
    shadow = load_training_state(out / "checkpoints" / "step-0000020").extra["ema"]["shadow"]
    saved = read_weights(out / "final")
    assert set(saved) == set(shadow)
    assert all(torch.equal(saved[name], shadow[name].to(saved[name].dtype)) for name in saved)
    raw = read_weights(out / "checkpoints" / "step-0000020")  # the training weights differ from their average
    assert any(not torch.equal(raw[name], saved[name]) for name in saved)


def test_same_seed_same_images_and_another_seed_differs(tiny_run):
    out, _ = tiny_run
    loaded = load(out / "final")
    prompt = "A large red star is in the center."
    a = generate_images(loaded.model, [prompt], loaded.tokenizer, n=2, seed=5)
    b = generate_images(loaded.model, [prompt], loaded.tokenizer, n=2, seed=5, batch_size=1)
    c = generate_images(loaded.model, [prompt], loaded.tokenizer, n=2, seed=6)
    assert [np.asarray(i).tolist() for i in a] == [np.asarray(i).tolist() for i in b]
    assert np.asarray(a[0]).tolist() != np.asarray(c[0]).tolist()
    assert np.asarray(a[0]).tolist() != np.asarray(a[1]).tolist()
    assert a[0].size == (16, 16) and a[0].mode == "RGB"


def test_resume_equals_an_uninterrupted_run(tmp_path):
    """4 steps, then resumed to 8, equals 8 straight: weights, EMA, RNG (timesteps and noise) and
    data restored. A constant learning rate, so the 4-step run's schedule is the 8-step run's."""
    common = ["train.ckpt_every=4", "sample_every=0", "train.schedule=constant", "train.warmup_steps=0"]
    straight = run_recipe(TINY, [f"train.out_dir={tmp_path / 'a'}", "train.steps=8", *common])
    run_recipe(TINY, [f"train.out_dir={tmp_path / 'b'}", "train.steps=4", *common])
    resumed = run_recipe(TINY, [f"train.out_dir={tmp_path / 'b'}", "train.steps=8", "train.resume=true", *common])
    assert resumed.result.losses == straight.result.losses
    for name, tensor in straight.model.state_dict().items():  # the final (EMA) weights
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor, rtol=0, atol=0)


def test_generate_cli_writes_pngs_and_a_grid_and_keeps_existing_files(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    target = tmp_path / "img.png"
    assert main(["generate", str(out / "final"), "A small blue circle is in the top left.", "--out", str(target),
                 "--steps", "2", "--seed", "1"]) == 0
    with Image.open(target) as image:
        assert image.size == (16, 16)
    assert main(["generate", str(out / "final"), "a", "b", "--n", "2", "--out", str(tmp_path / "many.png"),
                 "--steps", "2"]) == 0
    assert sorted(p.name for p in tmp_path.glob("many-*.png")) == [f"many-{i}.png" for i in range(4)]
    assert main(["generate", str(out / "final"), "a", "--n", "3", "--grid", "--out", str(tmp_path / "grid.png"),
                 "--steps", "2"]) == 0
    before = target.read_bytes()
    capsys.readouterr()
    assert main(["generate", str(out / "final"), "x", "--out", str(target), "--steps", "2"]) == 2
    assert "already exist" in capsys.readouterr().err and target.read_bytes() == before


@pytest.mark.parametrize("option, value, message", [
    ("--guidance", "-1", "--guidance"), ("--steps", "0", "--steps"), ("--sampler", "euler", "does not fit"),
])
def test_generate_cli_refuses_bad_arguments_in_one_line(tiny_run, tmp_path, capsys, option, value, message):
    out, _ = tiny_run
    with pytest.raises(SystemExit) if option != "--sampler" else _no_exit():
        code = main(["generate", str(out / "final"), "a", "--out", str(tmp_path / "x.png"), option, value])
        assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "x.png").exists()


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_eval_cli_scores_generated_images_exactly(tiny_run, tmp_path, monkeypatch):
    out, _ = tiny_run
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("polymodal.eval.world_features.TRAIN_STEPS", 5)  # the classifier's own test trains it
    report = tmp_path / "eval.json"
    assert main(["eval", str(out / "final"), "--split", "val", "--n", "2", "--json", str(report)]) == 0
    metrics = json.loads(report.read_text())
    for column in ("single", "two", "compositional"):
        for key in ("presence", "color", "shape", "size", "position", "count", "all_correct",
                    "color_shape_position"):
            assert 0.0 <= metrics[f"{column}/{key}"] <= 1.0
        assert metrics[f"{column}/wfd"] >= 0.0


def test_vae_then_latent_diffusion_recipes(tmp_path):
    vae = run_recipe("configs/diffusion/tiny_vae.yaml", [f"train.out_dir={tmp_path / 'vae'}"])
    assert vae.result.losses[-1] < vae.result.losses[0]
    metrics = json.loads((tmp_path / "vae" / "eval.json").read_text())
    assert set(metrics) == {"psnr", "ssim"} and metrics["psnr"] > 5
    assert (tmp_path / "vae" / "reconstructions.png").is_file()
    assert load(tmp_path / "vae" / "final").model.config.scaling_factor == pytest.approx(
        vae.model.config.scaling_factor)
    latent = run_recipe("configs/diffusion/tiny_latent.yaml", [f"train.out_dir={tmp_path / 'ldm'}",
                                                                f"vae_from={tmp_path / 'vae' / 'final'}"])
    assert np.mean(latent.result.losses[-5:]) < np.mean(latent.result.losses[:5])
    loaded = load(tmp_path / "ldm" / "final").model
    assert loaded.family == "latent_diffusion" and (tmp_path / "ldm" / "final" / "vae" / "config.json").is_file()
    for name, tensor in vae.model.state_dict().items():  # the frozen part is the trained VAE, unchanged
        torch.testing.assert_close(loaded.vae.state_dict()[name], tensor)
    images = generate_images(loaded, ["red star", "7"], steps=2)
    assert [image.size for image in images] == [(32, 32), (32, 32)]
