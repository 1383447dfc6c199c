"""Conversations -> documents: placeholder expansion, the assistant-only loss mask, prompt ids."""
import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.data.conversation import ImageProcessor, conversation_document, prompt_ids
from polymodal.data.world import world_tokenizer
from polymodal.sequence import IGNORE_INDEX, pack_documents

K = 3


@pytest.fixture(scope="module")
def tok():
    return world_tokenizer()


def _messages():
    return [
        {"role": "system", "content": "You look at pictures."},
        {"role": "user", "content": "<image>\nWhat color is the circle?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And here? <image> Compare with <image>."},
        {"role": "assistant", "content": "blue and green"},
    ]


def _ids(doc):
    return torch.cat([s.tokens for s in doc.segments]).tolist()


def test_placeholders_expand_in_order_with_pixels(tok):
    image_id = tok.token_to_id("<image>")
    images = [torch.full((3, 8, 8), float(i)) for i in range(3)]
    doc = conversation_document(tok, _messages(), images, image_id, K)
    image_segments = [s for s in doc.segments if s.modality == "image"]
    assert [float(s.data[0, 0, 0]) for s in image_segments] == [0.0, 1.0, 2.0]
    assert all(s.tokens.tolist() == [image_id] * K and s.target is None for s in image_segments)
    ids = _ids(doc)
    assert ids.count(image_id) == 3 * K and len(doc) == len(ids)
    # the text around the placeholders is the chat template's rendering, marker by marker
    rendered = tok.apply_chat_template(_messages(), add_generation_prompt=False)
    assert tok.decode(ids) == rendered.replace("<image>", "<image>" * K)


def test_loss_mask_covers_exactly_the_assistant_answers(tok):
    image_id = tok.token_to_id("<image>")
    doc = conversation_document(tok, _messages(), [torch.zeros(3, 8, 8)] * 3, image_id, K)
    batch = pack_documents([doc], 512)
    targets = batch.labels[0][batch.labels[0] != IGNORE_INDEX].tolist()
    end = tok.eos_token  # "<|im_end|>" closes each assistant turn and is learned
    assert targets == tok.encode("red" + end) + tok.encode("blue and green" + end)
    everything = conversation_document(tok, _messages(), [torch.zeros(3, 8, 8)] * 3, image_id, K, train_on="all")
    all_targets = (pack_documents([everything], 512).labels != IGNORE_INDEX).sum()
    text_tokens = sum(s.length for s in everything.segments if s.modality == "text")
    assert all_targets == text_tokens - 1  # every text token but the first is a target


def test_prompt_ids_are_the_training_prefix(tok):
    image_id = tok.token_to_id("<image>")
    messages = _messages()
    doc = conversation_document(tok, messages, [torch.zeros(3, 8, 8)] * 3, image_id, K)
    prompt = prompt_ids(tok, messages[:4], image_id, K)
    assert _ids(doc)[:len(prompt)] == prompt
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")


def test_errors_name_the_problem(tok):
    image_id = tok.token_to_id("<image>")
    with pytest.raises(ValueError, match="3 '<image>' markers but 2 images"):
        conversation_document(tok, _messages(), [torch.zeros(3, 8, 8)] * 2, image_id, K)
    with pytest.raises(ValueError, match="train_on"):
        conversation_document(tok, _messages(), [torch.zeros(3, 8, 8)] * 3, image_id, K, train_on="user")
    with pytest.raises(ValueError, match="messages\\[0\\]"):
        prompt_ids(tok, [{"role": "robot", "content": "hi"}], image_id, K)
    with pytest.raises(ValueError, match="no assistant turn"):
        conversation_document(tok, [{"role": "user", "content": "hi"}], [], image_id, K)


def test_image_processor_inputs_and_anyres(tmp_path):
    array = (np.random.default_rng(0).random((20, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(array).save(tmp_path / "a.png")
    plain = ImageProcessor(16)
    from_array, from_path = plain(array), ImageProcessor(16, root=tmp_path)("a.png")
    assert from_array.shape == (3, 16, 16)
    torch.testing.assert_close(from_array, from_path)
    assert plain.batch([array, Image.fromarray(array)]).shape == (2, 3, 16, 16)
    tiled = ImageProcessor(16, anyres_grids=[(1, 2), (2, 1), (2, 2)])(array)
    assert tiled.shape == (3, 3, 16, 16)  # base view + a 1x2 grid for a wide image
    with pytest.raises(TypeError, match="PIL image"):
        plain(3.0)
