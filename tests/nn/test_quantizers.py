"""Quantizers: outputs and gradients, nearest codes, losses and EMA updates checked against
formulas computed here; RVQ prefixes and dropout; FSQ grids; dead-code restarts; bad input;
checkpoint round trips."""
import pytest
import torch

from polymodal.errors import ConfigError
from polymodal.nn.quantizers import FSQ, ResidualVQ, VectorQuantizer


def _vq(num_codes=16, dim=4, seed=0, **kwargs):
    torch.manual_seed(seed)
    return VectorQuantizer(num_codes, dim, **kwargs)


def _normalise(x):
    return x / x.norm(dim=-1, keepdim=True)


def _fsq_grid_values(level):
    """The values FSQ may give a channel with `level` levels, from the paper's definition."""
    half = level // 2
    low = -(level - 1) / 2 if level % 2 else -level / 2
    return torch.tensor([(low + j) / half for j in range(level)])


# 1. straight-through: forward value = code vectors, gradient = identity

@pytest.mark.parametrize("kwargs", [{}, {"cosine": True}, {"ema_decay": 0.9}, {"restart_after": 1}])
@pytest.mark.parametrize("training", [False, True])
def test_vq_straight_through(kwargs, training):
    vq = _vq(**kwargs).train(training)
    codebook = vq.embedding.weight.detach().clone()  # forward reads the codebook before updating it
    if vq.cosine:
        codebook = _normalise(codebook)
    z = torch.randn(2, 5, 4, requires_grad=True)
    out = vq(z)
    assert out.quantized.shape == z.shape and out.codes.shape == (2, 5) and out.codes.dtype == torch.long
    torch.testing.assert_close(out.quantized, codebook[out.codes], rtol=0, atol=0 if not vq.cosine else 1e-6)
    g = torch.randn_like(z)
    (out.quantized * g).sum().backward()
    assert torch.equal(z.grad, g)
    assert vq.embedding.weight.grad is None  # the decoder path never reaches the codebook


def test_rvq_straight_through():
    rvq = ResidualVQ(3, 8, 4)
    z = torch.randn(6, 4, requires_grad=True)
    out = rvq(z)
    assert out.codes.shape == (6, 3)
    expected = sum(stage.embedding.weight[out.codes[:, i]] for i, stage in enumerate(rvq.stages))
    torch.testing.assert_close(out.quantized, expected)
    g = torch.randn_like(z)
    (out.quantized * g).sum().backward()
    assert torch.equal(z.grad, g)


def test_fsq_straight_through_rounding_and_tanh_gradient():
    levels = [2, 3, 4, 5, 8]
    fsq = FSQ(levels)
    z = (torch.randn(7, 5) * 2).requires_grad_()
    out = fsq(z)
    assert torch.equal(out.quantized, fsq.lookup(out.codes))
    g = torch.randn_like(z)
    (out.quantized * g).sum().backward()
    # Paper: q = round(tanh(z + s) * h - o) / (L // 2), the round treated as the identity.
    level = torch.tensor(levels, dtype=torch.float32)
    h = (level - 1) * (1 - 1e-3) / 2
    o = (level % 2 == 0).float() * 0.5
    s = torch.tan(o / h)
    expected = g * (1 - torch.tanh(z.detach() + s) ** 2) * h / (level // 2)
    torch.testing.assert_close(z.grad, expected)


# 2. nearest code

@pytest.mark.parametrize("cosine", [False, True])
def test_vq_codes_are_the_nearest(cosine):
    vq = _vq(num_codes=64, dim=8, cosine=cosine).eval()
    z = torch.randn(3, 100, 8) * 1.5
    codes = vq(z).codes
    x, e = z.reshape(-1, 8), vq.embedding.weight.detach()
    if cosine:
        x, e = _normalise(x), _normalise(e)
    assert torch.equal(codes.reshape(-1), torch.cdist(x.double(), e.double()).argmin(dim=1))


def test_vq_ties_go_to_the_lowest_index():
    vq = _vq(num_codes=4, dim=2).eval()
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[5.0, 5.0], [1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]))
    assert vq(torch.tensor([[1.0, 0.0], [0.0, 0.0]])).codes.tolist() == [1, 1]  # [0, 0] is 1 from codes 1, 2, 3


# 3. loss

def test_vq_loss_value_and_gradients():
    beta = 0.3
    vq = _vq(num_codes=8, dim=3, beta=beta)
    z = torch.randn(10, 3, requires_grad=True)
    out = vq(z)
    e = vq.embedding.weight.detach()[out.codes]
    # Both terms have the value mean((e - z)^2); the stop-gradients only route the gradients.
    torch.testing.assert_close(out.loss, (1 + beta) * ((e - z.detach()) ** 2).mean())
    out.loss.backward()
    diff = 2 * (z.detach() - e) / z.numel()
    torch.testing.assert_close(z.grad, beta * diff)  # commitment term only
    expected = torch.zeros(8, 3).index_add_(0, out.codes, -diff)  # codebook term only, weight 1
    torch.testing.assert_close(vq.embedding.weight.grad, expected)


def test_vq_cosine_loss_uses_normalised_vectors():
    vq = _vq(num_codes=8, dim=3, cosine=True, beta=0.5)
    z = torch.randn(10, 3)
    out = vq(z)
    e = _normalise(vq.embedding.weight.detach())[out.codes]
    torch.testing.assert_close(out.loss, 1.5 * ((e - _normalise(z)) ** 2).mean())


def test_ema_loss_is_only_the_commitment_term():
    vq = _vq(num_codes=8, dim=3, beta=0.4, ema_decay=0.9).eval()
    assert not vq.embedding.weight.requires_grad
    z = torch.randn(10, 3, requires_grad=True)
    out = vq(z)
    e = vq.embedding.weight[out.codes]
    torch.testing.assert_close(out.loss, 0.4 * ((e - z.detach()) ** 2).mean())
    out.loss.backward()
    torch.testing.assert_close(z.grad, 0.4 * 2 * (z.detach() - e) / z.numel())


# 4. EMA update

def test_ema_update_follows_the_closed_form():
    decay, eps, num_codes = 0.9, 1e-5, 5
    vq = _vq(num_codes=num_codes, dim=2, ema_decay=decay, eps=eps).train()
    with torch.no_grad():  # a trained-looking state: sizes and sums not equal to the defaults
        vq.cluster_size_ema.copy_(torch.tensor([3.0, 0.5, 2.0, 1.0, 0.01]))
        vq.embed_sum_ema.copy_(torch.randn(num_codes, 2))
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [-4.0, 0.0], [9.0, 9.0]]))
    size0, sum0 = vq.cluster_size_ema.clone(), vq.embed_sum_ema.clone()
    z = torch.tensor([[0.1, 0.2], [3.9, 0.3], [4.2, -0.1], [0.2, 3.7], [-0.3, -0.2], [4.0, 0.5]])
    out = vq(z)
    assert out.codes.tolist() == [0, 1, 1, 2, 0, 1]
    counts = torch.tensor([2.0, 3.0, 1.0, 0.0, 0.0])
    sums = torch.stack([z[out.codes == k].sum(0) for k in range(num_codes)])
    size = decay * size0 + (1 - decay) * counts
    embed_sum = decay * sum0 + (1 - decay) * sums
    n = size.sum()
    smoothed = (size + eps) / (n + num_codes * eps) * n
    torch.testing.assert_close(vq.cluster_size_ema, size)
    torch.testing.assert_close(vq.embed_sum_ema, embed_sum)
    torch.testing.assert_close(vq.embedding.weight, embed_sum / smoothed[:, None])


def test_ema_codebook_stays_put_until_used():
    vq = _vq(num_codes=4, dim=2, ema_decay=0.99).train()
    before = vq.embedding.weight.clone()
    unused = torch.ones(4, dtype=torch.bool)
    unused[vq(torch.randn(3, 2)).codes] = False
    torch.testing.assert_close(vq.embedding.weight[unused], before[unused], rtol=1e-4, atol=1e-6)


# 5. residual VQ

def _fitted_rvq():
    torch.manual_seed(0)
    rvq = ResidualVQ(4, 16, 4, ema_decay=0.5, restart_after=3).train()
    z = torch.randn(512, 4)
    for _ in range(25):
        rvq(z)
    return rvq.eval(), z


def test_rvq_error_falls_with_each_stage():
    rvq, z = _fitted_rvq()
    errors = [(z - rvq(z, num_stages=k).quantized).pow(2).sum(-1).mean().item() for k in range(1, 5)]
    baseline = z.pow(2).sum(-1).mean().item()
    assert all(a > b for a, b in zip([baseline] + errors, errors)), errors


def test_rvq_lookup_matches_forward_for_every_prefix():
    rvq, z = _fitted_rvq()
    full = rvq(z[:50])
    assert torch.equal(rvq.lookup(full.codes), full.quantized)
    for k in range(1, 5):
        out = rvq(z[:50], num_stages=k)
        assert torch.equal(out.codes, full.codes[:, :k])
        assert torch.equal(rvq.lookup(full.codes[:, :k]), out.quantized)
    residual = z[:50]  # the stages quantize residuals: rebuild the codes by hand
    for i, stage in enumerate(rvq.stages):
        e = stage.embedding.weight
        assert torch.equal(full.codes[:, i], torch.cdist(residual, e).argmin(1))
        residual = residual - e[full.codes[:, i]]


def test_rvq_loss_is_the_sum_of_stage_losses():
    rvq = ResidualVQ(3, 8, 4, beta=0.5)
    z = torch.randn(20, 4)
    out, residual, expected = rvq(z), z, 0.0
    for i, stage in enumerate(rvq.stages):
        e = stage.embedding.weight.detach()[out.codes[:, i]]
        expected = expected + 1.5 * ((e - residual) ** 2).mean()
        residual = residual - e
    torch.testing.assert_close(out.loss, expected)


def test_rvq_quantizer_dropout_only_in_training():
    torch.manual_seed(0)
    rvq = ResidualVQ(4, 8, 4, quantizer_dropout=0.5).train()
    z = torch.randn(5, 4)
    used = [rvq(z).codes.shape[-1] for _ in range(40)]
    assert 4 in used and min(used) < 4 and set(used) <= {1, 2, 3, 4}
    assert max(rvq(z, num_stages=2).codes.shape[-1] for _ in range(20)) <= 2
    rvq.eval()
    assert all(rvq(z).codes.shape[-1] == 4 for _ in range(20))


# 6. FSQ

@pytest.mark.parametrize("levels", [[2, 3, 4, 5], [8, 5, 5, 5], [7]])
def test_fsq_grid_codes_and_lookup(levels):
    fsq = FSQ(levels)
    assert fsq.dim == len(levels) and fsq.codebook_size == torch.tensor(levels).prod().item()
    sweep = torch.linspace(-8, 8, 4001)
    out = fsq(sweep[:, None].expand(-1, len(levels)).contiguous())
    representatives = []  # one input per value a channel reaches
    for i, level in enumerate(levels):
        values, first = torch.unique(out.quantized[:, i], return_inverse=True)
        torch.testing.assert_close(values, _fsq_grid_values(level), rtol=0, atol=1e-6)
        representatives.append(torch.stack([sweep[first == j][0] for j in range(level)]))
    grid = torch.cartesian_prod(*representatives).reshape(-1, len(levels))  # every combination
    out = fsq(grid)
    assert out.codes.dtype == torch.long and out.loss.item() == 0.0
    assert out.codes.min() >= 0 and out.codes.max() < fsq.codebook_size
    assert out.codes.unique().numel() == fsq.codebook_size  # all codes reachable
    assert out.quantized.abs().max() <= 1
    # Mixed radix by hand, channel 0 least significant.
    code, radix = torch.zeros(len(grid), dtype=torch.long), 1
    for i, level in enumerate(levels):
        digit = torch.round(out.quantized[:, i] * (level // 2) + level // 2).long()
        code, radix = code + digit * radix, radix * level
    assert torch.equal(out.codes, code)
    assert torch.equal(fsq.lookup(out.codes), out.quantized)


def test_fsq_usage_counts_training_forwards():
    fsq = FSQ([3, 3])
    fsq.eval()(torch.randn(10, 2))
    assert fsq.usage() == 0.0
    fsq.train()(torch.tensor([[-5.0, -5.0], [5.0, 5.0], [5.0, 5.0]]))
    assert fsq.usage() == pytest.approx(2 / 9)
    fsq.reset_usage()
    assert fsq.usage() == 0.0


# 7. dead codes and usage

def _clustered_setup(**kwargs):
    """8 codes: 4 near the data, 4 far away; a batch of 1024 distinct points around the near ones."""
    vq = _vq(num_codes=8, dim=2, **kwargs).train()
    centres = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [0.0, -2.0]])
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.cat([centres, torch.full((4, 2), 100.0)]))
        if vq.ema_decay is not None:
            vq.embed_sum_ema.copy_(vq.embedding.weight)
    z = centres.repeat(256, 1) + 0.3 * torch.randn(1024, 2)
    return vq, z


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_dead_codes_are_restarted_onto_inputs_and_then_used(ema_decay):
    vq, z = _clustered_setup(restart_after=3, ema_decay=ema_decay)
    for _ in range(2):
        vq(z)
    assert vq.usage() == 0.5 and vq.steps_unused.tolist() == [0] * 4 + [2] * 4
    # Not yet: only 2 unused forwards (EMA's smoothing moves them by a hair).
    torch.testing.assert_close(vq.embedding.weight[4:], torch.full((4, 2), 100.0), rtol=1e-4, atol=0)
    vq(z)
    moved = vq.embedding.weight[4:].detach()
    assert (moved[:, None] == z[None]).all(-1).any(1).all()  # each now equals some input
    assert vq.steps_unused.tolist() == [0] * 8
    if ema_decay is not None:
        assert torch.equal(vq.embed_sum_ema[4:], moved) and vq.cluster_size_ema[4:].tolist() == [1.0] * 4
    vq.reset_usage()
    vq(z)
    assert vq.usage() == 1.0


def test_no_restart_without_restart_after_and_none_in_eval():
    vq, z = _clustered_setup()
    for _ in range(5):
        vq(z)
    assert (vq.embedding.weight[4:] == 100).all() and vq.usage() == 0.5
    vq, z = _clustered_setup(restart_after=1)
    vq.eval()(z)
    assert (vq.embedding.weight[4:] == 100).all() and vq.usage() == 0.0


def test_backward_after_a_training_forward_that_restarts_codes():
    vq, z = _clustered_setup(restart_after=1, cosine=True)
    z.requires_grad_()
    out = vq(z)
    (out.loss + out.quantized.sum()).backward()  # in-place codebook update must not break autograd
    assert z.grad is not None and vq.embedding.weight.grad is not None


def test_rvq_usage_is_the_mean_over_stages():
    rvq = ResidualVQ(2, 4, 2).train()
    with torch.no_grad():
        rvq.stages[0].embedding.weight.copy_(torch.tensor([[0.0, 0.0], [50.0, 0.0], [60.0, 0.0], [70.0, 0.0]]))
        rvq.stages[1].embedding.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))
    rvq(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))  # stage 0 uses 1 of 4 codes, stage 1 uses 2
    assert rvq.usage() == pytest.approx((1 / 4 + 2 / 4) / 2)
    rvq.reset_usage()
    assert rvq.usage() == 0.0


# 8. bad input

def test_lookup_of_out_of_range_codes_names_the_range():
    vq = _vq(num_codes=16)
    with pytest.raises(ValueError, match=r"\[0, 16\).*\[3, 16\]"):
        vq.lookup(torch.tensor([3, 16]))
    with pytest.raises(ValueError, match=r"\[0, 16\).*\[-1, 2\]"):
        ResidualVQ(2, 16, 4).lookup(torch.tensor([[2, -1]]))
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        FSQ([3, 4]).lookup(torch.tensor(12))
    with pytest.raises(ValueError, match="k <= 2"):
        ResidualVQ(2, 16, 4).lookup(torch.zeros(5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        vq.lookup(torch.tensor([1.0]))


@pytest.mark.parametrize("build, name", [
    (lambda: VectorQuantizer(0, 4), "num_codes"),
    (lambda: VectorQuantizer(8, 0), "dim"),
    (lambda: VectorQuantizer(8, 4, beta=-0.1), "beta"),
    (lambda: VectorQuantizer(8, 4, ema_decay=1.0), "ema_decay"),
    (lambda: VectorQuantizer(8, 4, ema_decay=0.0), "ema_decay"),
    (lambda: VectorQuantizer(8, 4, cosine="yes"), "cosine"),
    (lambda: VectorQuantizer(8, 4, restart_after=-1), "restart_after"),
    (lambda: VectorQuantizer(8, 4, eps=0.0), "eps"),
    (lambda: ResidualVQ(0, 8, 4), "num_stages"),
    (lambda: ResidualVQ(2, 8, 4, quantizer_dropout=1.5), "quantizer_dropout"),
    (lambda: ResidualVQ(2, 8, 4, beta=float("nan")), "beta"),
    (lambda: FSQ([]), "levels"),
    (lambda: FSQ([5, 1]), r"levels\[1\]"),
    (lambda: FSQ([5, 2.5]), r"levels\[1\]"),
    (lambda: FSQ([1000] * 3), "levels"),
])
def test_bad_constructor_arguments_name_the_argument(build, name):
    with pytest.raises(ConfigError, match=name):
        build()


def test_wrong_last_dim_names_the_expected_dim():
    for quantizer, dim in [(_vq(dim=4), 4), (ResidualVQ(2, 8, 6), 6), (FSQ([3, 3, 3]), 3)]:
        with pytest.raises(ValueError, match=f"last dim {dim}"):
            quantizer(torch.randn(2, 5))
    with pytest.raises(ValueError, match="num_stages"):
        ResidualVQ(2, 8, 4)(torch.randn(2, 4), num_stages=3)


# 9. checkpoints, dtypes

def test_state_dict_round_trip_resumes_exactly():
    vq, z = _clustered_setup(restart_after=2, ema_decay=0.9)
    vq(z)
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    assert set(state) == {"embedding.weight", "cluster_size_ema", "embed_sum_ema", "steps_unused"}
    copy = _vq(num_codes=8, dim=2, seed=1, restart_after=2, ema_decay=0.9).train()
    copy.load_state_dict(state)
    for module in (vq, copy):  # the next training step restarts the dead codes: same RNG, same result
        torch.manual_seed(7)
        module(z)
    for key, value in vq.state_dict().items():
        assert torch.equal(copy.state_dict()[key], value), key
    probe = torch.randn(100, 2)
    assert torch.equal(copy.eval()(probe).codes, vq.eval()(probe).codes)


def test_state_dict_round_trip_rvq_and_plain_vq_names():
    assert set(_vq().state_dict()) == {"embedding.weight"}  # Chameleon's VQ-VAE naming, nothing extra
    rvq, z = _fitted_rvq()
    copy = ResidualVQ(4, 16, 4, ema_decay=0.5, restart_after=3)
    copy.load_state_dict(rvq.state_dict())
    assert torch.equal(copy.eval()(z).codes, rvq(z).codes)
    assert FSQ([4, 5]).state_dict() == {}  # no learned or running state


@pytest.mark.parametrize("quantizer", [
    lambda: _vq(num_codes=32, dim=4), lambda: _vq(num_codes=32, dim=4, cosine=True, ema_decay=0.9),
    lambda: ResidualVQ(3, 32, 4), lambda: FSQ([3, 4, 5, 6]),
])
def test_bf16_inputs_match_float32(quantizer):
    module = quantizer().eval()
    z = torch.randn(4, 10, 4).to(torch.bfloat16).requires_grad_()
    out = module(z)
    reference = module(z.detach().float())
    assert out.quantized.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert torch.equal(out.codes, reference.codes)
    assert torch.equal(out.quantized, reference.quantized.to(torch.bfloat16))
    out.quantized.float().sum().backward()
    assert z.grad.dtype == torch.bfloat16


def test_dead_codes_restart_onto_the_worst_fit_vectors():
    """Dead codes go where the codebook fits worst (draws weighted by squared error), not onto the
    many vectors it already fits exactly (a plain background)."""
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 2, restart_after=1).train()
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [100.0, 100.0], [200.0, 200.0]]))
    fitted = torch.tensor([[0.0, 0.0], [1.0, 0.0]]).repeat(50, 1)  # 100 vectors exactly on codes 0 and 1
    outlier = torch.tensor([[0.5, 5.0]])
    vq(torch.cat([fitted, outlier]))
    assert torch.equal(vq.embedding.weight[2:], outlier.expand(2, -1))  # both dead codes moved onto it
    assert torch.equal(vq.embedding.weight[:2], torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
