"""Building blocks: norms, RoPE (1D/2D/3D), attention (GQA, cross), patch embeddings, KV cache."""
import torch
import torch.nn.functional as F

from polymodal.nn.attention import Attention
from polymodal.nn.kv_cache import KVCache
from polymodal.nn.norms import RMSNorm
from polymodal.nn.patch_embed import PatchEmbed2D, PatchEmbed3D, grid_positions
from polymodal.nn.rope import RotaryEmbedding, apply_rotary, rope_inv_freq
from polymodal.nn.transformer import build_block


def test_rmsnorm_matches_formula():
    x = torch.randn(3, 5, 8)
    norm = RMSNorm(8, eps=1e-6)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), ref)


def test_rope_is_relative():
    """q.k after RoPE depends only on the position difference."""
    rope = RotaryEmbedding(16, theta=10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        cq, sq = rope(torch.tensor([pq]))
        ck, sk = rope(torch.tensor([pk]))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    torch.testing.assert_close(score(3, 1), score(10, 8))
    torch.testing.assert_close(score(7, 7), (q * k).sum())


def test_multi_axis_rope_rotates_each_axis_independently():
    rope = RotaryEmbedding(16, axes=2)
    pos = grid_positions(3, 4)  # (12, 2) rows/cols
    cos, sin = rope(pos)
    assert cos.shape == (12, 16)
    # Tokens in the same row share the row-axis angles; different columns differ in the col-axis part.
    assert torch.equal(cos[0, :4], cos[1, :4]) and not torch.equal(cos[0, 4:8], cos[1, 4:8])
    assert grid_positions(2, 3, 4).shape == (24, 3)
    assert RotaryEmbedding(24, axes=3)(grid_positions(2, 3, 4))[0].shape == (24, 24)


def test_llama3_rope_scaling_keeps_high_frequencies():
    base = rope_inv_freq(64, 500000.0)
    scaled = rope_inv_freq(64, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    assert torch.equal(scaled[:4], base[:4])  # short wavelengths untouched
    torch.testing.assert_close(scaled[-1], base[-1] / 8.0)  # long wavelengths divided by factor


def test_gqa_attention_equals_expanded_multi_head_reference():
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, num_kv_heads=2)
    x = torch.randn(2, 6, 32)
    out = attn(x, mask="causal")
    q = attn.q_proj(x).view(2, 6, 4, 8).transpose(1, 2)
    k = attn.k_proj(x).view(2, 6, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    v = attn.v_proj(x).view(2, 6, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    scores = (q @ k.transpose(-1, -2)) / 8 ** 0.5
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    ref = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, 32))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_cross_attention_block_uses_context():
    torch.manual_seed(0)
    block = build_block(32, 4, 64, norm="layer", mlp="gelu", cross_dim=16)
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 7, 16)
    out = block(x, context=ctx)
    assert out.shape == (2, 5, 32)
    assert not torch.allclose(out, block(x, context=torch.randn(2, 7, 16)))


def test_bidirectional_encoder_block_sees_future_tokens():
    torch.manual_seed(0)
    block = build_block(32, 4, 64, norm="layer", mlp="gelu")
    x = torch.randn(1, 4, 32)
    y = x.clone()
    y[:, -1] = torch.randn(32)
    assert not torch.allclose(block(x)[:, 0], block(y)[:, 0])  # no mask: first token sees the last
    torch.testing.assert_close(block(x, mask="causal")[:, 0], block(y, mask="causal")[:, 0])


def test_patch_embeddings_shapes_and_order():
    pe = PatchEmbed2D(4, 3, 8)
    assert pe(torch.randn(2, 3, 16, 12)).shape == (2, 12, 8)
    tube = PatchEmbed3D(2, 4, 3, 8)
    assert tube(torch.randn(2, 3, 4, 8, 8)).shape == (2, 8, 8)
    # The first patch token depends only on the top-left patch.
    img = torch.randn(1, 3, 8, 8)
    img2 = img.clone()
    img2[..., 4:, 4:] = 0
    torch.testing.assert_close(pe(img)[:, 0], pe(img2)[:, 0])


def test_kv_cache_overflow_is_a_clear_error():
    cache = KVCache(1, 1, 1, 4, 2)
    cache.update(0, torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
    cache.advance(3)
    try:
        cache.update(0, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    except ValueError as err:
        assert "overflow" in str(err)
    else:
        raise AssertionError("expected overflow error")


def test_dense_mask_sdpa_matches_is_causal():
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))
