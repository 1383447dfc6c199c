"""Seen-token records and the fresh start they give the next stage's unseen embedding rows."""
import json

import pytest
import torch

from polymodal.backbones.decoder import DecoderLM
from polymodal.models.lm import lm_tiny
from polymodal.recipes.seen_tokens import INIT_STD, SeenTokens, reinit_unseen_tokens


def _lm(tied: bool) -> DecoderLM:
    config = lm_tiny()
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    lm = DecoderLM(config)
    with torch.no_grad():  # the collapsed state an align stage leaves: every row far from the init scale
        lm.embed_tokens.weight.fill_(1.0)
        lm.lm_head.weight.fill_(1.0)
    return lm


def test_records_real_positions_only_and_round_trips(tmp_path):
    seen = SeenTokens(10)
    seen.add(torch.tensor([[1, 2, 0], [3, 3, 0]]), torch.tensor([[True, True, False], [True, True, False]]))
    assert seen.seen.nonzero().flatten().tolist() == [1, 2, 3]  # padding's id 0 is not "seen"
    seen.save(tmp_path / "seen.json")
    assert torch.equal(SeenTokens.load(tmp_path / "seen.json").seen, seen.seen)
    restored = SeenTokens(10)
    restored.load_state_dict(seen.state_dict())  # the training-state form, restored on resume
    assert torch.equal(restored.seen, seen.seen)
    with pytest.raises(ValueError, match="10 ids, this vocabulary 12"):
        SeenTokens(12).load_state_dict(seen.state_dict())
    (tmp_path / "bad.json").write_text(json.dumps({"ids": [1]}))
    with pytest.raises(ValueError, match="bad.json: not a seen-tokens file"):
        SeenTokens.load(tmp_path / "bad.json")


@pytest.mark.parametrize("tied", [True, False])
def test_reinit_touches_exactly_the_unseen_rows(tied):
    lm = _lm(tied)
    vocab = lm.embed_tokens.weight.shape[0]
    seen = SeenTokens(vocab - 4)  # the last 4 ids came after the record (a grown vocabulary): unseen too
    seen.seen[:10] = True
    assert reinit_unseen_tokens(lm, seen, seed=0) == vocab - 10
    for weight in (lm.embed_tokens.weight, lm.lm_head.weight):
        assert (weight.detach()[:10] == 1.0).all()  # seen rows kept
        fresh = weight.detach()[10:]
        assert (fresh != 1.0).all() and abs(float(fresh.std()) - INIT_STD) < 0.005
        rows = torch.nn.functional.normalize(fresh, dim=1)
        assert float((rows @ rows.T).fill_diagonal_(0).abs().max()) < 0.9  # distinct again
    assert (lm.lm_head.weight is lm.embed_tokens.weight) == tied
