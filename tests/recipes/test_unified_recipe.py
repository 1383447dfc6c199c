"""The unified recipe end to end: `configs/unified/tiny.yaml` trains a tokenizer and an LM in one
run with falling loss, and its one checkpoint answers `polymodal chat` about an image, draws with
`polymodal generate` (same seed, same image), returns interleaved text and images, and is scored
by `polymodal eval` (understanding, generation and tokenizer in one table)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.api import load
from polymodal.cli import main
from polymodal.data.world import World
from polymodal.infer.images import generate_images
from polymodal.recipes.runner import run_recipe

TINY = "configs/unified/tiny.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("unified") / "run"
    result = run_recipe(TINY, [f"train.out_dir={out}"])
    return out, result


def test_tiny_recipe_trains_both_directions_and_writes_the_layout(tiny_run):
    out, result = tiny_run
    for name in ("final/config.json", "final/image_tokenizer/config.json", "final/tokenizer.json", "metrics.jsonl",
                 "loss.png", "samples.png", "eval.json", "recipe.yaml"):
        assert (out / name).is_file(), name
    losses = result.result.losses
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    metrics = json.loads((out / "eval.json").read_text())
    assert {"understanding/val/vqa_all", "understanding/compositional/vqa_all", "generation/single/all_correct",
            "generation/compositional/all_correct", "tokenizer/psnr", "tokenizer/codebook_usage"} <= set(metrics)


def test_batches_mix_every_direction(tiny_run):
    _, result = tiny_run
    from polymodal.recipes.unified import WorldDocuments, UnifiedDataConfig

    model, tokenizer = result.model, result.tokenizer
    docs = WorldDocuments(model, tokenizer, UnifiedDataConfig(num_scenes=8, docs_per_batch=4), seed=0)
    c = model.config
    seen = set()
    for index in range(6):
        batch = docs(index)
        labels = batch.labels[batch.labels >= 0]
        assert (labels < c.text_vocab_size).any()
        seen.add(bool((labels >= c.text_vocab_size).any()))  # some batch trains drawn images
        assert docs(index).token_ids.equal(batch.token_ids)  # batch i is a pure function of i
    assert True in seen


def test_same_seed_same_image_and_another_seed_differs(tiny_run):
    out, _ = tiny_run
    loaded = load(out / "final")
    a = generate_images(loaded.model, ["A red circle is in the center."], loaded.tokenizer, n=2, seed=3)
    b = generate_images(loaded.model, ["A red circle is in the center."], loaded.tokenizer, n=2, seed=3)
    c = generate_images(loaded.model, ["A red circle is in the center."], loaded.tokenizer, n=2, seed=4)
    assert [np.asarray(i).tolist() for i in a] == [np.asarray(i).tolist() for i in b]
    assert [np.asarray(i).tolist() for i in a] != [np.asarray(i).tolist() for i in c]
    assert a[0].size == (16, 16)


def test_one_checkpoint_chats_about_an_image_and_draws(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    image = tmp_path / "scene.png"
    World("val", image_size=16)[0].image().save(image)
    capsys.readouterr()
    assert main(["chat", str(out / "final"), "What color is the object?", "--image", str(image),
                 "--max-new-tokens", "4"]) == 0
    capsys.readouterr()  # a tiny model's answer may be anything; the image was read and a reply written
    target = tmp_path / "drawn.png"
    assert main(["generate", str(out / "final"), "A blue square is in the top left.", "--out", str(target),
                 "--seed", "1", "--guidance", "2"]) == 0
    with Image.open(target) as drawn:
        assert drawn.size == (16, 16) and drawn.mode == "RGB"
    capsys.readouterr()
    assert main(["generate", str(out / "final"), "a", "--out", str(tmp_path / "x.png"), "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "--steps applies to diffusion models" in err and "Traceback" not in err


def test_interleaved_reply_holds_text_and_images_in_order(tiny_run):
    """A hook on the LM head steers the free (unconstrained) choices: a text token, then the image
    start marker, then end of turn; the constrained decoder draws the span in between."""
    out, _ = tiny_run
    loaded = load(out / "final")
    model, tokenizer = loaded.model, loaded.tokenizer
    c = model.config
    word = tokenizer.encode(" red")[0]
    plan = iter([word, c.image_start_id] + [None] * c.span_tokens + [tokenizer.eos_token_id])

    def steer(_module, _inputs, logits):
        wanted = next(plan, None)
        if wanted is None:
            return logits
        return logits.index_fill(-1, torch.tensor([wanted]), 1e4)

    from polymodal.infer.unified import generate_interleaved

    handle = model.lm.lm_head.register_forward_hook(steer)
    try:
        parts = generate_interleaved(model, tokenizer, [{"role": "user", "content": "Draw a red circle."}],
                                     max_new_tokens=8, seed=0)
    finally:
        handle.remove()
    assert [type(p).__name__ for p in parts] == ["str", "Image"]
    assert parts[0].strip() == "red" and parts[1].size == (16, 16)


def test_eval_cli_prints_one_table_for_both_directions(tiny_run, tmp_path, monkeypatch):
    out, _ = tiny_run
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("polymodal.eval.world_features.TRAIN_STEPS", 5)
    report = tmp_path / "eval.json"
    assert main(["eval", str(out / "final"), "--split", "val", "--n", "2", "--json", str(report)]) == 0
    metrics = json.loads(report.read_text())
    assert 0.0 <= metrics["understanding/val/vqa_color"] <= 1.0
    assert 0.0 <= metrics["generation/two/color_shape_position"] <= 1.0
    assert 0.0 <= metrics["tokenizer/codebook_usage"] <= 1.0


def test_extending_smollm2_keeps_its_text_behaviour():
    """lm_from: smollm2 appends the image markers, the codes and the row end to the packaged
    SmolLM2-135M; before any training its text logits and its greedy chat reply are unchanged."""
    from polymodal.assets import smollm2_gguf_path
    from polymodal.infer.generate import generate
    from polymodal.interop import import_gguf
    from polymodal.recipes.unified import UnifiedRecipeConfig, build_unified
    from polymodal.tokenizers.image_vq import image_vq_tiny

    config = UnifiedRecipeConfig(lm_from="smollm2", image_tokenizer=image_vq_tiny(), tokenizer_steps=1, image_size=16)
    model, tokenizer = build_unified(config)
    base, base_tokenizer = import_gguf(smollm2_gguf_path(), dtype=torch.float32)
    text_vocab = base.config.vocab_size
    c = model.config
    assert c.text_vocab_size == len(tokenizer) and c.lm.vocab_size == c.text_vocab_size + c.codebook_size + 1
    assert tokenizer.encode("The capital of France") == base_tokenizer.encode("The capital of France")
    ids = base_tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                             add_generation_prompt=True, tokenize=True)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[..., :text_vocab]
        theirs = base(torch.tensor([ids])).logits
    assert torch.equal(ours, theirs)
    reply = model.generate([ids], max_new_tokens=6)[0]
    assert reply == generate(base, [ids], max_new_tokens=6)[0]
