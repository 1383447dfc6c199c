"""Parity of the Chameleon image tokenizer import (polymodal.interop.hf_chameleon_vq) against
transformers' `ChameleonVQVAE`: same codes, same pre-quantization features, clear refusals."""
from __future__ import annotations

import pytest
import torch
from interop_parity import max_abs_diff, randomize_
from transformers import ChameleonVQVAEConfig
from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

from polymodal.checkpoint import CheckpointMismatchError
from polymodal.errors import ConfigError
from polymodal.interop.hf_chameleon_vq import chameleon_vq_config, chameleon_vq_state
from polymodal.tokenizers.image_vq import ImageVQ

TOL = 1e-4
# Two levels (factor 2) of widths 32 / 64 (multiples of Chameleon's 32 norm groups), attention in
# the second level (side 8 of a 16 px image) and the mid block, a width change (nin_shortcut).
VQ = dict(embed_dim=8, num_embeddings=64, latent_channels=16, resolution=16, base_channels=32,
          channel_multiplier=[1, 2], num_res_blocks=2, attn_resolutions=[8])
# No attention anywhere (the mid block's is an identity in transformers), one ResBlock per level.
PLAIN = {**VQ, "num_res_blocks": 1, "attn_type": "none"}


@pytest.fixture(scope="module", params=[VQ, PLAIN], ids=["attention", "plain"])
def pair(request):
    """(transformers ChameleonVQVAE with every parameter random, our imported tokenizer)."""
    hf = randomize_(ChameleonVQVAE(ChameleonVQVAEConfig(**request.param)), seed=0, std=0.15)
    config = chameleon_vq_config(hf.config.to_dict())
    ours = ImageVQ(config)
    ours.load_state_dict(chameleon_vq_state(hf.state_dict(), prefix="", config=config), strict=True)
    return hf, ours.eval()


def test_config_translation():
    config = chameleon_vq_config(VQ)
    assert config.block_out_channels == (32, 64) and config.layers_per_block == 2
    assert config.attn_resolutions == (8,) and config.mid_block_attention and not config.has_decoder
    assert (config.codebook_size, config.embed_dim, config.latent_channels) == (64, 8, 16)
    assert chameleon_vq_config(VQ, image_size=32).attn_resolutions == (16,)  # the same level at another size
    released = chameleon_vq_config({"attn_resolutions": []})  # Chameleon-7B's vq_config
    assert released.downsample_factor == 16 and released.grid(512) == (32, 32) and released.codebook_size == 8192


@pytest.mark.parametrize("size", [(16, 16), (16, 24)])
def test_codes_and_features_match_transformers(pair, size):
    hf, ours = pair
    pixels = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = hf.encode(pixels)
        features = ours.features(pixels)
        codes = ours.encode(pixels)
        reference = hf.quant_conv(expected.last_hidden_state)
    assert max_abs_diff(ours.encoder(pixels), expected.last_hidden_state) < TOL
    assert max_abs_diff(features, reference) < TOL
    h, w = size[0] // 2, size[1] // 2
    assert codes.shape == (2, h, w)
    assert torch.equal(codes, expected.image_tokens.view(2, h, w))
    assert len(codes.unique()) > 4  # random weights spread the codes: the comparison is not trivial


def test_decode_says_the_import_has_no_decoder(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="no decoder") as err:
        ours.decode(torch.zeros(1, 8, 8, dtype=torch.long))
    assert "\n" not in str(err.value)


def test_mismatched_weights_are_named_in_one_line():
    config = chameleon_vq_config(VQ)
    state = {f"model.vqmodel.{k}": v for k, v in ChameleonVQVAE(ChameleonVQVAEConfig(**VQ)).state_dict().items()}
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(1)  # the LM's weights are not read
    assert chameleon_vq_state(state, config=config).keys() == ImageVQ(config).state_dict().keys()
    del state["model.vqmodel.encoder.mid.attn_1.q.weight"]
    state["model.vqmodel.decoder.conv_in.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as err:
        chameleon_vq_state(state, config=config)
    message = str(err.value)
    assert "\n" not in message
    assert "missing (1): model.vqmodel.encoder.mid.attn_1.q.weight" in message
    assert "unexpected (1): model.vqmodel.decoder.conv_in.weight" in message
    with pytest.raises(CheckpointMismatchError, match="decoder.conv_in.weight"):
        chameleon_vq_state(state)  # without a config, names with no counterpart are still refused


@pytest.mark.parametrize("key, value, needle", [
    ("double_latent", True, "double_latent"), ("channel_multiplier", [2, 4], "channel_multiplier"),
    ("attn_type", "linear", "attn_type"),
])
def test_unsupported_settings_are_refused(key, value, needle):
    with pytest.raises(ConfigError, match=needle):
        chameleon_vq_config({**VQ, key: value})
