"""polymodal.kernels.attention: the fused CPU attention against SDPA in float64, its layouts, and where `attend` uses it."""
import pytest
import torch
import torch.nn.functional as F

import polymodal.kernels.ops as ops
import polymodal.nn.attention as attention_module
from polymodal.kernels import attention, fused_attention_applies
from polymodal.kernels.loader import fused_cpu, plain_pytorch
from polymodal.kernels.ops import MAX_ATTENTION_TOKENS
from polymodal.nn.attention import Attention, attend


@pytest.fixture(autouse=True)
def small_calls_fused(monkeypatch):
    """Let the kernel take the small calls these tests make (in use SDPA keeps calls this small)."""
    monkeypatch.setattr(ops, "MIN_ATTENTION_SCORES", 1)


def sdpa_float64(q, k, v, grad, scale):
    """SDPA's output and q/k/v gradients in float64 (the oracle)."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, scale=scale)
    out.backward(grad.double())
    return out.detach(), [t.grad for t in leaves]


def fused_with_grads(q, k, v, grad, scale):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, scale=scale)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("b, h, t, s, d, dv", [(2, 3, 7, 11, 16, 16), (1, 1, 1, 9, 8, 8), (2, 2, 13, 13, 12, 20),
                                               (1, 2, 64, 64, 64, 64), (1, 1, 5, MAX_ATTENTION_TOKENS, 8, 8)])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_fused_attention_matches_sdpa_forward_and_backward(b, h, t, s, d, dv, scale):
    torch.manual_seed(0)
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, h, s, d), torch.randn(b, h, s, dv)
    k[..., 0, :] *= 8  # one dominant key: the softmax's max subtraction matters
    grad = torch.randn(b, h, t, dv)
    assert fused_attention_applies(q, k, v) == (fused_cpu() is not None)
    ref, ref_grads = sdpa_float64(q, k, v, grad, scale)
    out, grads = fused_with_grads(q, k, v, grad, scale)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip("qkv", grads, ref_grads):
        # Float32 rounding grows with the gradient's size (SDPA's own float32 error is larger still).
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * max(1.0, want.abs().max().item()),
                                   msg=f"grad of {name}")
    with torch.no_grad():  # inference keeps no probabilities and gives the same output
        torch.testing.assert_close(attention(q, k, v, scale=scale), out, rtol=0, atol=0)


def test_fused_attention_reads_strided_heads_and_writes_tokens_major():
    # Attention passes q, k, v as (B, H, T, D) views of one (B, T, 3 * H * D) projection.
    b, t, h, d = 2, 9, 3, 8
    qkv = torch.randn(b, t, 3 * h * d, requires_grad=True)
    q, k, v = (part.view(b, t, h, d).transpose(1, 2) for part in qkv.split(h * d, dim=-1))
    grad = torch.randn(b, h, t, d)
    out = attention(q, k, v)
    out.backward(grad)
    ref, ref_grads = sdpa_float64(q, k, v, grad, None)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qkv.grad.double(), torch.cat([g.transpose(1, 2).reshape(b, t, h * d) for g in ref_grads],
                                                            dim=-1), rtol=1e-4, atol=1e-5)
    if fused_cpu() is not None:
        assert out.transpose(1, 2).is_contiguous()  # (B, T, H, D) memory: the output projection reads it as is
    noncontiguous_grad = torch.randn(b, h, d, t).transpose(-1, -2)  # a unit stride on tokens, not on features
    q2, k2, v2 = (x.detach().requires_grad_() for x in (q, k, v))
    attention(q2, k2, v2).backward(noncontiguous_grad)
    _, want = sdpa_float64(q, k, v, noncontiguous_grad, None)
    torch.testing.assert_close(q2.grad.double(), want[0], rtol=1e-4, atol=1e-5)


def test_fused_attention_keeps_nan_visible():
    q, k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    v[0, 0, 2, 3] = float("nan")
    assert torch.isnan(attention(q, k, v)[..., 3]).all()


def test_attend_uses_the_fused_kernel_for_unmasked_float32_cpu_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(attention_module, "fused_attention", lambda *args: calls.append(args) or attention(*args))
    q = torch.randn(1, 2, MAX_ATTENTION_TOKENS, 8, requires_grad=True)
    expect = 1 if fused_cpu() is not None else 0
    attend(q, q, q)
    with torch.no_grad():
        attend(q, q, q)  # inference too
    assert len(calls) == 2 * expect
    long = torch.randn(1, 2, MAX_ATTENTION_TOKENS + 1, 8)
    attend(long, long, long)  # past the line: the flash kernel
    attend(q, q, q, mask="causal")
    attend(q, q, q, mask=torch.ones(1, 1, MAX_ATTENTION_TOKENS, MAX_ATTENTION_TOKENS, dtype=torch.bool))
    attend(q, q[:, :1], q[:, :1])  # grouped-query heads
    attend(q.double(), q.double(), q.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attend(q, q, q)
    with plain_pytorch():
        attend(q, q, q)
    assert len(calls) == 2 * expect
    monkeypatch.setattr(ops, "MAX_KEPT_SCORES", 2 * MAX_ATTENTION_TOKENS ** 2 - 1)
    attend(q, q, q)  # training would keep too many probabilities: SDPA
    assert len(calls) == 2 * expect
    with torch.no_grad():
        attend(q, q, q)  # inference keeps none
    assert len(calls) == 3 * expect
    monkeypatch.setattr(ops, "MIN_ATTENTION_SCORES", 2 * MAX_ATTENTION_TOKENS ** 2 + 1)
    with torch.no_grad():
        attend(q, q, q)  # too small a call: SDPA
    assert len(calls) == 3 * expect


def test_attention_module_trains_the_same_on_the_fused_and_plain_paths():
    torch.manual_seed(0)
    layer = Attention(24, 3, qkv_bias=True, out_bias=True)
    x = torch.randn(2, 70, 24)

    def grads():
        layer.zero_grad()
        layer(x).square().mean().backward()
        return [p.grad.clone() for p in layer.parameters()]

    fused = grads()
    with plain_pytorch():
        plain = grads()
    for got, want in zip(fused, plain):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_the_attention_kernel_refuses_bad_operands_by_name():
    kernels = fused_cpu()
    if kernels is None:  # no AVX2: nothing compiled to call
        return
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="k must match q's head size"):
        kernels.attention_forward(q, torch.randn(1, 2, 4, 6), torch.randn(1, 2, 4, 8), 1.0, False)
    with pytest.raises(RuntimeError, match="must share batch and heads"):
        kernels.attention_forward(q, torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8), 1.0, False)
    with pytest.raises(RuntimeError, match="v must have a unit stride on its last dimension"):
        kernels.attention_forward(q, q, torch.randn(1, 2, 8, 4).transpose(-1, -2), 1.0, False)
    with pytest.raises(RuntimeError, match="q must be a 4-D float32 CPU tensor"):
        kernels.attention_forward(q.double(), q, q, 1.0, False)


def test_fused_attention_takes_expanded_operands_and_gradients():
    # An expanded gradient (row stride 0), keys and values broadcast over positions, and one query
    # whose row stride PyTorch leaves arbitrary: BLAS must still get rows that do not overlap.
    torch.manual_seed(0)
    q = torch.randn(2, 3, 6, 8)
    k = torch.randn(2, 3, 1, 8).expand(2, 3, 5, 8)
    v = torch.randn(2, 3, 5, 8)
    weights = torch.randn(2, 3, 8)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    (attention(*leaves).sum(dim=-2) * weights).sum().backward()  # the kernel's grad: weights expanded over rows
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    (F.scaled_dot_product_attention(*ref).sum(dim=-2) * weights.double()).sum().backward()
    for got, want in zip(leaves, ref):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-5)
    one = torch.randn(2, 3, 8, 1).transpose(-1, -2)  # (2, 3, 1, 8): unit last stride, row stride 1
    torch.testing.assert_close(attention(one, k, v).double(), F.scaled_dot_product_attention(
        one.double(), k.double(), v.double()), rtol=1e-5, atol=1e-6)


def test_other_shapes_fall_back_to_sdpa():
    q = torch.randn(2, 3, 6, 8)
    assert not fused_attention_applies(q[0], q[0], q[0])  # 3-D
    assert not fused_attention_applies(q, q[:1].expand(2, 3, 6, 8)[:, :1], q[:, :1])  # grouped heads
    assert not fused_attention_applies(q, q[:1], q[:1])  # a broadcast batch
    torch.testing.assert_close(attention(q, q[:1], q[:1]), F.scaled_dot_product_attention(q, q[:1], q[:1]))
    assert not fused_attention_applies(q[..., :0], q[..., :0], q)  # no head size
