"""Parity of imported BLIP folders (retrieval: ITC + ITM; captioning: decoder logits and greedy
captions) against transformers on tiny random configs."""
from __future__ import annotations

import json

import pytest
import torch
from interop_parity import max_abs_diff, randomize_
from safetensors.torch import load_file, save_file
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

import polymodal
from polymodal.checkpoint import CheckpointMismatchError
from polymodal.errors import CheckpointError
from polymodal.interop import import_hf
from polymodal.models.blip import BlipModel

TOL = 1e-4
VOCAB, BOS, SEP, PAD = 99, 97, 98, 0
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
TEXT = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32, bos_token_id=BOS, sep_token_id=SEP, eos_token_id=SEP, pad_token_id=PAD)
KINDS = {"retrieval": BlipForImageTextRetrieval, "captioning": BlipForConditionalGeneration}


def _hf_model(kind: str):
    config = BlipConfig(vision_config=VISION, text_config=TEXT, image_text_hidden_size=16)
    torch.manual_seed(0)
    model = randomize_(KINDS[kind](config))
    gen = torch.Generator().manual_seed(1)  # BERT-style `LayerNorm` scales escape randomize_'s "norm" test
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.copy_(1 + 0.15 * torch.randn(p.shape, generator=gen))
    return model


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pixels (3, 3, 32, 32), ids (3, 7) "[CLS] ... [SEP]" with a right-padded row, mask."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, BOS, (3, 7), generator=gen)
    ids[:, -1] = SEP
    mask = torch.ones_like(ids)
    ids[2, 4], ids[2, 5:], mask[2, 5:] = SEP, PAD, 0
    return torch.randn(3, 3, 32, 32, generator=gen), ids, mask


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{kind: (transformers model, its save_pretrained folder)}."""
    out = {}
    for kind in KINDS:
        hf = _hf_model(kind)
        folder = tmp_path_factory.mktemp(kind)
        hf.save_pretrained(folder)
        out[kind] = hf, folder
    return out


def test_blip_retrieval_itm_and_itc_match_transformers(saved):
    hf, folder = saved["retrieval"]
    ours = polymodal.load(folder).model
    assert isinstance(ours, BlipModel) and ours.config.retrieval and not ours.config.captioning
    pixels, ids, mask = _inputs()
    with torch.no_grad():
        ref_itm = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask).itm_score  # (3, 2)
        ref_itc = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False).itm_score
        tokens, _ = ours.encode_image_tokens(pixels)
        got_itm = ours.itm_logits(tokens, ids, mask)
        image = torch.nn.functional.normalize(ours.encode_image(pixels), dim=-1)
        text = torch.nn.functional.normalize(ours.encode_text(ids, mask), dim=-1)
    assert ref_itm.std() > 0.1
    assert max_abs_diff(got_itm, ref_itm) <= TOL
    assert max_abs_diff(image @ text.t(), ref_itc) <= TOL
    # The imported filter's P(match) is transformers' softmax (ids kept as given: no [ENC] swap).
    assert max_abs_diff(ours.match_probability(pixels, ids, mask), ref_itm.softmax(-1)[:, 1]) <= TOL


def test_blip_caption_logits_and_greedy_captions_match_transformers(saved):
    hf, folder = saved["captioning"]
    ours, _ = import_hf(folder)
    assert ours.config.captioning and not ours.config.retrieval and ours.tasks == ()
    pixels, ids, mask = _inputs()
    ids[:, 0] = BOS
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
        tokens, _ = ours.encode_image_tokens(pixels)
        got = ours.caption_logits(tokens, ids)
    real = mask.bool()  # padded positions are never predicted from; transformers masks them differently
    assert ref.std() > 0.1
    assert max_abs_diff(got[real], ref[real]) <= TOL
    ref_ids = hf.generate(pixel_values=pixels, max_new_tokens=6, do_sample=False, num_beams=1, min_length=0)
    expected = []
    for row in ref_ids[:, 1:].tolist():  # transformers returns the [DEC] prefix
        expected.append(row[:row.index(SEP)] if SEP in row else row)
    expected = [[t for t in row if t != PAD] for row in expected]
    assert any(expected) and ours.generate_captions(pixels, max_new_tokens=6) == expected


@pytest.mark.parametrize("kind", list(KINDS))
def test_blip_folder_errors_are_one_clear_line(saved, kind, tmp_path):
    _, folder = saved[kind]
    tensors = load_file(str(folder / "model.safetensors"))
    missing = next(name for name in tensors if "crossattention.self.key.weight" in name)
    tensors.pop(missing)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=missing.replace(".", r"\.")):
        import_hf(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["hidden_act"] = "swish"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="text_config.hidden_act 'swish'") as err:
        import_hf(tmp_path)
    assert "\n" not in str(err.value)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["BlipForQuestionAnswering"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="BlipForQuestionAnswering"):
        import_hf(tmp_path)


def test_convert_writes_a_polymodal_checkpoint_of_an_hf_folder(saved, tmp_path):
    from polymodal.cli import main

    _, folder = saved["captioning"]
    assert main(["convert", str(folder), str(tmp_path / "out")]) == 0
    converted, direct = polymodal.load(tmp_path / "out").model, polymodal.load(folder).model
    pixels, ids, _ = _inputs()
    ids[:, 0] = BOS
    with torch.no_grad():
        tokens, _ = direct.encode_image_tokens(pixels)
        assert torch.equal(converted.caption_logits(tokens, ids), direct.caption_logits(tokens, ids))
