"""Parity of the Chameleon LM import (polymodal.interop.hf_chameleon_lm) against transformers,
and the QK-norm option of the decoder backbone it needs."""
from __future__ import annotations

import json

import pytest
import torch
from interop_parity import max_abs_diff
from transformers import ChameleonConfig, ChameleonForConditionalGeneration
from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping

from polymodal.backbones.decoder import DecoderConfig, DecoderLM
from polymodal.checkpoint import CheckpointMismatchError, load_checkpoint, save_checkpoint
from polymodal.config import config_from_mapping
from polymodal.errors import ConfigError
from polymodal.interop.hf_chameleon_lm import (
    chameleon_decoder_config,
    chameleon_image_vocabulary,
    chameleon_lm_state,
)
from polymodal.models.lm import lm_tiny
from polymodal.nn.attention import Attention

TOL = 1e-4
VOCAB, NUM_CODES, FIRST_CODE_TOKEN = 300, 64, 100
IMAGE, BOI, EOI = 200, 201, 202
TEXT_IDS = [i for i in range(VOCAB) if not FIRST_CODE_TOKEN <= i < FIRST_CODE_TOKEN + NUM_CODES]


def _code_name(code: int) -> str:
    """transformers' image-token spelling: IMGIMG + decimal digits as letters A..J + Z."""
    return "IMGIMG" + "".join("ABCDEFGHIJ"[int(d)] for d in str(code)) + "Z"


def _vocabulary_map() -> dict[str, int]:
    """Text tokens, 64 image codes on ids 100..163 in a shuffled order (so code order != id
    order), and the three image markers."""
    vocab = {f"<t{i}>": i for i in TEXT_IDS if i not in (IMAGE, BOI, EOI)}
    ids = torch.randperm(NUM_CODES, generator=torch.Generator().manual_seed(3)) + FIRST_CODE_TOKEN
    vocab.update({_code_name(code): int(token) for code, token in enumerate(ids)})
    vocab.update({"<image>": IMAGE, "<racm3:break>": BOI, "<eoss>": EOI})
    return vocab


def _randomize(model: torch.nn.Module, std: float = 0.15) -> torch.nn.Module:
    """Random values for every parameter, norm scales around 1 (the (heads, head_dim) q/k norm
    weights included, so their per-head affine is exercised; their biases get noise too).

    A std above HF's 0.02 init keeps the logits far from constant, so a wrong mapping shows."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(1 + noise if "norm" in name and name.endswith("weight") else noise)
    return model.eval()


@pytest.fixture(scope="module")
def pair():
    """(transformers model, its config.json dict, our DecoderLM loaded through the converter)."""
    config = ChameleonConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, vocabulary_map=_vocabulary_map(),
        # A large RMSNorm eps and a non-default theta show a converter that reads the wrong key;
        # the q/k norms keep their fixed 1e-5.
        rms_norm_eps=0.05, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        vq_config=dict(embed_dim=32, num_embeddings=NUM_CODES, latent_channels=32, base_channels=32,
                       channel_multiplier=[1, 2], resolution=16, num_res_blocks=1, attn_resolutions=[]))
    torch.manual_seed(0)
    hf = _randomize(ChameleonForConditionalGeneration(config))
    cfg = json.loads(hf.config.to_json_string())  # what the folder's config.json holds
    ours = DecoderLM(chameleon_decoder_config(cfg)).eval()
    ours.load_state_dict(chameleon_lm_state(hf.state_dict(), ours.config))
    return hf, cfg, ours


def _reference_logits(hf, ids, **kwargs) -> torch.Tensor:
    """transformers' logits without its image-token mask.

    ChameleonForConditionalGeneration.forward sets every image-code column (the IMGIMG tokens)
    to the dtype minimum, so a text-only generate() never emits them; that is a generation
    policy, not the network. The network's own logits are ChameleonModel's hidden states through
    lm_head, which we compare on every column; `test_masked_logits_agree_off_image_columns`
    checks the masked forward on the other columns."""
    return hf.lm_head(hf.model(ids, **kwargs).last_hidden_state)


def _ids(pool: list[int], batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    pool = torch.tensor(pool)
    return pool[torch.randint(0, len(pool), (batch, length), generator=torch.Generator().manual_seed(seed))]


def _image_batch() -> torch.Tensor:
    """Text, then <racm3:break> + image-code tokens + <eoss>, then text: the ids the LM reads
    once the VQ codes are spliced in (passed directly, no pixels)."""
    text = _ids(TEXT_IDS, length=4)
    codes = _ids(list(range(FIRST_CODE_TOKEN, FIRST_CODE_TOKEN + NUM_CODES)), length=9, seed=2)
    marks = torch.tensor([[BOI], [BOI]]), torch.tensor([[EOI], [EOI]])
    return torch.cat([text, marks[0], codes, marks[1], text.flip(-1)], dim=1)


@pytest.mark.parametrize("batch", ["text", "image"])
def test_logits_match_transformers(pair, batch):
    hf, _, ours = pair
    ids = _ids(TEXT_IDS) if batch == "text" else _image_batch()
    with torch.no_grad():
        ref = _reference_logits(hf, ids)
        got = ours(ids).logits
    assert ref.std() > 0.1, "reference logits are nearly constant; the parity check would be vacuous"
    assert max_abs_diff(got, ref) <= TOL


def test_masked_logits_agree_off_image_columns(pair):
    hf, _, ours = pair
    ids = _image_batch()
    with torch.no_grad():
        masked = hf(ids).logits
        got = ours(ids).logits
    codes = list(range(FIRST_CODE_TOKEN, FIRST_CODE_TOKEN + NUM_CODES))
    assert (masked[..., codes] == torch.finfo(masked.dtype).min).all()
    assert max_abs_diff(got[..., TEXT_IDS], masked[..., TEXT_IDS]) <= TOL


def test_unfused_projections_match_fused(pair, monkeypatch):
    """The three-matmul path (taken under LoRA) normalises q/k like the fused one."""
    _, _, ours = pair
    ids = _image_batch()
    with torch.no_grad():
        fused = ours(ids).logits
        monkeypatch.setattr(Attention, "_plain_projections", lambda self: False)
        unfused = ours(ids).logits
    assert max_abs_diff(fused, unfused) <= 1e-5


def test_left_padded_batch_matches_transformers(pair):
    hf, _, ours = pair
    ids = _image_batch()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # row 0: four left pads
    # HF derives no positions from the mask in forward(); give it the ones generate() would use.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = _reference_logits(hf, ids, attention_mask=mask, position_ids=positions)
        got = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert max_abs_diff(got[real], ref[real]) <= TOL


def test_cached_decoding_matches_full_forward(pair):
    hf, _, ours = pair
    ids = _image_batch()
    prompt = 5
    cache = ours.new_kv_cache(ids.shape[0], ids.shape[1])
    with torch.no_grad():
        full = ours(ids).logits
        steps = [ours(ids[:, :prompt], kv_cache=cache).logits]
        for i in range(prompt, ids.shape[1]):  # then one token at a time
            steps.append(ours(ids[:, i:i + 1], kv_cache=cache).logits)
        ref = _reference_logits(hf, ids)
    cached = torch.cat(steps, dim=1)
    assert max_abs_diff(cached, full) <= TOL
    assert max_abs_diff(cached, ref) <= TOL


def test_config_fields(pair):
    _, cfg, ours = pair
    c = ours.config
    assert (c.qk_norm, c.rms_norm_eps, c.rope_theta, c.rope_scaling) == ("head_layernorm", 0.05, 500.0, None)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.resolved_head_dim) == (2, 4, 2, 16)
    assert (c.bos_token_id, c.eos_token_id, c.tie_word_embeddings) == (1, 2, False)
    # A transformers 4.x config.json: top-level rope_theta / rope_scaling, and keys left at their
    # ChameleonConfig defaults omitted.
    old = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "rms_norm_eps", "bos_token_id")}
    c4 = chameleon_decoder_config({**old, "rope_theta": 500.0, "rope_scaling": None})
    assert (c4.rope_theta, c4.rms_norm_eps, c4.bos_token_id) == (500.0, 1e-5, 1)


def test_state_names_of_the_qk_norms(pair):
    _, _, ours = pair
    state = ours.state_dict()
    assert state["layers.layers.1.attn.q_norm.weight"].shape == (4, 16)
    assert state["layers.layers.1.attn.q_norm.bias"].shape == (4, 16)
    assert state["layers.layers.1.attn.k_norm.weight"].shape == (2, 16)
    assert state["layers.layers.1.attn.k_norm.bias"].shape == (2, 16)


def test_tied_head_loads_strictly(pair):
    hf, cfg, _ = pair
    config = chameleon_decoder_config({**cfg, "tie_word_embeddings": True})
    hf_state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state = chameleon_lm_state(hf_state, config)
    model = DecoderLM(config)
    model.load_state_dict(state)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, hf_state["model.embed_tokens.weight"])


def test_missing_and_unexpected_tensors_are_named(pair):
    hf, _, ours = pair
    hf_state = dict(hf.state_dict())
    del hf_state["model.layers.1.self_attn.k_norm.bias"]
    hf_state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(64)
    hf_state["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointMismatchError) as err:
        chameleon_lm_state(hf_state, ours.config, source="tiny/model.safetensors")
    message = str(err.value)
    assert "tiny/model.safetensors" in message
    assert "missing (1): model.layers.1.self_attn.k_norm.bias" in message
    assert "unexpected (1): model.layers.0.self_attn.extra.weight" in message
    assert "model.layers.0.self_attn.q_norm.weight: file (64,) vs expected (4, 16)" in message
    assert "vqmodel" not in message


@pytest.mark.parametrize("change, field", [
    ({"swin_norm": True}, "swin_norm"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "llama"}, "model_type"),
])
def test_unsupported_configs_are_refused(pair, change, field):
    _, cfg, _ = pair
    with pytest.raises(ConfigError, match=field) as err:
        chameleon_decoder_config({**cfg, **change})
    assert "\n" not in str(err.value)


def test_image_vocabulary_matches_transformers(pair):
    _, cfg, _ = pair
    vocab = cfg["vocabulary_map"]
    ours = chameleon_image_vocabulary(vocab)
    ref = ChameleonImageVocabularyMapping(vocab)
    assert ours.code_to_token == tuple(ref.img2bpe[c] for c in range(NUM_CODES))
    assert ours.code_to_token != tuple(sorted(ours.code_to_token))  # the shuffle is exercised
    assert (ours.image_token_id, ours.boi_token_id, ours.eoi_token_id) == (ref.image_token_id, BOI, EOI)


@pytest.mark.parametrize("edit, pattern", [
    (lambda v: v.pop("<eoss>"), "'<eoss>'"),
    (lambda v: v.pop(_code_name(7)), r"missing \[7\]"),
    (lambda v: v.update(IMGIMGxyZ=290), "'IMGIMGxyZ'"),
    (lambda v: v.update({"IMGIMGAHZ": 290}), "code 7 has two tokens"),
])
def test_bad_image_vocabulary_is_named(pair, edit, pattern):
    vocab = dict(pair[1]["vocabulary_map"])
    edit(vocab)
    with pytest.raises(ConfigError, match=pattern):
        chameleon_image_vocabulary(vocab)


# The backbone's QK-norm option.

def test_unknown_qk_norm_is_a_config_error():
    with pytest.raises(ConfigError, match="qk_norm") as err:
        DecoderConfig(qk_norm="bogus")
    assert "\n" not in str(err.value)


def test_default_config_builds_no_qk_norm():
    model = DecoderLM(lm_tiny())
    assert not any("q_norm" in name or "k_norm" in name for name in model.state_dict())
    # A stored config from before the field existed still loads, without QK-norm.
    stored = {k: v for k, v in vars(lm_tiny()).items() if k != "qk_norm"}
    assert config_from_mapping(DecoderConfig, stored).qk_norm is None


def test_qk_norm_checkpoint_round_trip(pair, tmp_path):
    _, _, ours = pair
    again, _ = load_checkpoint(save_checkpoint(ours, tmp_path / "ckpt"))
    assert again.config == ours.config
    ids = _image_batch()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ours(ids).logits)
