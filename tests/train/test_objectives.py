"""Objectives over the packed batch: what the packer records per segment target, and the token losses
checked against cross-entropy computed by hand from the full logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polymodal.backbones.decoder import DecoderLM
from polymodal.models.lm import lm_tiny
from polymodal.sequence import IGNORE_INDEX, MASKED_TOKEN, PAYLOAD, Document, Segment, pack_documents
from polymodal.train.objectives import masked_token_loss, next_token_loss, sequence_loss

MASK_ID = 255


def _masked_doc(seed: int, length: int = 8) -> tuple[Document, torch.Tensor, torch.Tensor]:
    """A Show-o-style image span: codes with some positions replaced by MASK_ID in the inputs."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 200, (length,), generator=g)
    masked = torch.rand(length, generator=g) < 0.5
    masked[0] = True
    inputs = codes.masked_fill(masked, MASK_ID)
    prompt = Segment("text", tokens=torch.randint(0, 200, (3,), generator=g), target=None)
    image = Segment("image", tokens=inputs, target=MASKED_TOKEN, masked=masked, targets=codes, bidirectional=True)
    return Document([prompt, image]), codes, masked


def _model() -> DecoderLM:
    torch.manual_seed(0)
    model = DecoderLM(lm_tiny())
    with torch.no_grad():  # larger weights: logits that depend on the inputs, so a wrong position shows
        for p in model.parameters():
            if p.ndim > 1:
                p.mul_(8.0)
    return model


def test_the_packer_records_masked_targets_at_the_masked_positions_only():
    doc, codes, masked = _masked_doc(0)
    text = Document.from_tokens(torch.arange(5, 11))
    batch = pack_documents([text, doc], max_tokens=32)
    row, start = batch.document_rows[1]
    span = batch.masked_labels[row, start + 3:start + 11]
    assert torch.equal(span, codes.masked_fill(~masked, IGNORE_INDEX))
    assert int((batch.masked_labels != IGNORE_INDEX).sum()) == int(masked.sum())
    # The masked span carries no next-token targets; the text document does.
    assert (batch.labels[row, start:start + 11] == IGNORE_INDEX).all()
    text_row, text_start = batch.document_rows[0]
    assert batch.labels[text_row, text_start:text_start + 5].tolist() == list(range(6, 11))


def test_masked_token_loss_is_cross_entropy_at_the_masked_positions():
    model = _model()
    docs = [_masked_doc(s)[0] for s in range(3)]
    batch = pack_documents(docs, max_tokens=64)
    logits = model(packed=batch).logits  # (R, L, V)
    scored = batch.masked_labels != IGNORE_INDEX
    expected = F.cross_entropy(logits[scored].float(), batch.masked_labels[scored])
    torch.testing.assert_close(masked_token_loss(model, batch), expected)
    # Each masked position predicts its own original code: shifting the targets by one changes the loss.
    shifted = F.cross_entropy(logits[:, :-1][scored[:, 1:]].float(), batch.masked_labels[:, 1:][scored[:, 1:]])
    assert not torch.isclose(shifted, expected)


def test_sequence_loss_sums_every_target_kind_of_a_mixed_batch():
    model = _model()
    batch = pack_documents([Document.from_tokens(torch.arange(20, 30)), _masked_doc(1)[0]], max_tokens=64)
    total = sequence_loss(model, batch)
    torch.testing.assert_close(total, next_token_loss(model, batch) + masked_token_loss(model, batch))
    with pytest.raises(ValueError, match="no next-token or masked-token targets"):
        sequence_loss(model, pack_documents([Document.from_tokens(torch.arange(4), target=None)], 8))


def test_truncation_keeps_the_masked_fields_aligned():
    doc, codes, masked = _masked_doc(2, length=10)
    batch = pack_documents([doc], max_tokens=9, truncate=True)  # 3 prompt + 6 of the 10 codes
    assert torch.equal(batch.masked_labels[0, 3:9], codes[:6].masked_fill(~masked[:6], IGNORE_INDEX))


def test_payload_targets_are_listed_for_the_family_objective():
    latents = torch.randn(4, 2, 2)
    doc = Document([Segment("text", tokens=torch.arange(3), target=None),
                    Segment("image", data=latents, length=4, target=PAYLOAD, bidirectional=True)])
    batch = pack_documents([doc, Document.from_tokens(torch.arange(5))], max_tokens=16)
    (placement,) = batch.payload_placements()
    assert placement.segment.data is latents and placement.length == 4
    assert (batch.labels[placement.row, placement.start:placement.start + 4] == IGNORE_INDEX).all()


def test_segment_targets_are_checked():
    with pytest.raises(ValueError, match="needs `masked`"):
        Segment("image", tokens=torch.arange(4), target=MASKED_TOKEN)
    with pytest.raises(ValueError, match="`masked` has 3 entries for 4 positions"):
        Segment("image", tokens=torch.arange(4), target=MASKED_TOKEN, masked=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="belong to masked_token segments"):
        Segment("text", tokens=torch.arange(4), masked=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="target must be one of"):
        Segment("text", tokens=torch.arange(4), target="diffusion")
    assert Segment("image", data=torch.zeros(3), length=4).target is None  # no tokens: nothing to predict
