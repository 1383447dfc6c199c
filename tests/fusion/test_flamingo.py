"""Flamingo: identity at init, the most-recent-image mask, packing, cached decoding, the recipe and few-shot eval."""
import json
from pathlib import Path

import pytest
import torch

import polymodal
from polymodal.cli import main
from polymodal.data.world import world_tokenizer
from polymodal.errors import ConfigError
from polymodal.eval.flamingo import few_shot_prompt
from polymodal.models.flamingo import (
    Flamingo,
    FlamingoConfig,
    flamingo_tiny,
    media_index_from_ids,
    media_index_from_packed,
)
from polymodal.projectors import ProjectorConfig
from polymodal.sequence import Document, Segment, pack_documents

ROOT = Path(__file__).resolve().parents[2]
MARK = 250  # flamingo_tiny's image marker id


def _model(open_gates: bool) -> Flamingo:
    torch.manual_seed(0)
    model = Flamingo(flamingo_tiny()).eval()
    if open_gates:
        with torch.no_grad():
            for layer in model.xattn:
                layer.attn_gate.fill_(0.7)
                layer.ffw_gate.fill_(-0.4)
    return model


def test_gates_at_zero_leave_the_frozen_lm_output_unchanged_exactly():
    model = _model(open_gates=False)
    ids = torch.tensor([[5, MARK, 7, 8, MARK, 9, 10], [MARK, 3, 4, 5, 6, MARK, 2]])
    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(ids, pixels).logits, model.lm(ids).logits)
    assert all(layer.attn_gate.item() == layer.ffw_gate.item() == 0.0 for layer in model.xattn)


def test_most_recent_image_index_from_ids_and_from_packed_documents():
    ids = torch.tensor([[5, MARK, 7, MARK, 9], [1, 2, MARK, 4, 5]])
    valid = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    assert media_index_from_ids(ids, MARK, valid).tolist() == [[-1, 0, 0, 1, 1], [-1, -1, 2, 2, 2]]
    pad_marker = torch.tensor([[MARK, MARK, 3]])  # a left-padding position that holds the marker id is no image
    assert media_index_from_ids(pad_marker, MARK, torch.tensor([[0, 1, 1]], dtype=torch.bool)).tolist() == [[-1, 0, 0]]

    def doc(layout):
        return Document([Segment("image", tokens=[MARK], data=torch.zeros(3, 2, 2), target=None) if p == "i"
                         else Segment("text", tokens=[1, 2]) for p in layout])

    batch = pack_documents([doc("titi"), doc("tt"), doc("it")], max_tokens=16)
    assert batch.token_ids.shape[0] == 1 and batch.document_rows == [(0, 0), (0, 6), (0, 10)]
    # Images are numbered in layout order; a document never sees another document's image.
    assert media_index_from_packed(batch).tolist() == [[-1, -1, 0, 0, 0, 1, -1, -1, -1, -1, 2, 2, 2]]


def test_text_attends_only_to_the_most_recent_preceding_image():
    model = _model(open_gates=True)
    ids = torch.tensor([[5, 6, MARK, 7, 8, MARK, 9, 10]])
    first, second = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        base = model(ids, torch.cat([first, second])).logits
        new_first = model(ids, torch.cat([torch.randn(1, 3, 32, 32), second])).logits
        new_second = model(ids, torch.cat([first, torch.randn(1, 3, 32, 32)])).logits
        plain = model.lm(ids).logits
    # Before any image: the frozen LM exactly. After the second image: it alone matters there.
    assert torch.equal(base[:, :2], plain[:, :2])
    # Positions 5.. see the second image only, but read earlier text whose states the first image
    # shaped; so the first image reaches them through self-attention only — the mask itself is
    # checked on the gated layer's own inputs:
    media = model.encode_images(torch.cat([first, second]))
    index = media_index_from_ids(ids, MARK, torch.ones_like(ids, dtype=torch.bool))
    _, mask, has = model._media_inputs(media, index)
    k = model.config.projector.num_queries
    sees_second = torch.zeros(2 * k, dtype=torch.bool)
    sees_second[k:] = True
    assert torch.equal(mask[0, 0, 5:], sees_second.expand(3, -1)) and torch.equal(mask[0, 0, 2:5], ~sees_second.expand(3, -1))
    assert has[0, :2].sum() == 0 and has[0, 2:].all()
    assert not torch.allclose(base[:, 2:5], new_first[:, 2:5]) and torch.equal(base[:, 2:5], new_second[:, 2:5])
    assert not torch.allclose(base[:, 5:], new_second[:, 5:])


def test_packed_forward_equals_per_document_forward_with_open_gates():
    model = _model(open_gates=True)
    g = torch.Generator().manual_seed(1)

    def doc(layout):
        return Document([Segment("image", tokens=[MARK], data=torch.randn(3, 32, 32, generator=g), target=None)
                         if p == "i" else Segment("text", tokens=torch.randint(0, MARK, (3,), generator=g))
                         for p in layout])

    docs = [doc("titit"), doc("tt"), doc("it"), doc("iti")]
    batch = pack_documents(docs, max_tokens=32)
    assert batch.token_ids.shape[0] < len(docs)
    with torch.no_grad():
        packed = model(packed=batch).logits
        for d, document in enumerate(docs):
            ids = torch.cat([s.tokens for s in document.segments])[None]
            images = [s.data for s in document.segments if s.data is not None]
            single = model(ids, torch.stack(images) if images else None).logits[0]
            row, start = batch.document_rows[d]
            torch.testing.assert_close(packed[row, start:start + len(document)], single, atol=1e-5, rtol=1e-5)


def test_cached_decoding_keeps_reading_the_prompt_image():
    model = _model(open_gates=True)
    ids, pixels = torch.tensor([[5, MARK, 7, 8, MARK, 9]]), torch.randn(2, 3, 32, 32)
    nxt = torch.tensor([[11], [12]])
    with torch.no_grad():
        cache = model.new_kv_cache(1, 16)
        model(ids, pixels, kv_cache=cache)
        step1 = model(nxt[:1], kv_cache=cache).logits[:, -1]
        step2 = model(nxt[1:], kv_cache=cache).logits[:, -1]
        full = model(torch.cat([ids, nxt.T], dim=1), pixels).logits
    torch.testing.assert_close(step1, full[:, -2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step2, full[:, -1], atol=1e-5, rtol=1e-5)
    assert MARK not in model.generate(ids.tolist(), pixels, max_new_tokens=4)[0]


def test_config_and_input_errors_name_the_field():
    base = flamingo_tiny()
    with pytest.raises(ConfigError, match="projector.kind"):
        FlamingoConfig(vision=base.vision, lm=base.lm, projector=ProjectorConfig(kind="mlp"), image_token_id=5)
    with pytest.raises(ConfigError, match="image_token_id"):
        FlamingoConfig(vision=base.vision, lm=base.lm, image_token_id=base.lm.vocab_size)
    with pytest.raises(ConfigError, match="cross_attention_every"):
        FlamingoConfig(vision=base.vision, lm=base.lm, image_token_id=5, cross_attention_every=3)
    model = _model(open_gates=False)
    with pytest.raises(ValueError, match="2 images were given but the input holds image markers .* for 1"):
        model(torch.tensor([[MARK, 3]]), torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(torch.tensor([[MARK, 3]]))
    assert FlamingoConfig(vision=base.vision, lm=base.lm, image_token_id=5, cross_attention_every=2).fused_layers == [1]


def test_few_shot_prompts_nest():
    tokenizer = world_tokenizer()
    marker = tokenizer.token_to_id("<image>")
    shots = [(torch.full((3, 2, 2), float(i)), f"Q{i}?", f"a{i}") for i in range(4)]
    query = (torch.zeros(3, 2, 2), "What color is the circle?")
    two, two_pixels = few_shot_prompt(tokenizer, marker, shots[:2], query)
    four, _ = few_shot_prompt(tokenizer, marker, shots, query)
    zero, _ = few_shot_prompt(tokenizer, marker, [], query)
    assert two.count(marker) == len(two_pixels) == 3 and four.count(marker) == 5 and zero.count(marker) == 1
    assert tokenizer.decode(zero) == "<image>\nQ: What color is the circle?\nA:"
    assert tokenizer.decode(two).startswith("<image>\nQ: Q0?\nA: a0\n<image>\nQ: Q1?\nA: a1\n<image>")


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tiny_recipe_and_a_frozen_lm_from_checkpoint(tmp_path):
    out = tmp_path / "fl"
    assert main(["train", str(ROOT / "configs/fusion/flamingo_tiny.yaml"), f"train.out_dir={out}"]) == 0
    losses = _losses(out)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    assert main(["eval", str(out / "final"), "--n", "4", "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert {"vqa_0shot", "vqa_2shot", "vqa_4shot"} <= set(metrics)

    # Around a trained LM, by default only the resampler and the gates train: the LM is untouched.
    lm_out, wrapped = tmp_path / "lm", tmp_path / "wrapped"
    assert main(["train", str(ROOT / "configs/lm/tiny.yaml"), f"train.out_dir={lm_out}", "train.steps=3"]) == 0
    assert main(["train", str(ROOT / "configs/fusion/flamingo_tiny.yaml"), f"train.out_dir={wrapped}",
                 f"lm_from={lm_out / 'final'}", "trainable=null", "train.steps=4"]) == 0
    lm, _ = polymodal.load(lm_out / "final")
    model, _ = polymodal.load(wrapped / "final")
    assert model.family == "flamingo"
    for name, tensor in lm.state_dict().items():
        assert torch.equal(model.lm.state_dict()[name], tensor), name
    assert any(layer.attn_gate.item() != 0.0 for layer in model.xattn)

    # Around an mmllm checkpoint: its LM and its vision tower, both frozen.
    mm_out, from_mm = tmp_path / "mm", tmp_path / "from_mm"
    assert main(["train", str(ROOT / "configs/mmllm/tiny_align.yaml"), f"train.out_dir={mm_out}",
                 "train.steps=2"]) == 0
    assert main(["train", str(ROOT / "configs/fusion/flamingo_tiny.yaml"), f"train.out_dir={from_mm}",
                 f"lm_from={mm_out / 'final'}", "trainable=null", "train.steps=2"]) == 0
    mm, _ = polymodal.load(mm_out / "final")
    model, _ = polymodal.load(from_mm / "final")
    for name, tensor in mm.vision.state_dict().items():
        assert torch.equal(model.vision.state_dict()[name], tensor), name
    assert model.config.vision == mm.config.vision and model.config.lm == mm.config.lm
