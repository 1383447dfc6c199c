"""Building blocks: norms, RoPE (1D/2D/3D), attention (GQA, cross), patch embeddings, KV cache."""
import math

import torch
import torch.nn.functional as F

from polymodal.nn.attention import Attention, attend
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



def test_attention_with_rope_depends_only_on_relative_positions():
    """Shifting every position by the same offset leaves a causal RoPE attention layer's output
    unchanged (q and k are both rotated, so scores see only differences)."""
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4)
    rope = RotaryEmbedding(8, theta=100.0)
    x = torch.randn(1, 6, 32)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    def at(start):
        return attn(x, rope=rope(torch.arange(start, start + 6)), mask=mask)

    torch.testing.assert_close(at(0), at(37), atol=1e-5, rtol=1e-5)
    assert (at(0) - attn(x, mask=mask)).abs().max() > 1e-3  # and RoPE does change it

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


def _llama3_inv_freq_by_hand(dim, theta, factor, low_freq_factor, high_freq_factor, old_context_len):
    """The Llama 3.1 RoPE scaling rule, per frequency, as published with the Llama 3.1 weights
    (meta-llama/llama-models, `apply_scaling` in models/llama3/reference_impl/model.py; HF
    transformers' `_compute_llama3_parameters` is the same): with wavelen = 2 pi / freq,
    - wavelen < old_context_len / high_freq_factor (high frequencies): freq unchanged;
    - wavelen > old_context_len / low_freq_factor (low frequencies): freq / factor;
    - otherwise, smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
      and freq' = (1 - smooth) * freq / factor + smooth * freq.
    Returns (frequencies, band of each: "high" / "low" / "middle"), in float64 Python numbers."""
    freqs, bands = [], []
    for i in range(dim // 2):
        freq = theta ** (-2 * i / dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old_context_len / high_freq_factor:
            freqs.append(freq), bands.append("high")
        elif wavelen > old_context_len / low_freq_factor:
            freqs.append(freq / factor), bands.append("low")
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            freqs.append((1 - smooth) * freq / factor + smooth * freq), bands.append("middle")
    return torch.tensor(freqs, dtype=torch.float64), bands


def test_rope_inverse_frequencies_match_the_closed_form():
    """inv_freq[i] = theta^(-2i/d) (Su et al., RoFormer), divided by `factor` under linear scaling."""
    for dim, theta in ((8, 10000.0), (64, 10000.0), (128, 500000.0)):
        closed = torch.tensor([theta ** (-2 * i / dim) for i in range(dim // 2)], dtype=torch.float64)
        torch.testing.assert_close(rope_inv_freq(dim, theta).double(), closed, rtol=1e-6, atol=0)
        torch.testing.assert_close(rope_inv_freq(dim, theta, {"rope_type": "linear", "factor": 4.0}).double(),
                                   closed / 4, rtol=1e-6, atol=0)
        torch.testing.assert_close(RotaryEmbedding(dim, theta).inv_freq.double(), closed, rtol=1e-6, atol=0)


def test_llama3_rope_scaling_matches_the_published_rule_in_every_band():
    """Llama 3.1's own numbers (d=128, theta=500000, factor 8, low 1, high 4, 8192 original
    positions) and a second set whose middle band is wide: every frequency equals the rule
    written out per frequency, and each of the three bands holds some of them."""
    settings = ((128, 500000.0, 8.0, 1.0, 4.0, 8192), (64, 10000.0, 4.0, 1.0, 32.0, 2048))
    for dim, theta, factor, low, high, old in settings:
        want, bands = _llama3_inv_freq_by_hand(dim, theta, factor, low, high, old)
        assert {"high", "low", "middle"} == set(bands) and bands.count("middle") >= 2
        got = rope_inv_freq(dim, theta, {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                                         "high_freq_factor": high, "original_max_position_embeddings": old})
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def test_rope_tables_and_rotation_match_the_closed_form():
    """cos/sin at position p are cos(p * theta^(-2i/d)) for slot i, repeated over both halves; the
    rotation turns the pair (x_j, x_{j+d/2}) by that angle (HF Llama's rotate-half layout)."""
    dim, theta = 8, 100.0
    positions = torch.tensor([0, 3, 17])
    cos, sin = RotaryEmbedding(dim, theta)(positions)  # (3, 8)
    x = torch.randn(1, 1, 3, dim, dtype=torch.float64)
    rotated = apply_rotary(x, cos, sin)
    for row, pos in enumerate(positions.tolist()):
        for i in range(dim // 2):
            angle = pos * theta ** (-2 * i / dim)
            for j in (i, i + dim // 2):
                assert math.isclose(cos[row, j].item(), math.cos(angle), abs_tol=1e-5)
                assert math.isclose(sin[row, j].item(), math.sin(angle), abs_tol=1e-5)
            a, b = x[0, 0, row, i].item(), x[0, 0, row, i + dim // 2].item()
            assert math.isclose(rotated[0, 0, row, i].item(), a * math.cos(angle) - b * math.sin(angle), abs_tol=1e-5)
            assert math.isclose(rotated[0, 0, row, i + dim // 2].item(), b * math.cos(angle) + a * math.sin(angle),
                                abs_tol=1e-5)


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


def _attention_by_hand(q, k, v, allowed, scale=None):
    """Oracle: softmax(Q K^T * scale + log(allowed)) V written out, with the K/V heads repeated for
    grouped queries (query head h reads K/V head h // (H / H_kv)). q (B, H, T, D); k, v (B, H_kv, S, D);
    allowed: bool broadcastable to (B, H, T, S), True = may attend."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bhtd,bhsd->bhts", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = scores.exp() / scores.exp().sum(-1, keepdim=True)
    return torch.einsum("bhts,bhsd->bhtd", weights, v)


def test_dense_mask_sdpa_matches_is_causal():
    """`attend` under every mask form it takes on the CPU (None, "causal", a dense boolean mask
    per row) and with grouped K/V heads equals attention written out by hand."""
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g) * 2  # 4 query heads over 2 K/V heads; scores far from uniform
    k, v = torch.randn(2, 2, 5, 8, generator=g) * 2, torch.randn(2, 2, 5, 8, generator=g)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(attend(q, k, v, "causal"), _attention_by_hand(q, k, v, causal), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attend(q, k, v, causal), _attention_by_hand(q, k, v, causal), atol=1e-5, rtol=1e-5)
    everything = torch.ones(5, 5, dtype=torch.bool)
    torch.testing.assert_close(attend(q, k, v), _attention_by_hand(q, k, v, everything), atol=1e-5, rtol=1e-5)
    # A per-row mask (B, 1, T, S) that is neither causal nor full: row 0 left-padded by two
    # (keys 0-1 invalid; a pad query sees itself only), row 1 attends to every even key, and itself.
    rows = torch.zeros(2, 1, 5, 5, dtype=torch.bool)
    rows[0, 0] = causal & torch.tensor([False, False, True, True, True])
    rows[0, 0] |= torch.eye(5, dtype=torch.bool)
    rows[1, 0] = torch.tensor([True, False, True, False, True]) | torch.eye(5, dtype=torch.bool)
    want = _attention_by_hand(q, k, v, rows)
    torch.testing.assert_close(attend(q, k, v, rows), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attend(q, k, v, rows, scale=0.1), _attention_by_hand(q, k, v, rows, 0.1),
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want, _attention_by_hand(q, k, v, everything), atol=1e-2)  # the mask matters


def test_short_attention_matches_sdpa_forward_and_backward():
    from polymodal.nn.short_attention import short_attention

    q, k, v = (torch.randn(2, 3, n, 16, requires_grad=True) for n in (7, 11, 11))
    grad = torch.randn(2, 3, 7, 16)
    for scale in (None, 0.3):
        ref = F.scaled_dot_product_attention(q, k, v, scale=scale)
        ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
        out = short_attention(q, k, v, scale)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_without_the_kernels_short_attention_serves_only_unmasked_short_cpu_training(monkeypatch):
    import polymodal.nn.attention as attention_module
    import polymodal.nn.short_attention as short
    from polymodal.kernels.loader import plain_pytorch

    calls = []
    monkeypatch.setattr(attention_module, "short_attention", lambda *args: calls.append(args) or short.short_attention(*args))
    q = torch.randn(1, 2, short.MAX_SHORT_TOKENS, 8, requires_grad=True)
    with plain_pytorch():  # with the kernels built, the fused attention takes these calls (test_fused_attention.py)
        attend(q, q, q)
        assert len(calls) == 1
        long = torch.randn(1, 2, short.MAX_SHORT_TOKENS + 1, 8, requires_grad=True)
        attend(long, long, long)  # past the line: the flash kernel
        attend(q, q, q, mask="causal")
        attend(q, q, q, mask=torch.ones(1, 1, short.MAX_SHORT_TOKENS, short.MAX_SHORT_TOKENS, dtype=torch.bool))
        with torch.no_grad():
            attend(q, q, q)  # inference keeps SDPA
        wide = q.detach().double().requires_grad_()
        attend(wide, wide, wide)  # float32 only
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attend(q, q, q)  # autocast keeps SDPA, whose backward takes the bf16/float32 mix
        out.float().sum().backward()
    assert len(calls) == 1


def test_attention_projects_q_k_v_in_one_matmul_unless_a_layer_is_hooked():
    from polymodal.nn.attention import FUSED_QKV_MIN_TOKENS

    torch.manual_seed(0)
    layer, x = Attention(16, 2, qkv_bias=True), torch.randn(1, FUSED_QKV_MIN_TOKENS, 16)
    fused = layer(x)
    shapes = []
    for proj in (layer.q_proj, layer.k_proj, layer.v_proj):
        proj.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    torch.testing.assert_close(layer(x), fused, rtol=1e-5, atol=1e-6)
    assert shapes == [(1, FUSED_QKV_MIN_TOKENS, 16)] * 3  # each hooked projection ran its own forward
