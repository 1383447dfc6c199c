"""The whole Chameleon import (`polymodal.load` on a ChameleonForConditionalGeneration folder ->
a `unified` model): same logits as transformers on a prompt mixing text and an image given as
pixels, the image encoded by the imported VQ tokenizer and mapped through the vocabulary."""
from __future__ import annotations

import pytest
import torch
from interop_parity import max_abs_diff, randomize_
from transformers import ChameleonConfig, ChameleonForConditionalGeneration

from polymodal.api import load
from polymodal.errors import UsageError

NUM_CODES, FIRST_CODE, VOCAB = 64, 40, 120
IMAGE, BOI, EOI = 3, 4, 5
DIGITS = "ABCDEFGHIJ"


def _vocabulary_map() -> dict[str, int]:
    """Text tokens t0.., the image markers, and 64 IMGIMG code tokens on shuffled ids."""
    vocab = {f"t{i}": i for i in range(VOCAB)}
    ids = torch.randperm(NUM_CODES, generator=torch.Generator().manual_seed(3)) + FIRST_CODE
    vocab.update({"IMGIMG" + "".join(DIGITS[int(d)] for d in str(code)) + "Z": int(token)
                  for code, token in enumerate(ids)})
    vocab.update({"<image>": IMAGE, "<racm3:break>": BOI, "<eoss>": EOI})
    return vocab


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model with every parameter random, our model loaded from its saved folder)."""
    config = ChameleonConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, vocabulary_map=_vocabulary_map(), image_token_id=IMAGE,
        vq_config=dict(embed_dim=8, num_embeddings=NUM_CODES, latent_channels=16, base_channels=32,
                       channel_multiplier=[1, 2], resolution=16, num_res_blocks=1, attn_resolutions=[8]))
    torch.manual_seed(0)
    hf = randomize_(ChameleonForConditionalGeneration(config), std=0.15)
    folder = tmp_path_factory.mktemp("chameleon")
    hf.save_pretrained(folder)
    return hf, load(folder).model.eval()


def test_the_folder_loads_as_a_unified_model(pair):
    _, ours = pair
    c = ours.config
    assert ours.family == "unified" and c.grid == (8, 8) and not c.row_end
    assert (c.image_start_id, c.image_end_id, c.image_token_id) == (BOI, EOI, IMAGE)
    assert sorted(c.code_table) == list(range(FIRST_CODE, FIRST_CODE + NUM_CODES))


def test_logits_match_transformers_on_text_and_pixels(pair):
    hf, ours = pair
    pixels = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    before, after = [7, 8, 9, 10], [11, 12, 13]
    n = NUM_CODES  # 8 x 8 codes per image
    theirs_ids = torch.tensor([before + [BOI] + [IMAGE] * n + [EOI] + after])
    ours_ids = torch.tensor([before + [IMAGE] * ours.image_tokens + after])  # our placeholder run spans the markers
    with torch.no_grad():
        expected = hf(input_ids=theirs_ids, pixel_values=pixels).logits
        embeds = ours.embed(ours_ids, pixels)
        got = ours(inputs_embeds=embeds).logits
        codes = ours.image_codes(pixels)
    assert len(codes.unique()) > 4  # the random tokenizer spreads codes: the image matters
    # transformers sets every image-code column to the dtype minimum (its forward generates text
    # only); every other column must agree.
    keep = torch.ones(VOCAB, dtype=torch.bool)
    keep[ours.code_ids] = False
    assert max_abs_diff(got[..., keep], expected[..., keep]) < 1e-4
    assert expected.std() > 0.1


def test_the_imported_model_reads_images_but_refuses_to_draw(pair):
    _, ours = pair
    from polymodal.infer.unified import generate_image_codes

    with pytest.raises(UsageError, match="no decoder"):
        generate_image_codes(ours, object(), ["a red circle"])
