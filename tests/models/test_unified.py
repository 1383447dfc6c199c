"""The unified token model: vocabulary layout, spans, the constrained image decoder (against an
uncached oracle), guidance, interleaved documents, and bad input."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from polymodal.errors import ConfigError, UsageError
from polymodal.infer.generate import sample_next_token
from polymodal.infer.unified import _CachedDecoder, draw_span
from polymodal.models.unified import UnifiedModel, unified_tiny
from polymodal.sequence import Document, Segment, pack_documents
from polymodal.train.objectives import sequence_loss


@pytest.fixture
def model():
    torch.manual_seed(0)
    return UnifiedModel(unified_tiny()).eval()


def _codes(model, batch=2, seed=0):
    h, w = model.config.grid
    return torch.randint(0, model.config.codebook_size, (batch, h, w), generator=torch.Generator().manual_seed(seed))


def test_span_layout_has_markers_row_ends_and_codes_after_the_text_ids(model):
    c = model.config
    h, w = c.grid
    codes = _codes(model)
    span = model.codes_to_span(codes)
    assert span.shape == (2, model.image_tokens)
    assert (span[:, 0] == c.image_start_id).all() and (span[:, -1] == c.image_end_id).all()
    rows = span[:, 1:-1].reshape(2, h, w + 1)
    assert (rows[:, :, -1] == c.row_end_id).all()
    assert torch.equal(rows[:, :, :w], codes + c.text_vocab_size)
    assert torch.equal(model.span_to_codes(span[:, 1:-1]), codes)


def test_a_text_id_where_a_code_belongs_is_named(model):
    span = model.codes_to_span(_codes(model, 1))[:, 1:-1].clone()
    span[0, 0] = 5
    with pytest.raises(ValueError, match="token id 5"):
        model.span_to_codes(span)


def test_interleaved_document_round_trips_through_tokens(model):
    parts = [[4, 5, 6], _codes(model, 1)[0], [7, 8], _codes(model, 1, seed=1)[0]]
    ids = model.interleaved_ids(parts)
    back = model.parse_interleaved(ids)
    assert len(back) == 4
    assert back[0] == [4, 5, 6] and back[2] == [7, 8]
    assert torch.equal(back[1], parts[1]) and torch.equal(back[3], parts[3])
    with pytest.raises(ValueError, match="not .* tokens closed"):
        model.parse_interleaved(ids[:-1])


def test_a_mixed_direction_batch_trains():
    torch.manual_seed(0)
    model = UnifiedModel(unified_tiny())
    c = model.config
    span = model.codes_to_span(_codes(model, 1))[0]
    text = torch.arange(4, 12)
    docs = [Document([Segment("text", tokens=text, target=None), Segment("image", tokens=span)]),
            Document([Segment("image", tokens=span, target=None), Segment("text", tokens=text)]),
            Document.from_tokens(text)]
    batch = pack_documents(docs, max_tokens=2 * len(span) + 40)
    # Both directions are scored: image codes after the caption, text after the image.
    scored = batch.labels[batch.labels >= 0]
    assert (scored >= c.text_vocab_size).any() and (scored < c.text_vocab_size).any()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = sequence_loss(model, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for p in model.image_tokenizer.parameters())  # the tokenizer stays frozen


def _uncached_span(model, prompt: list[int]) -> torch.Tensor:
    """The oracle: greedy constrained decoding recomputing the whole sequence at every token."""
    c = model.config
    h, w = c.grid
    ids, codes = list(prompt), []
    for j in range(c.span_tokens):
        if j % (w + 1) == w:
            ids.append(c.row_end_id)
            continue
        logits = model(torch.tensor([ids])).logits[0, -1]
        code = int(logits[model.code_ids].argmax())
        codes.append(code)
        ids.append(int(model.code_ids[code]))
    return torch.tensor(codes).view(h, w)


def test_cached_constrained_decoding_equals_full_recomputation(model):
    c = model.config
    prompts = [[4, 5, 6, c.image_start_id], [7, c.image_start_id]]  # ragged: left padding on the short one
    decoder = _CachedDecoder(model, prompts, c.span_tokens)
    with torch.no_grad():
        codes = draw_span(model, decoder, 2, None, 0.0, 0, 1.0, None)
        for row, prompt in enumerate(prompts):
            assert torch.equal(codes[row], _uncached_span(model, prompt))


def test_the_constrained_decoder_writes_only_codes_even_when_text_is_far_likelier(model):
    with torch.no_grad():
        model.lm.lm_head.weight[:model.config.text_vocab_size] += 50.0  # text ids dominate every logit
    c = model.config
    decoder = _CachedDecoder(model, [[4, c.image_start_id]], c.span_tokens)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        codes = draw_span(model, decoder, 1, None, 1.0, 0, 1.0, generator)
    assert codes.shape == (1, *c.grid)
    assert ((codes >= 0) & (codes < c.codebook_size)).all()
    # the decoder consumed exactly the span: prompt + span_tokens positions are cached
    assert decoder.cache.length == 2 + c.span_tokens


def test_guidance_at_scale_one_equals_the_conditional_model(model):
    c = model.config
    cond, uncond = [4, 5, c.image_start_id], [4, c.image_start_id]
    with torch.no_grad():
        plain = draw_span(model, _CachedDecoder(model, [cond], c.span_tokens), 1, None, 1.0, 0, 1.0,
                          torch.Generator().manual_seed(3))
        guided = draw_span(model, _CachedDecoder(model, [cond, uncond], c.span_tokens), 1, 1.0, 1.0, 0, 1.0,
                           torch.Generator().manual_seed(3))
        strong = draw_span(model, _CachedDecoder(model, [cond, uncond], c.span_tokens), 1, 8.0, 1.0, 0, 1.0,
                           torch.Generator().manual_seed(3))
    assert torch.equal(plain, guided)
    assert not torch.equal(plain, strong)


def test_guided_logits_follow_the_formula():
    from polymodal.infer.unified import _guided

    logits = torch.randn(4, 7)
    out = _guided(logits, 2, 3.0)
    assert torch.allclose(out, logits[2:] + 3.0 * (logits[:2] - logits[2:]))
    assert torch.equal(sample_next_token(_guided(logits, 2, 1.0), 0.0), logits[:2].argmax(-1))


def test_a_codebook_the_vocabulary_cannot_hold_is_refused():
    c = unified_tiny()
    with pytest.raises(ConfigError, match="no room for the image codebook"):
        dataclasses.replace(c, lm=dataclasses.replace(c.lm, vocab_size=c.text_vocab_size + 3))
    with pytest.raises(ConfigError, match="code_table maps 2 codes"):
        dataclasses.replace(c, row_end=False, code_table=[50, 51])
    with pytest.raises(ConfigError, match="its own token id"):  # two codes on one id would decode wrongly
        dataclasses.replace(c, row_end=False, code_table=[40] * 2 + list(range(42, 42 + c.codebook_size - 2)))
    with pytest.raises(ConfigError, match="its own token id"):  # a code on the start marker
        dataclasses.replace(c, row_end=False, code_table=[c.image_start_id] + list(range(41, 40 + c.codebook_size)))


def test_drawing_without_a_decoder_is_refused(model):
    model.image_tokenizer.config.has_decoder = False
    from polymodal.infer.unified import generate_image_codes

    with pytest.raises(UsageError, match="no decoder"):
        generate_image_codes(model, object(), ["a red circle"])


def test_prompt_images_fill_their_placeholder_runs(model):
    c = model.config
    size = c.image_size
    pixels = torch.rand(1, 3, size, size) * 2 - 1
    ids = torch.tensor([[4] + [c.image_token_id] * model.image_tokens + [5]])
    filled = model.with_images(ids, pixels)
    assert torch.equal(filled[0, 1:-1], model.image_span(pixels)[0])
    with pytest.raises(UsageError, match="image placeholders"):
        model.with_images(ids, None)
    with pytest.raises(ValueError, match="pixels for this model"):
        model.image_codes(torch.zeros(1, 3, size * 2, size * 2))
