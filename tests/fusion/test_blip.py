"""BLIP: hard-negative mining, encoder/decoder sharing, CapFilt, the recipes and `polymodal eval`."""
import json
from pathlib import Path

import pytest
import torch

import polymodal
from polymodal.checkpoint import save_checkpoint
from polymodal.cli import main
from polymodal.data.world import World
from polymodal.data.world.text import all_captions
from polymodal.errors import ConfigError
from polymodal.models import blip as blip_module
from polymodal.models.registry import get_family, tasks_of
from polymodal.models.blip import BlipConfig, BlipModel, blip_tiny, mine_hard_negatives
from polymodal.recipes.blip import CapFiltRecord, capfilt
from polymodal.train.loop import TrainConfig

ROOT = Path(__file__).resolve().parents[2]


def _model() -> BlipModel:
    torch.manual_seed(0)
    return BlipModel(blip_tiny()).eval()


def test_hard_negatives_follow_the_similarities_and_never_pick_a_positive():
    similarity = torch.tensor([[5.0, 4.0, 0.0, -3.0],
                               [1.0, 5.0, 1.0, 1.0],
                               [9.0, 9.0, 2.0, 0.0],
                               [0.0, 0.0, 0.0, 0.0]])
    positives = torch.zeros(4, 4, dtype=torch.bool)
    positives[2, 0] = positives[2, 1] = True  # e.g. texts identical to row 2's
    positives[3] = True  # every column a positive: no negative exists
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([mine_hard_negatives(similarity, positives, generator=gen)[0] for _ in range(4000)])  # (S, 4)
    _, valid = mine_hard_negatives(similarity, positives)
    assert valid.tolist() == [True, True, True, False]
    for row in range(3):
        assert not (draws[:, row] == row).any()  # the positive pair itself
    assert set(draws[:, 2].tolist()) == {3}  # columns 0, 1 are positives, 2 the diagonal
    # Row 0: p(j) ∝ softmax(s)_j + 1e-4 over j != 0: column 1 (s=4) far more often than 2 and 3.
    freq = torch.bincount(draws[:, 0], minlength=4).float() / len(draws)
    expected = similarity[0].softmax(0) + 1e-4
    expected[0] = 0
    torch.testing.assert_close(freq, expected / expected.sum(), atol=0.02, rtol=0)
    # Uniform mining ignores the similarities.
    uniform = torch.stack([mine_hard_negatives(similarity, hard=False, generator=gen)[0][0] for _ in range(3000)])
    assert (torch.bincount(uniform, minlength=4)[1:].float() / 3000 - 1 / 3).abs().max() < 0.04


def test_itm_negatives_come_from_the_batch_similarity_and_skip_identical_captions(monkeypatch):
    model = _model()
    batch = blip_module._example_batch(model)
    batch["input_ids"][3] = batch["input_ids"][0]  # captions 0 and 3 are the same text
    seen = []

    def recording(similarity, positives=None, hard=True, generator=None):
        seen.append((similarity.clone(), positives.clone()))
        return mine_hard_negatives(similarity, positives, hard, generator)

    monkeypatch.setattr(blip_module, "mine_hard_negatives", recording)
    out = model(**batch)
    logits = out.logits_per_image.detach()
    torch.testing.assert_close(seen[0][0], logits.t())  # images for each text
    torch.testing.assert_close(seen[1][0], logits)  # texts for each image
    expected = torch.eye(4, dtype=torch.bool)
    expected[0, 3] = expected[3, 0] = True
    assert torch.equal(seen[1][1], expected)
    assert out.itm_logits.shape == (12, 2) and out.itm_labels.tolist()[:4] == [1, 1, 1, 1]
    assert set(out.itm_labels[4:].tolist()) == {0}
    # Pairs of one image (CapFilt's web and synthetic captions of a scene) are positives too.
    seen.clear()
    model(**batch, image_ids=torch.tensor([7, 8, 8, 9]))
    expected[1, 2] = expected[2, 1] = True
    assert torch.equal(seen[0][1], expected) and torch.equal(seen[1][1], expected)


def test_a_fused_share_trains_itm_and_captions_on_the_first_pairs_with_negatives_from_all(monkeypatch):
    model = _model()
    batch = blip_module._example_batch(model)  # 4 pairs
    full = model(**batch)
    model.config.fused_share = 0.5
    seen = []

    def recording(similarity, positives=None, hard=True, generator=None):
        seen.append(similarity.shape)
        return mine_hard_negatives(similarity, positives, hard, generator)

    monkeypatch.setattr(blip_module, "mine_hard_negatives", recording)
    torch.manual_seed(0)
    half = model(**batch)
    assert seen == [(2, 4), (2, 4)]  # 2 rows, negatives drawn among all 4 pairs
    assert half.logits_per_image.shape == (4, 4) and half.itm_logits.shape == (6, 2)
    assert half.caption_logits.shape[0] == 2
    torch.testing.assert_close(half.caption_logits, full.caption_logits[:2])
    torch.testing.assert_close(half.itm_logits[:2], full.itm_logits[:2])  # the positives
    with pytest.raises(ConfigError, match="fused_share"):
        BlipConfig(fused_share=0.0)


def test_nucleus_captions_are_seeded_and_a_tiny_nucleus_is_greedy():
    model = _model()
    pixels = torch.randn(3, 3, 32, 32)
    greedy = model.generate_captions(pixels, max_new_tokens=6)

    def sampled(p: float, seed: int) -> list[list[int]]:
        return model.generate_captions(pixels, max_new_tokens=6, top_p=p, generator=torch.Generator().manual_seed(seed))

    assert sampled(1e-6, 0) == greedy  # only the most likely token is left in the nucleus
    assert sampled(1.0, 3) == sampled(1.0, 3)
    assert any(sampled(1.0, seed) != greedy for seed in range(3))  # an untrained model's full distribution
    with pytest.raises(ValueError, match="top_p"):
        model.generate_captions(pixels, top_p=0.0)
    with pytest.raises(ConfigError, match="data.top_p"):
        from polymodal.recipes.blip import CapFiltDataConfig

        CapFiltDataConfig(top_p=1.5)


def test_training_batches_are_tokenized_as_evaluation_and_serving_tokenize():
    from polymodal.data.world import world_tokenizer
    from polymodal.recipes.blip import BlipDataConfig, BlipWorldPairs, blip_tokenize, world_blip_config

    tokenizer = world_tokenizer()
    config = world_blip_config(blip_tiny(), tokenizer)
    pairs = BlipWorldPairs(config, tokenizer, BlipDataConfig(batch_size=4, caption_styles=["short"]), seed=0)
    seen = []
    tokenize = pairs.tokenize
    pairs.tokenize = lambda texts: seen.append(list(texts)) or tokenize(texts)
    batch = pairs(3)
    ids, mask = blip_tokenize(config, tokenizer, seen[0])
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], mask)
    assert (ids[:, 0] == config.text.cls_token_id).all()


def test_decoder_shares_all_but_self_attention_with_the_encoder():
    model = _model()
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.randint(5, 128, (2, 6))
    tokens, _ = model.encode_image_tokens(pixels)

    def outputs():
        with torch.no_grad():
            return model.encode_text(ids), model.itm_logits(tokens, ids), model.caption_logits(tokens, ids)

    text, itm, caption = outputs()
    shared = [n for n, _ in model.text_model.named_parameters() if "encoder_attn" not in n and "decoder_attn" not in n]
    assert any("cross_attn" in n for n in shared) and any("mlp" in n for n in shared)
    with torch.no_grad():
        for layer in model.text_model.layers:
            layer.decoder_attn.attn.v_proj.weight.add_(0.5)
    text2, itm2, caption2 = outputs()
    assert torch.equal(text, text2) and torch.equal(itm, itm2) and not torch.allclose(caption, caption2)
    with torch.no_grad():
        model.text_model.layers[0].mlp.fc1.weight.mul_(-1)  # shared: moves every head
    text3, itm3, caption3 = outputs()
    assert not torch.allclose(text2, text3) and not torch.allclose(itm2, itm3) and not torch.allclose(caption2, caption3)


def test_capfilt_keeps_exactly_the_captions_the_filter_accepts():
    web = [(i, f"web {i}") for i in range(7)]
    scores = {f"web {i}": i / 10 for i in range(7)} | {f"syn {i}": 1 - i / 10 for i in range(7)}
    records = capfilt(web, lambda scenes: [f"syn {i}" for i in scenes],
                      lambda scenes, texts: [scores[t] for t in texts], threshold=0.35, batch_size=3)
    assert len(records) == 14 and all(isinstance(r, CapFiltRecord) for r in records)
    kept = sorted((r.scene, r.source, r.caption) for r in records if r.kept)
    expected = sorted([(i, "web", f"web {i}") for i in range(7) if i / 10 >= 0.35]
                      + [(i, "synthetic", f"syn {i}") for i in range(7) if 1 - i / 10 >= 0.35])
    assert kept == expected
    with pytest.raises(ValueError, match="returned 1 captions for 3 images"):
        capfilt(web, lambda scenes: ["x"], lambda scenes, texts: [1.0] * len(texts), 0.5, 3)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ConfigError, match="retrieval and/or captioning"):
        BlipConfig(retrieval=False, captioning=False)
    with pytest.raises(ConfigError, match="image_tower"):
        BlipConfig(image_tower="efficientnet_lite0")
    model = _model()
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, C, H, W\)"):
        model.encode_image(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="one row per image"):
        model(torch.randn(2, 3, 32, 32), torch.ones(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="max_positions is 32"):
        model.encode_text(torch.ones(1, 40, dtype=torch.long))
    captioner = BlipModel(BlipConfig(**{**blip_tiny().__dict__, "retrieval": False}))
    with pytest.raises(ValueError, match="no retrieval side"):
        captioner.encode_text(torch.ones(1, 4, dtype=torch.long))


def test_tiny_recipes_train_evaluate_and_capfilt(tmp_path, capsys):
    out = tmp_path / "blip"
    main(["train", str(ROOT / "configs/fusion/blip_tiny.yaml"), f"train.out_dir={out}"])
    for name in ("final", "checkpoints", "metrics.jsonl", "loss.png"):
        assert (out / name).exists()
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) / 3 < 0.75 * losses[0]
    model, tokenizer = polymodal.load(out / "final")
    assert isinstance(model, BlipModel) and tokenizer is not None and tasks_of(model) == ("embed",)

    capsys.readouterr()
    main(["eval", str(out / "final"), "--n", "12"])
    printed = capsys.readouterr().out
    for metric in ("t2i_R@1 ", "i2t_R@5", "t2i_R@1_itm", "itm_acc ", "itm_acc_hard", "cider", "bleu4"):
        assert metric in printed
    # Served embeddings (`embed` task): BLIP's own "[CLS] text [SEP]" tokens, its limit in errors.
    from polymodal.recipes.blip import blip_tokenize
    from polymodal.serve.tasks import APIError, embed_items

    vectors, counted = embed_items(model, tokenizer, ["A small red circle.", "A large blue star."], None)
    ids, mask = blip_tokenize(model.config, tokenizer, ["A small red circle.", "A large blue star."])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.encode_text(ids, mask), dim=-1)
    torch.testing.assert_close(torch.from_numpy(vectors), expected)
    assert counted == int(mask.sum())
    with pytest.raises(APIError, match="reads at most 32"):
        embed_items(model, tokenizer, ["red " * 40], None)
    assert main(["eval", str(out / "final"), "--data", "fashion-mnist"]) != 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "polymodal eval: error: --data: the blip family evaluates on 'world', got 'fashion-mnist'")

    cf = tmp_path / "capfilt"
    main(["train", str(ROOT / "configs/fusion/blip_capfilt_tiny.yaml"), f"init_from={out / 'final'}",
          f"train.out_dir={cf}", "data.threshold=0.0"])
    records = [json.loads(line) for line in (cf / "capfilt.jsonl").read_text().splitlines()]
    assert len(records) == 128 and all(r["kept"] for r in records)  # threshold 0 accepts every candidate
    assert sum(r["noisy"] for r in records if r["source"] == "web") > 5 and (cf / "final").is_dir()
    # A synthetic caption is noise exactly when it is none of its scene's world captions.
    world = World("train", image_size=32, num_objects=(1, 1), background="plain", seed=TrainConfig().seed)
    synthetic = [r for r in records if r["source"] == "synthetic"]
    assert [r["noisy"] for r in synthetic] == [r["caption"] not in all_captions(world[r["scene"]]) for r in synthetic]
    lm = get_family("lm")
    save_checkpoint(lm.build(lm.tiny()), tmp_path / "lm")
    capsys.readouterr()
    assert main(["train", str(ROOT / "configs/fusion/blip_capfilt_tiny.yaml"), f"init_from={tmp_path / 'lm'}",
                 f"train.out_dir={tmp_path / 'cf2'}"]) != 0
    assert "holds a 'lm' model, not blip" in capsys.readouterr().err.strip().splitlines()[-1]


def test_capfilt_filter_is_the_itm_probability(tmp_path):
    from polymodal.recipes.blip import blip_tokenize

    model = _model()
    texts = ["a red circle", "a blue square", "a green star", "a red circle"]

    class Words:  # a stand-in tokenizer: one id per word
        eos_token_id, pad_token_id = 2, 0

        def encode_batch(self, batch):
            return [[5 + len(w) for w in t.split()] for t in batch]

    pixels = torch.randn(4, 3, 32, 32)
    ids, mask = blip_tokenize(model.config, Words(), texts)
    assert ids[:, 0].eq(model.config.text.cls_token_id).all()
    p = model.match_probability(pixels, ids, mask)
    threshold = float(p.median())
    records = capfilt([(i, t) for i, t in enumerate(texts)], lambda s: ["a red circle"] * len(s),
                      lambda s, t: model.match_probability(pixels[s], *blip_tokenize(model.config, Words(), t)).tolist(),
                      threshold, batch_size=4)
    web = [r for r in records if r.source == "web"]
    assert [r.kept for r in web] == (p >= threshold).tolist()
