"""MultimodalLM on packed multimodal documents: packed forward == per-document forward."""
import pytest
import torch

from polymodal.data.world import world_tokenizer
from polymodal.models.mmllm import MultimodalLM, mmllm_tiny, mmllm_tiny_for, size_to_tokenizer
from polymodal.projectors import ProjectorConfig
from polymodal.sequence import Document, Segment, pack_documents
from polymodal.train.objectives import sequence_loss


def _doc(model, layout, seed):
    """layout: e.g. "t i t i t" (text runs / images, interleaved)."""
    g = torch.Generator().manual_seed(seed)
    k, size, image_id = model.image_tokens, model.config.image_size, model.config.image_token_id
    segments = []
    for part in layout.split():
        if part == "t":
            segments.append(Segment("text", tokens=torch.randint(0, image_id, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g)))
        else:
            segments.append(Segment("image", tokens=[image_id] * k, data=torch.randn(3, size, size, generator=g), target=None))
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
    assert torch.isfinite(sequence_loss(model, batch))


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
    sequence_loss(model, batch).backward()
    assert model.vision.patch_embed.proj.weight.grad.abs().sum() > 0


def test_cnn_vision_tower_gives_one_token_per_feature_map_cell():
    """vision_tower="cnn": the contrastive family's conv tower feeds its h x w map as tokens."""
    import pytest

    from polymodal.encoders.convnet import ConvNetConfig
    from polymodal.interop.hf_llava import hf_config_from_llava

    torch.manual_seed(0)
    config = mmllm_tiny()
    config.vision_tower, config.vision_feature_layer = "cnn", -1
    config.cnn = ConvNetConfig(image_size=32, widths=[8, 16, 16], position_embedding=True)
    model = MultimodalLM(config)
    assert model.image_tokens == 16  # 32 px / 2^3 = 4 x 4 map
    _check_packed_equals_single(model)
    model.train()
    sequence_loss(model, pack_documents([_doc(model, "t i t", 7)], 64)).backward()
    assert model.vision.stages[0][0].weight.grad.abs().sum() > 0
    assert model.vision.position_embedding.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="vision_feature_layer"):
        type(config)(vision_tower="cnn", vision_feature_layer=-2)
    with pytest.raises(ValueError, match="vision_feature_layer=-4 is out of range for a 2-layer ViT"):
        type(config)(vision=mmllm_tiny().vision, vision_feature_layer=-4)
    with pytest.raises(ValueError, match="LLaVA export needs a ViT"):
        hf_config_from_llava(config)


def test_gridpool_vision_tower_gives_one_token_per_grid_cell_and_stays_frozen_in_training():
    """vision_tower="gridpool" (the quickstart's tower): grid^2 tokens of 2 x filters features."""
    from polymodal.encoders.gridpool import GridPoolConfig
    from polymodal.interop.hf_llava import hf_config_from_llava
    from polymodal.nn.lora import LoRAConfig
    from polymodal.recipes.mmllm import set_trainable

    torch.manual_seed(0)
    config = mmllm_tiny()
    config.vision_tower, config.vision_feature_layer = "gridpool", -1
    config.gridpool = GridPoolConfig(image_size=32, filters=8, kernel_size=3, stride=2, grid=2)
    model = MultimodalLM(config)
    assert (model.image_tokens, config.vision_width) == (4, 16)
    _check_packed_equals_single(model)
    model.train()
    set_trainable(model, ["projector", "lm"], LoRAConfig())
    sequence_loss(model, pack_documents([_doc(model, "t i t", 7)], 64)).backward()
    assert model.vision.conv.weight.grad is None and next(model.projector.parameters()).grad is not None
    with pytest.raises(ValueError, match="the gridpool vision tower only has its final feature map"):
        type(config)(vision_tower="gridpool", vision_feature_layer=-2)
    with pytest.raises(ValueError, match="LLaVA export needs a ViT"):
        hf_config_from_llava(config)


def test_cnn_position_embedding_tells_cells_of_a_uniform_image_apart():
    from polymodal.encoders.convnet import ConvNet, ConvNetConfig

    torch.manual_seed(0)
    flat = torch.zeros(1, 3, 32, 32)
    with_positions = ConvNet(ConvNetConfig(image_size=32, widths=[8, 16, 16], position_embedding=True))
    tokens = with_positions(flat).last_hidden_state[0]  # (16, C)
    assert torch.cdist(tokens, tokens).fill_diagonal_(1.0).min() > 1e-2


def test_packed_tail_padding_is_never_an_image_slot():
    """With the placeholder id equal to the pad id (both 0 by default), row padding stays text."""
    torch.manual_seed(0)
    config = mmllm_tiny()
    config.image_token_id = 0
    model = MultimodalLM(config).eval()
    k, size = model.image_tokens, config.image_size
    docs = [Document([Segment("text", tokens=torch.arange(1, 4)),
                      Segment("image", tokens=[0] * k, data=torch.randn(3, size, size), target=None),
                      Segment("text", tokens=torch.arange(4, 9))])]
    docs.append(Document.from_tokens(torch.arange(1, len(docs[0]) + 8)))  # a full second row
    batch = pack_documents(docs, max_tokens=len(docs[0]) + 7, pad_id=0)
    assert (batch.document_ids < 0).sum() == 7  # the image row's tail: padding with the placeholder's id
    with torch.no_grad():
        row, start = batch.document_rows[0]
        packed = model(packed=batch).logits[row, start:start + len(docs[0])]
        single = model(torch.cat([s.tokens if torch.is_tensor(s.tokens) else torch.tensor(s.tokens)
                                  for s in docs[0].segments])[None], docs[0].segments[1].data[None]).logits[0]
    torch.testing.assert_close(packed, single, atol=1e-4, rtol=1e-4)


def test_cnn_vision_tower_takes_float_pixels_in_bf16():
    from polymodal.encoders.convnet import ConvNetConfig

    torch.manual_seed(0)
    config = mmllm_tiny()
    config.vision_tower, config.vision_feature_layer = "cnn", -1
    config.cnn = ConvNetConfig(image_size=32, widths=[8, 16, 16])
    model = MultimodalLM(config).to(torch.bfloat16).eval()
    ids = torch.tensor([[1, 2] + [config.image_token_id] * model.image_tokens + [3]])
    with torch.no_grad():
        logits = model(ids, torch.randn(1, 3, 32, 32)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_size_to_tokenizer_reads_vocabulary_eos_and_image_ids_and_names_a_missing_placeholder():
    tokenizer = world_tokenizer()
    config = mmllm_tiny_for(tokenizer)
    assert (config.lm.vocab_size, config.lm.eos_token_id, config.image_token_id) == (
        tokenizer.vocab_size, tokenizer.eos_token_id, tokenizer.token_to_id("<image>"))

    class NoPlaceholder:  # a tokenizer without the <image> token
        vocab_size, eos_token_id = 300, 2

        def token_to_id(self, token):
            return None

    with pytest.raises(ValueError, match="<image>"):
        size_to_tokenizer(mmllm_tiny(), NoPlaceholder())


def _with_image_lora(model: MultimodalLM) -> MultimodalLM:
    """`model` with image-position adapters on every LM linear layer, their updates made non-zero."""
    from polymodal.nn.lora import LoRAConfig, lora_parameters

    model.add_image_lora(LoRAConfig(rank=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj")))
    with torch.no_grad():
        for param in lora_parameters(model.lm):
            param.normal_(0, 0.3)
    return model.eval()


def test_image_lora_changes_image_positions_and_what_follows_them_only(tmp_path):
    """Partial LoRA: text before any image and text-only inputs get exactly the base model's
    logits; from the image on they differ; packing, KV-cache decoding and checkpoints hold."""
    import copy

    import polymodal
    from polymodal.checkpoint import save_checkpoint
    from polymodal.interop.hf_llava import hf_config_from_llava

    torch.manual_seed(0)
    base = MultimodalLM(mmllm_tiny()).eval()
    model = _with_image_lora(copy.deepcopy(base))
    assert model.config.image_lora.rank == 4 and not base.config.image_lora.rank
    doc = _doc(model, "t i t", 5)
    ids = torch.cat([s.tokens for s in doc.segments])[None]  # (1, T)
    pixels = doc.segments[1].data[None]
    first_image = len(doc.segments[0].tokens)
    with torch.no_grad():
        tuned, plain = model(ids, pixels).logits, base(ids, pixels).logits
        text = ids[:, :first_image]
        assert torch.equal(model(text).logits, base(text).logits)
    assert torch.equal(tuned[:, :first_image], plain[:, :first_image])
    assert not torch.allclose(tuned[:, first_image:], plain[:, first_image:], atol=1e-3)
    _check_packed_equals_single(model)

    # Greedy decoding with the KV cache (the prompt's image positions passed as image_mask)
    # equals recomputing the whole sequence at every step.
    prompt = ids[0].tolist()
    generated = model.generate([prompt], pixels, max_new_tokens=4, eos_token_id=-1)[0]
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(4):
            logits = model(torch.tensor([sequence]), pixels).logits[0, -1]
            logits[model.config.image_token_id] = float("-inf")
            sequence.append(int(logits.argmax()))
    assert generated == sequence[len(prompt):]

    save_checkpoint(model, tmp_path / "ckpt")
    loaded, _ = polymodal.load(tmp_path / "ckpt")
    assert loaded.config.image_lora.rank == 4
    with torch.no_grad():
        assert torch.equal(loaded(ids, pixels).logits, tuned)
    with pytest.raises(ValueError, match="image_lora"):
        hf_config_from_llava(model.config)
    with pytest.raises(ValueError, match="image_mask"):
        model(inputs_embeds=model.embed(ids, pixels))
