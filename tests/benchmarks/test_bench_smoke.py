"""Smoke test of benchmarks/bench_lm.py: every section runs once on a tiny config and returns
finite, positive numbers; the weight copy into transformers' Llama reproduces our logits."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

# benchmarks/ is a folder of scripts, not a package: import them the way the scripts import common.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_lm
from common import causal_pairs, time_interleaved, train_flops

from polymodal.backbones.decoder import DecoderConfig

TINY = DecoderConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_position_embeddings=128)
SIZES = bench_lm.BenchSizes(train_batch=2, train_seq=16, docs_per_step=5, doc_min_len=3, doc_max_len=24,
                            pack_max_tokens=32, decode_new_tokens=4, decode_prompt_lens=(5, 2, 7),
                            warmup=0, iters=1)


def _finite_positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def test_weight_copy_reproduces_logits():
    ours, hf = bench_lm.build_pair(TINY, "cpu")
    ids = torch.randint(0, TINY.vocab_size, (2, 9))
    assert bench_lm.logits_max_diff(ours, hf, ids) < 1e-5
    assert bench_lm.hf_name("layers.layers.3.attn_norm.weight") == "model.layers.3.input_layernorm.weight"
    assert bench_lm.hf_name("layers.layers.0.attn.q_proj.weight") == "model.layers.0.self_attn.q_proj.weight"
    assert bench_lm.hf_name("norm.weight") == "model.norm.weight"


def test_train_section():
    r = bench_lm.bench_train(TINY, SIZES)
    for name in ("polymodal", "transformers"):
        assert _finite_positive(r[name]["tokens_per_s"]) and _finite_positive(r[name]["tflops"])
    assert _finite_positive(r["ratio"]["median"])
    assert r["first_loss"]["polymodal"] == pytest.approx(r["first_loss"]["transformers"], rel=1e-5)


def test_packed_section_losses_agree():
    r = bench_lm.bench_packed(TINY, SIZES, peak_tflops=1.0)
    losses = r["first_loss"]
    assert losses["polymodal_packed"] == pytest.approx(losses["transformers_padded"], rel=1e-4)
    assert losses["polymodal_padded"] == pytest.approx(losses["transformers_padded"], rel=1e-4)
    for name in ("transformers_padded", "polymodal_padded", "polymodal_packed"):
        assert _finite_positive(r[name]["real_tokens_per_s"]) and 0 < r[name]["mfu"] < 1
    docs = bench_lm.make_documents(SIZES.docs_per_step, SIZES.doc_min_len, SIZES.doc_max_len, TINY.vocab_size)
    assert r["real_tokens_per_step"] == sum(len(d) for d in docs)
    assert r["packed_shape"][1] <= SIZES.pack_max_tokens


def test_decode_section_runs_exact_tokens():
    r = bench_lm.bench_decode(TINY, SIZES, batch_size=3)
    assert r["prompt_lens"] == [5, 2, 7]
    assert _finite_positive(r["polymodal"]["tokens_per_s"]) and _finite_positive(r["transformers"]["tokens_per_s"])
    assert r["greedy_tokens_equal_fraction"] == 1.0


def test_documents_lengths_within_range():
    docs = bench_lm.make_documents(50, 20, 500, 100, seed=1)
    assert len(docs) == 50 and all(20 <= len(d) <= 500 for d in docs)
    ids, mask = bench_lm.pad_right(docs)
    assert int(mask.sum()) == sum(len(d) for d in docs) and ids.shape[1] == max(len(d) for d in docs)


def test_timing_and_flops_helpers():
    calls = {"a": 0, "b": 0}
    times = time_interleaved({"a": lambda: calls.__setitem__("a", calls["a"] + 1),
                              "b": lambda: calls.__setitem__("b", calls["b"] + 1)}, warmup=1, iters=3)
    assert calls == {"a": 4, "b": 4} and len(times["a"].samples) == 3 and times["a"].best <= times["a"].median
    assert causal_pairs([1, 3]) == 1 + 6
    assert train_flops(10, 2, 0, 1, 4) == 120.0 and train_flops(0, 0, 1, 2, 4) == 96.0


def test_format_table_and_json(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_lm, "bench_config", lambda: TINY)
    monkeypatch.setattr(bench_lm, "QUICK", SIZES)
    out = tmp_path / "r.json"
    results = bench_lm.main(["--quick", "--json", str(out)])
    table = bench_lm.format_table(results)
    assert "decode B=3" in table and "ratio" in table
    assert json.loads(out.read_text())["train"]["batch"] == [2, 16]


def test_vision_cell_probe_reads_each_object_of_a_clip_tower(tmp_path):
    """probe_vision_cells: one feature per object (1-3 a scene) from its cell's token of a clip
    checkpoint's tower, every attribute labelled; the quickstart's untrained towers (grid-pooled
    conv and the earlier patch projection) keep shape and color readable."""
    from dataclasses import replace

    import probe_vision_cells as probe

    from polymodal.checkpoint import save_checkpoint
    from polymodal.data.world import COLORS, SHAPES, SIZES
    from polymodal.encoders.convnet import ConvNetConfig
    from polymodal.models.contrastive import ContrastiveModel, clip_tiny

    torch.manual_seed(0)
    clip = ContrastiveModel(replace(clip_tiny(), image_tower="cnn", cnn=ConvNetConfig(image_size=48, widths=[8, 8, 8, 8])))
    save_checkpoint(clip, tmp_path / "clip")
    tower, config = probe.load_tower(str(tmp_path / "clip"))
    x, labels = probe.cell_tokens(tower, config, "train", 12)
    assert x.shape[1] == 8 and 12 <= len(x) <= 36 and all(len(y) == len(x) for y in labels.values())
    assert labels["shape"].max() < len(SHAPES) and labels["color"].max() < len(COLORS) and labels["size"].max() < len(SIZES)
    for source, attribute, classes in (("quickstart", "shape", SHAPES), ("patch", "color", COLORS)):
        tower, config = probe.load_tower(source)
        x, labels = probe.cell_tokens(tower, config, "train", 60)
        y = labels[attribute]
        correct = probe.mlp_probe_correct(x[:80], y[:80], x[80:], y[80:], len(classes), steps=100)
        assert correct.float().mean() > 0.3, (source, attribute)


def test_feature_probe_reads_color_from_a_cell_token_model():
    """probe_mmllm_features: features of the object's cell; an untrained quickstart model's tokens carry color."""
    import probe_mmllm_features as probe

    from polymodal.data.conversation import ImageProcessor
    from polymodal.models.mmllm import MultimodalLM
    from polymodal.quickstart import stage_config

    torch.manual_seed(0)
    config = stage_config("align").model
    config.lm.vocab_size, config.image_token_id = 64, 63
    model = MultimodalLM(config).eval()
    processor = ImageProcessor.for_model(config)
    x, colors, shapes = probe.cell_features(model, processor, "train", 40)
    assert x.shape == (40, config.lm.hidden_size) and colors.max() < 8 and shapes.max() < 6
    # Untrained, the tower's random filters and the projector are fixed maps of the pixels: color is still readable.
    assert probe.probe_accuracy(x[:30], colors[:30], x[30:], colors[30:], 8) > 0.3


def test_qtype_probe_trains_on_one_question_type():
    import probe_mmllm_qtype

    from polymodal.data.world import World

    for scene in World("train", image_size=96, num_objects=(1, 3)).scenes(5):
        user, answer = probe_mmllm_qtype.one_question_chat(scene, "existence")
        asked = [qa for qa in scene.questions() if qa.question == user["content"].split("\n", 1)[1]]
        assert asked and asked[0].qtype == "existence" and asked[0].answer == answer["content"]
    r = probe_mmllm_qtype.probe_qtype("existence", steps=2, docs=4, eval_scenes=2)
    assert len(r["losses"]) == 2 and all(math.isfinite(v) for v in r["losses"])
    assert 0.0 <= r["before"][0] <= 1.0 and 0.0 <= r["after"][0] <= 1.0


def test_qtype_probe_from_an_align_checkpoint_refreshes_the_tokens_it_never_saw(tmp_path, monkeypatch):
    import probe_mmllm_qtype

    from polymodal.checkpoint import save_checkpoint
    from polymodal.quickstart import stage_config
    from polymodal.recipes.mmllm import build_mmllm
    from polymodal.recipes.seen_tokens import SEEN_TOKENS_FILE, SeenTokens

    model, tokenizer = build_mmllm(stage_config("align"))
    folder = save_checkpoint(model, tmp_path / "align", tokenizer)
    seen = SeenTokens(model.config.lm.vocab_size)
    seen.seen[:11] = True
    seen.save(folder / SEEN_TOKENS_FILE)
    refreshed = []
    real = probe_mmllm_qtype.reinit_unseen_tokens
    monkeypatch.setattr(probe_mmllm_qtype, "reinit_unseen_tokens",
                        lambda lm, record, seed: refreshed.append(real(lm, record, seed)) or refreshed[-1])
    r = probe_mmllm_qtype.probe_qtype("existence", init=str(folder), steps=1, docs=2, eval_scenes=1)
    assert refreshed == [model.config.lm.vocab_size - 11] and len(r["losses"]) == 1


def test_qtype_probe_with_the_scene_as_text():
    import probe_mmllm_qtype

    from polymodal.data.world import World
    from polymodal.data.world.text import questions

    scene = next(iter(World("train", image_size=96, num_objects=(2, 3)).scenes(1)))
    words = probe_mmllm_qtype.scene_words(scene)
    assert words == " , ".join(f"{o.color} {o.shape}" for o in scene.objects)
    scrambled = probe_mmllm_qtype.scene_words(scene, scrambled=True).split()
    asked = {w for qa in questions(scene) for w in qa.question.rstrip("?").split()}
    assert len(scrambled) == len(words.split()) and not asked & set(scrambled) - {","}
    user, _ = probe_mmllm_qtype.one_question_chat(scene, "existence", scene_as="words")
    assert user["content"].startswith(words + "\n") and "<image>" not in user["content"]
    r = probe_mmllm_qtype.probe_qtype("existence", steps=2, docs=4, scene_as="scrambled", untied=True, warmup=1)
    assert len(r["losses"]) == 2 and r["before"] is None and r["after"] is None
    with pytest.raises(ValueError, match="scene_as"):
        probe_mmllm_qtype.one_question_chat(scene, "existence", scene_as="pixels")


def test_question_templates_hide_colors_and_shapes():
    import probe_mmllm_qtype

    assert probe_mmllm_qtype.question_template("How many purple objects are there?") == "How many C objects are there?"
    assert probe_mmllm_qtype.question_template("How many crosses are there?") == "How many S are there?"
    assert probe_mmllm_qtype.question_template("Is the red star left of the cyan circle?") == "Is the C S left of the C S?"
    from polymodal.data.conversation import ImageProcessor
    from polymodal.data.world import World
    from polymodal.quickstart import stage_config
    from polymodal.recipes.mmllm import build_mmllm

    model, tokenizer = build_mmllm(stage_config("instruct"))
    rows = probe_mmllm_qtype.accuracy_by_template(model, tokenizer, ImageProcessor.for_model(model.config), "count",
                                                  scenes=2)
    asked = [qa for s in World("val", image_size=96, num_objects=(1, 3)).scenes(2) for qa in s.questions()
             if qa.qtype == "count"]
    assert sum(n for _, n, *_ in rows) == len(asked)
    assert all(sum(truth.values()) == sum(answers.values()) == n for _, n, _, truth, answers in rows)


def test_caption_word_probe_scores_an_oracle_perfectly_and_counts_every_word():
    """probe_caption_words: teacher-forced word accuracy; a model whose logits peak at each next
    token scores 100%, and every object of a 2-3 object scene has one color and one shape word."""
    import probe_caption_words as probe

    from polymodal.data.world import World, world_tokenizer
    from polymodal.models.mmllm import MultimodalLM, mmllm_tiny_for

    tokenizer = world_tokenizer()
    torch.manual_seed(0)
    model = MultimodalLM(mmllm_tiny_for(tokenizer))

    class Oracle(MultimodalLM):
        def forward(self, packed=None, **_):
            logits = torch.nn.functional.one_hot(packed.labels.clamp(min=0), self.config.lm.vocab_size).float()
            return type("Out", (), {"logits": logits})()

    oracle = Oracle(model.config)
    objects = sum(len(scene.objects) for scene in World("val", num_objects=(2, 3)).scenes(4))
    result = probe.caption_word_accuracy(oracle, tokenizer, "located", scenes=4)
    assert result["color"] == (1.0, objects) and result["shape"] == (1.0, objects)
    assert result["place"][0] == 1.0 and result["place"][1] >= objects
    untrained = probe.caption_word_accuracy(model, tokenizer, "grounded", scenes=4)
    assert all(0.0 <= accuracy <= 1.0 and count >= objects for accuracy, count in untrained.values())


def test_bench_dit_runs_both_comparisons_quickly():
    import bench_dit

    train = bench_dit.main(["--quick", "--threads", "1", "--iters", "1"])
    assert train["max_abs_diff"] < 1e-4
    for section in ("train", "inference"):
        assert all(_finite_positive(train[section][name]["images_per_s"])
                   for name in ("polymodal", "polymodal_plain", "diffusers"))
        assert _finite_positive(train[section]["ratio_plain"]["median"])
    sampling = bench_dit.main(["--quick", "--sampling", "--threads", "1", "--iters", "1"])
    assert _finite_positive(sampling["ratio"]["median"])


def test_bench_dit_floor_records_every_linear_layer_of_our_dit():
    # Unhooked, q/k/v run as one matmul and fc1 inside the GELU kernel; the floor must still see them.
    import bench_dit

    ours, _ = bench_dit.build_pair(bench_dit.diffusers_kwargs(quick=True))
    data = bench_dit.make_batch(ours, 2)
    recorded = [layer for layer, _ in bench_dit.linear_calls(ours, (data["latents"], data["timesteps"],
                                                                      data["class_labels"]))]
    every = [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    assert len(recorded) == len(every) and {id(m) for m in recorded} == {id(m) for m in every}


def test_bench_attention_times_both_sides_quickly():
    import bench_attention

    result = bench_attention.main(["--quick", "--threads", "1", "--iters", "1"])
    for row in result["rows"]:
        assert row["max_abs_diff"] < 1e-4
        for section in ("train", "inference"):
            assert all(_finite_positive(row[section][name]) for name in ("sdpa", "fused", "ratio"))


def test_fresh_memory_probe_times_both_ways():
    import probe_fresh_memory

    result = probe_fresh_memory.main(["--threads", "1", "--calls", "2", "--shape", "4", "64"])
    assert _finite_positive(result["gelu_reused_ms"]) and _finite_positive(result["gelu_fresh_ms"])
    assert result["fresh_faults_per_call"] >= 0


def test_bench_unified_runs_quickly_and_both_sides_start_from_the_same_loss():
    import bench_unified

    result = bench_unified.main(["--quick", "--threads", "1"])
    first = result["first_loss"]
    assert first["polymodal_packed"] == pytest.approx(first["transformers_padded"], rel=1e-3)
    assert result["logits_max_abs_diff"] < 1e-3
    for name in ("polymodal_packed", "transformers_padded"):
        assert _finite_positive(result[name]["real_tokens_per_s"])
    assert result["real_tokens_per_step"] < math.prod(result["padded_shape"])  # padding counted out


def test_tokenizer_ceiling_probe_scores_reconstructions(tmp_path):
    import probe_tokenizer_ceiling

    from polymodal.recipes.runner import run_recipe

    run_recipe("configs/image_vq/tiny.yaml", [f"train.out_dir={tmp_path / 'vq'}", "train.steps=2", "eval_n=0"])
    out = probe_tokenizer_ceiling.main([str(tmp_path / "vq" / "final"), "--n", "2"])
    assert set(out) == {1, 2} and all(0.0 <= v <= 1.0 for column in out.values() for v in column.values())


def test_dit_profile_probe_sorts_kernels_into_families_and_sums_them():
    import probe_dit_profile

    assert probe_dit_profile.family_of("aten::addmm") == "matmul"
    assert probe_dit_profile.family_of("aten::gelu_backward") == "gelu"
    assert probe_dit_profile.family_of("aten::layer_norm") == "other"
    result = probe_dit_profile.main(["--quick", "--threads", "1"])
    for name in ("polymodal", "diffusers"):
        parts = result[name]
        assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))
        assert parts["matmul"] > 0 and parts["total"] > 0
    assert result["ratio_profiled"] == pytest.approx(result["diffusers"]["total"] / result["polymodal"]["total"])
