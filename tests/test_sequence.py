"""Packing and the shared attention rule: packed forward equals per-document forward."""
import torch

from polymodal.train.objectives import next_token_loss, token_cross_entropy

from polymodal.backbones.decoder import DecoderLM
from polymodal.models.lm import lm_tiny
from polymodal.sequence import IGNORE_INDEX, Document, Segment, attention_rule_dense, pack_documents


def _docs(lengths, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Document.from_tokens(torch.randint(0, vocab, (n,), generator=g)) for n in lengths]


def test_packing_fills_rows_without_inner_padding():
    docs = _docs([5, 9, 3, 7, 16, 1])
    packed = pack_documents(docs, max_tokens=16)
    assert packed.token_ids.shape[1] == 16
    assert packed.num_tokens == sum(len(d) for d in docs)
    for row in packed.document_ids:
        real = (row >= 0).nonzero().flatten()
        assert real.numel() == 0 or int(real.max()) == real.numel() - 1  # padding only at the tail
    for i, doc in enumerate(docs):
        r, s = packed.document_rows[i]
        assert torch.equal(packed.token_ids[r, s:s + len(doc)], doc.segments[0].tokens)
        assert torch.equal(packed.positions[r, s:s + len(doc)], torch.arange(len(doc)))


def test_too_long_document_is_an_error_unless_truncated():
    docs = _docs([20])
    try:
        pack_documents(docs, max_tokens=16)
    except ValueError as err:
        assert "document 0" in str(err)
    else:
        raise AssertionError("expected an error")
    assert pack_documents(docs, max_tokens=16, truncate=True).num_tokens == 16


def test_truncation_never_cuts_an_image_apart_from_its_pixels():
    """An image segment that no longer fits is dropped whole: no orphan placeholders."""
    image = Segment("image", tokens=[7] * 16, data=torch.zeros(3, 4, 4), target=None)
    doc = Document([Segment("text", tokens=torch.arange(5)), image, Segment("text", tokens=torch.arange(3))])
    packed = pack_documents([doc], max_tokens=12, truncate=True)
    assert packed.num_tokens == 5 and not packed.placements
    assert not (packed.token_ids == 7).any()


def test_attention_rule_matches_its_definition():
    # Document 0 holds two bidirectional segments (1 and 3): each sees all of itself, and only the
    # earlier one of the other; document 1 starts with one.
    doc_ids = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1, -1]])
    seg_ids = torch.tensor([[0, 1, 1, 2, 3, 3, 0, 0, 1, -1]])
    bidir = torch.tensor([[False, True, True, False, True, True, True, True, False, False]])
    mask = attention_rule_dense(doc_ids, seg_ids, bidir)[0, 0]
    assert not mask[1, 4] and mask[4, 1] and mask[4, 5]
    for q in range(10):
        for k in range(10):
            same_doc = doc_ids[0, q] == doc_ids[0, k]
            same_bi = seg_ids[0, q] == seg_ids[0, k] and bidir[0, q]
            assert bool(mask[q, k]) == bool(same_doc and (k <= q or same_bi)), (q, k)


def test_packed_forward_equals_per_document_forward_causal():
    torch.manual_seed(0)
    model = DecoderLM(lm_tiny()).eval()
    docs = _docs([5, 9, 3, 7, 12, 4], seed=1)
    packed = pack_documents(docs, max_tokens=20)
    logits = model(packed=packed).logits
    for i, doc in enumerate(docs):
        r, s = packed.document_rows[i]
        ref = model(doc.segments[0].tokens[None]).logits[0]
        torch.testing.assert_close(logits[r, s:s + len(doc)], ref, atol=1e-5, rtol=1e-5)


def test_packed_forward_equals_per_document_forward_bidirectional_segments():
    torch.manual_seed(0)
    model = DecoderLM(lm_tiny()).eval()
    g = torch.Generator().manual_seed(2)

    def mixed(n_text, n_img):
        return Document([
            Segment("text", tokens=torch.randint(0, 256, (n_text,), generator=g)),
            Segment("image", tokens=torch.randint(0, 256, (n_img,), generator=g), bidirectional=True),
            Segment("text", tokens=torch.randint(0, 256, (3,), generator=g)),
        ])

    docs = [mixed(4, 6), mixed(2, 9), mixed(5, 4)]
    packed = pack_documents(docs, max_tokens=40)
    assert packed.token_ids.shape[0] == 1  # all three share one row
    logits = model(packed=packed).logits
    for i, doc in enumerate(docs):
        alone = pack_documents([doc], max_tokens=40)
        ref = model(packed=alone).logits[0]
        r, s = packed.document_rows[i]
        torch.testing.assert_close(logits[r, s:s + len(doc)], ref[: len(doc)], atol=1e-5, rtol=1e-5)
    # The bidirectional span really is bidirectional: an image token sees a later image token.
    mask = packed.dense_mask()[0, 0]
    assert bool(mask[4, 9]) and not bool(mask[0, 1])


def test_scored_head_objective_equals_the_full_head_loss_and_gradients():
    """next_token_loss runs the LM head on the labelled positions only; it must equal the
    cross-entropy of the full logits, in value and gradients."""
    torch.manual_seed(0)
    model = DecoderLM(lm_tiny())
    user = Segment("text", tokens=torch.arange(10, 16), target=None)
    docs = [Document([user, Segment("text", tokens=torch.arange(n, n + 4))]) for n in (20, 40, 60)]
    packed = pack_documents(docs, max_tokens=24)
    full = token_cross_entropy(model(packed=packed).logits, packed.labels)
    full.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    assert model(packed=packed, logits=False).logits is None
    fast = next_token_loss(model, packed)
    fast.backward()
    torch.testing.assert_close(fast, full)
    for grad, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, grad, atol=1e-6, rtol=1e-5)


def test_labels_are_next_tokens_within_documents_and_respect_loss_flags():
    user = Segment("text", tokens=[1, 2, 3], target=None)
    image = Segment("image", data=torch.zeros(3, 4, 4), length=2, bidirectional=True, target=None)
    answer = Segment("text", tokens=[7, 8])
    packed = pack_documents([Document([user, image, answer]), Document.from_tokens([4, 5])], max_tokens=16)
    (r0, s0), (r1, s1) = packed.document_rows
    labels = packed.labels[r0, s0:s0 + 7].tolist()
    # Only tokens of loss-bearing segments are targets; nothing crosses into the next document.
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX]
    assert packed.labels[r1, s1:s1 + 2].tolist() == [5, IGNORE_INDEX]
    assert len(packed.placements) == 1 and packed.placements[0].length == 2


def test_flex_block_mask_encodes_the_same_rule_as_the_dense_mask():
    """FlexAttention's forward runs on CPU too, so the CUDA mask compiler is checked in CI."""
    import warnings

    from polymodal.nn.attention import attend

    g = torch.Generator().manual_seed(0)
    docs = [Document([Segment(tokens=torch.randint(0, 256, (n,), generator=g)),
                      Segment("image", tokens=torch.randint(0, 256, (9,), generator=g), bidirectional=True),
                      Segment(tokens=torch.randint(0, 256, (5,), generator=g))]) for n in (30, 70, 11, 150)]
    packed = pack_documents(docs, max_tokens=256)
    rows, length = packed.token_ids.shape
    q = torch.randn(rows, 4, length, 16, generator=g)
    k, v = torch.randn(rows, 2, length, 16, generator=g), torch.randn(rows, 2, length, 16, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = attend(q, k, v, packed.block_mask())
    dense = attend(q, k, v, packed.dense_mask())
    real = (packed.document_ids >= 0)[:, None, :].expand(-1, 4, -1)
    torch.testing.assert_close(flex[real], dense[real], atol=1e-5, rtol=1e-5)


def test_document_spans_equal_the_dense_rule_in_forward_and_gradients():
    """The CPU varlen path (one causal SDPA call per document) computes what the dense mask does."""
    torch.manual_seed(0)
    model = DecoderLM(lm_tiny())
    packed = pack_documents(_docs([5, 17, 30, 3, 44, 12, 9, 1], seed=3), max_tokens=64)
    spans = packed.attention_mask()
    assert type(spans).__name__ == "DocumentSpans"  # all-causal batch on CPU
    assert sum(e - s for _, s, e in spans.spans) == packed.num_tokens
    results = []
    for mask_of in (packed.document_spans, packed.dense_mask):
        packed.attention_mask = mask_of  # the instance attribute shadows the method for this batch
        model.zero_grad()
        out = model(packed=packed)
        token_cross_entropy(out.logits, packed.labels).backward()
        results.append((out.logits[packed.document_ids >= 0], [p.grad.clone() for p in model.parameters()]))
    (logits_a, grads_a), (logits_b, grads_b) = results
    torch.testing.assert_close(logits_a, logits_b, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bidirectional_segments_keep_the_dense_mask_on_cpu():
    doc = Document([Segment("text", tokens=torch.arange(4)), Segment("image", tokens=torch.arange(3), bidirectional=True)])
    packed = pack_documents([doc, *_docs([6])], max_tokens=16)
    assert isinstance(packed.attention_mask(), torch.Tensor)
