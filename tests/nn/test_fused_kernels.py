"""polymodal.kernels: the fused CPU kernels against plain PyTorch in float64, their fallbacks, and DiT on both paths."""
import os
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

from polymodal.generators.dit import DiT, dit_tiny
from polymodal.kernels import adaln_modulate, gated_residual, gelu_mlp, gelu_tanh
from polymodal.kernels import loader
from polymodal.kernels.loader import SUPPORTED_CAPABILITIES, fused_cpu, plain_pytorch


@pytest.fixture
def rebuilt_loader():
    """Forget the cached kernel module before and after a test that changes how it loads."""
    fused_cpu.cache_clear()
    yield
    fused_cpu.cache_clear()


def test_the_kernels_build_wherever_the_cpu_has_avx2():
    # CI's CPU has AVX2 and a compiler, so the fused path is what the rest of this file tests.
    if torch.backends.cpu.get_cpu_capability() in SUPPORTED_CAPABILITIES:
        assert fused_cpu() is not None
    else:
        with pytest.warns(UserWarning, match="need AVX2"):
            fused_cpu.cache_clear()
            assert fused_cpu() is None


def reference_grads(fn, *inputs, grad_out):
    """fn's output and input gradients in float64 (the oracle)."""
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.double())
    return out.detach(), [t.grad for t in leaves]


def fused_grads(fn, *inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("shape", [(3, 37), (64, 1000), (2, 5, 8)])
def test_gelu_tanh_matches_pytorch_forward_and_backward(shape):
    x = torch.randn(shape) * 3
    x.view(-1)[:4] = torch.tensor([-100.0, 100.0, 0.0, -5.0])  # both tails of the sigmoid, zero
    grad = torch.randn(shape)
    ref, (ref_grad,) = reference_grads(lambda t: F.gelu(t, approximate="tanh"), x, grad_out=grad)
    out, (out_grad,) = fused_grads(gelu_tanh, x, grad_out=grad)
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(out_grad.double(), ref_grad, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("shape, hidden, out, bias", [((3, 37), 21, 37, True), ((2, 150, 40), 72, 24, False),
                                                     ((300, 64), 96, 64, True)])
def test_gelu_mlp_matches_pytorch_forward_and_backward(shape, hidden, out, bias):
    # Widths with an AVX2 tail; 300 rows span several row blocks and both threads' chunks.
    torch.manual_seed(0)
    x, w1, w2 = torch.randn(shape), torch.randn(hidden, shape[-1]) * 0.3, torch.randn(out, hidden) * 0.3
    b1, b2 = (torch.randn(hidden), torch.randn(out)) if bias else (None, None)
    inputs = [t for t in (x, w1, b1, w2, b2) if t is not None]

    def unpack(fn):
        return lambda *t: fn(t[0], t[1], t[2], t[3], t[4]) if bias else fn(t[0], t[1], None, t[2], None)

    def reference(x, w1, b1, w2, b2):
        return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)

    grad = torch.randn(*shape[:-1], out)
    ref, ref_grads = reference_grads(unpack(reference), *inputs, grad_out=grad)
    got, grads = fused_grads(unpack(gelu_mlp), *inputs, grad_out=grad)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    names = ["x", "w1", "b1", "w2", "b2"] if bias else ["x", "w1", "w2"]
    for name, got_grad, want in zip(names, grads, ref_grads):
        torch.testing.assert_close(got_grad.double(), want, rtol=1e-4, atol=1e-5 * max(1.0, want.abs().max().item()),
                                   msg=f"grad of {name}")
    with torch.no_grad():  # inference keeps no hidden activations and gives the same output
        torch.testing.assert_close(unpack(gelu_mlp)(*inputs), got, rtol=0, atol=0)


def test_gelu_mlp_module_keeps_the_hooks_of_its_layers():
    from polymodal.nn.mlp import GeluMLP

    mlp, x = GeluMLP(8, 24, act="gelu_tanh"), torch.randn(2, 3, 8)
    fused = mlp(x)
    seen = []
    mlp.fc2.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    torch.testing.assert_close(mlp(x), fused, rtol=1e-5, atol=1e-6)
    assert seen == [(2, 3, 8)]  # with a hooked layer the MLP runs layer by layer
    fresh = GeluMLP(8, 24, act="gelu_tanh")
    grads = []
    fresh.fc1.register_full_backward_hook(lambda module, grad_in, grad_out: grads.append(grad_out[0].shape))
    fresh(x.requires_grad_()).sum().backward()
    assert grads == [(2, 3, 24)]  # a backward hook sees its layer's gradient
    seen.clear()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: seen.append(type(module)))
    try:
        GeluMLP(8, 24, act="gelu_tanh")(x)
    finally:
        handle.remove()
    assert seen.count(torch.nn.Linear) == 2  # a global hook sees both layers


def test_gelu_mlp_follows_autocast_and_degenerate_widths():
    x, w1, b1, w2, b2 = torch.randn(4, 8), torch.randn(16, 8), torch.randn(16), torch.randn(8, 16), torch.randn(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gelu_mlp(x, w1, b1, w2, b2).dtype == torch.bfloat16  # as the two layers under autocast
    empty_hidden = gelu_mlp(x, torch.randn(0, 8), torch.randn(0), torch.randn(8, 0), b2)
    torch.testing.assert_close(empty_hidden, b2.expand(4, 8))


def test_gelu_tanh_propagates_nan():
    assert torch.isnan(gelu_tanh(torch.tensor([1.0, float("nan")] * 8))[1::2]).all()


def test_gelu_tanh_under_compile_is_the_sigmoid_identity(monkeypatch):
    # torch.compile traces x * sigmoid(2u); checked here without compiling.
    x = torch.linspace(-8, 8, 1001)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(gelu_tanh(x), F.gelu(x, approximate="tanh"), rtol=1e-6, atol=1e-6)


def adaln_reference(x, shift, scale, eps=1e-6):
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale) + shift


@pytest.mark.parametrize("b, n, d", [(1, 1, 8), (3, 5, 37), (4, 64, 96)])
def test_adaln_modulate_matches_pytorch_forward_and_backward(b, n, d):
    x = torch.randn(b, n, d) * 2 + 0.5
    shift, scale = torch.randn(b, 1, d), torch.randn(b, 1, d) * 0.3
    grad = torch.randn(b, n, d)
    ref, ref_grads = reference_grads(adaln_reference, x, shift, scale, grad_out=grad)
    out, out_grads = fused_grads(lambda *t: adaln_modulate(*t, eps=1e-6), x, shift, scale, grad_out=grad)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("x", "shift", "scale"), out_grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=f"grad of {name}")


def test_adaln_modulate_takes_chunked_views_and_eps():
    # DiT passes (B, 1, D) chunks of one (B, 1, 6D) row: strided views.
    x = torch.randn(2, 7, 16) * 1e-3
    row = torch.randn(2, 1, 32)
    shift, scale = row.chunk(2, dim=-1)
    for eps in (1e-6, 1e-2):
        torch.testing.assert_close(adaln_modulate(x, shift, scale, eps), adaln_reference(x, shift, scale, eps),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b, n, d", [(1, 1, 8), (3, 5, 37), (4, 64, 96)])
def test_gated_residual_matches_pytorch_forward_and_backward(b, n, d):
    x, gate, y = torch.randn(b, n, d), torch.randn(b, 1, d), torch.randn(b, n, d)
    grad = torch.randn(b, n, d)
    ref, ref_grads = reference_grads(lambda x, g, y: x + g * y, x, gate, y, grad_out=grad)
    out, out_grads = fused_grads(gated_residual, x, gate, y, grad_out=grad)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    for name, got, want in zip(("x", "gate", "y"), out_grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=f"grad of {name}")


def test_other_dtypes_take_the_plain_path():
    x = torch.randn(4, 8, dtype=torch.float64)
    assert torch.equal(gelu_tanh(x), F.gelu(x, approximate="tanh"))


def test_dit_trains_the_same_on_the_fused_and_plain_paths():
    config = dit_tiny(hidden_size=40, num_heads=4, intermediate_size=72)  # widths with an AVX2 tail
    torch.manual_seed(0)
    model = DiT(config)
    for param in model.parameters():  # wake the zero-initialised modulation and output layers
        param.data.normal_(0, 0.05)
    latents, timesteps, labels = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 4, 9])

    def loss_and_grads():
        model.zero_grad()
        loss = model(latents, timesteps, labels).square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    fused_loss, fused = loss_and_grads()
    with plain_pytorch():
        plain_loss, plain = loss_and_grads()
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(fused, plain):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, rebuilt_loader):
    import torch.utils.cpp_extension as cpp_extension

    def no_compiler(**_):
        raise RuntimeError("Ninja is required to load C++ extensions\nsecond line")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with pytest.warns(UserWarning, match=r"could not be built \(Ninja is required to load C\+\+ extensions\)"):
        assert fused_cpu() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cached: no second warning
        x = torch.randn(5, 9)
        assert fused_cpu() is None
        torch.testing.assert_close(gelu_tanh(x), F.gelu(x, approximate="tanh"))


def test_the_environment_switch_turns_the_kernels_off(monkeypatch, rebuilt_loader):
    monkeypatch.setenv("POLYMODAL_FUSED_CPU", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused_cpu() is None
    assert loader.kernels() is None


def test_checkouts_of_the_same_source_share_one_build_folder(monkeypatch, tmp_path):
    # ninja rebuilds when the source path changes, so the source is copied into a folder named by its digest.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "builds"))
    names = []
    for checkout, texts in (("a", ("int x;", "int z;")), ("b", ("int x;", "int z;")), ("c", ("int x;", "int y;"))):
        sources = [tmp_path / checkout / name for name in ("fused_cpu.cpp", "attention_cpu.cpp")]
        sources[0].parent.mkdir()
        for source, text in zip(sources, texts):
            source.write_text(text)
        monkeypatch.setattr(loader, "SOURCES", sources)
        name, copied = loader._build_sources()
        assert [path.parent for path in copied] == [tmp_path / "builds" / name] * 2
        assert [path.read_text() for path in copied] == list(texts)
        names.append(name)
    assert names[0] == names[1] != names[2]  # a change in any source gets a folder of its own


def test_the_kernels_refuse_mismatched_shapes_by_name():
    kernels = fused_cpu()
    if kernels is None:  # no AVX2: nothing compiled to call (the first test checks the warning)
        return
    x = torch.randn(2, 3, 8)
    with pytest.raises(RuntimeError, match=r"shift must be \(B, D\) = \(2, 8\)"):
        kernels.adaln_forward(x, torch.randn(2, 7), torch.randn(2, 8), 1e-6)
    with pytest.raises(RuntimeError, match="must be a contiguous float32 CPU tensor"):
        kernels.gelu_tanh_forward(torch.randn(4, 4).t())
    with pytest.raises(RuntimeError, match=r"w1 must be \(H, D\) and w2 \(O, H\)"):
        kernels.mlp_gelu_forward(torch.randn(3, 4), torch.randn(6, 5), None, torch.randn(4, 6), None, True)
    with pytest.raises(RuntimeError, match="b2 must have 4 entries, got 6"):
        kernels.mlp_gelu_forward(torch.randn(3, 4), torch.randn(6, 4), None, torch.randn(4, 6), torch.randn(6), True)


def test_a_lock_left_by_an_interrupted_build_is_removed(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    name, _ = loader._build_sources()
    lock = tmp_path / name / "lock"
    lock.touch()
    loader._build_sources()
    assert lock.exists()  # a fresh lock belongs to a build under way
    old = time.time() - loader.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="left by a kernel build interrupted"):
        loader._build_sources()
    assert not lock.exists()


def test_gelu_gradient_is_zero_far_into_the_negative_tail():
    x = torch.tensor([-1e15, -3e18] * 8, requires_grad=True)
    gelu_tanh(x).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
