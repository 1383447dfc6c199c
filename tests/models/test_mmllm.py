"""MultimodalLM on packed multimodal documents: packed forward == per-document forward."""
import torch

from polymodal.models.mmllm import MultimodalLM, mmllm_tiny
from polymodal.projectors import ProjectorConfig
from polymodal.sequence import Document, Segment, pack_documents


def _doc(model, layout, seed):
    """layout: e.g. "t i t i t" (text runs / images, interleaved)."""
    g = torch.Generator().manual_seed(seed)
    k, size, image_id = model.image_tokens, model.config.vision.image_size, model.config.image_token_id
    segments = []
    for part in layout.split():
        if part == "t":
            segments.append(Segment("text", tokens=torch.randint(0, image_id, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g)))
        else:
            segments.append(Segment("image", tokens=[image_id] * k, data=torch.randn(3, size, size, generator=g), loss=False))
    return Document(segments)


def _check_packed_equals_single(model):
    model.eval()
    docs = [_doc(model, "t i t i t", 0), _doc(model, "i t", 1), _doc(model, "t", 2), _doc(model, "t i t", 3)]
    batch = pack_documents(docs, max_tokens=2 * max(len(d) for d in docs))
    assert batch.token_ids.shape[0] < len(docs)  # several documents share a row
    with torch.no_grad():
        packed = model(packed=batch)
        for d, doc in enumerate(docs):
            ids = torch.cat([s.tokens for s in doc.segments])[None]  # (1, T)
            images = [s.data for s in doc.segments if s.modality == "image"]
            single = model(ids, torch.stack(images) if images else None).logits[0]
            row, start = batch.document_rows[d]
            torch.testing.assert_close(packed.logits[row, start:start + len(doc)], single, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(packed.loss)


def test_packed_multimodal_forward_equals_per_document_forward():
    torch.manual_seed(0)
    _check_packed_equals_single(MultimodalLM(mmllm_tiny()))


def test_packed_equivalence_with_resampler_and_multi_image_loss():
    torch.manual_seed(0)
    config = mmllm_tiny()
    config.projector = ProjectorConfig(kind="resampler", num_queries=4, num_heads=4)
    model = MultimodalLM(config)
    assert model.image_tokens == 4
    _check_packed_equals_single(model)
    # images are inputs, never targets: no label points at a placeholder
    batch = pack_documents([_doc(model, "t i t i t", 5)], 256)
    assert not (batch.labels == config.image_token_id).any()
    model.train()
    model(packed=batch).loss.backward()
    assert model.vision.patch_embed.proj.weight.grad.abs().sum() > 0
