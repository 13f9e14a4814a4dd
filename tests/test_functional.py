"""The functional core against independent references: gradcheck, Monte Carlo KL, weight sampling."""

import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F

from bayes_sparse import _fusedkernel
from bayes_sparse import functional as BF

D = torch.float64


def test_log_alpha_definition_and_clip():
    theta = torch.tensor([1.0, 0.5, 1e-6, 100.0], dtype=D)
    log_sigma2 = torch.tensor([0.0, -3.0, 0.0, -30.0], dtype=D)
    expected = (log_sigma2 - torch.log(theta**2)).clamp(-8, 8)
    torch.testing.assert_close(BF.log_alpha(theta, log_sigma2), expected)
    assert BF.log_alpha(theta, log_sigma2)[2] == 8.0 and BF.log_alpha(theta, log_sigma2)[3] == -8.0
    # a weight at exactly zero gives the clipped maximum, not inf/NaN
    assert BF.log_alpha(torch.zeros(1), torch.zeros(1)).item() == 8.0


def test_gradcheck_log_alpha_and_kl():
    theta = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=D, requires_grad=True)
    log_sigma2 = torch.tensor([-2.0, 0.1, -1.0, -0.5], dtype=D, requires_grad=True)  # inside the clip range
    assert torch.autograd.gradcheck(BF.log_alpha, (theta, log_sigma2))
    la = torch.linspace(-7.5, 7.5, 9, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(BF.kl_log_uniform, (la,))


def _layer_inputs(nd, g, kernel, **geometry):
    """(x, theta, op) for a linear layer (nd=0) or an nd-dimensional convolution."""
    if nd == 0:
        return torch.randn(5, 6, generator=g, dtype=D), torch.randn(3, 6, generator=g, dtype=D), F.linear
    x = torch.randn(2, 2, *([5] * nd), generator=g, dtype=D)
    theta = torch.randn(3, 2, *([kernel] * nd), generator=g, dtype=D)
    return x, theta, functools.partial(BF.conv_nd, **geometry)


@pytest.mark.parametrize("nd", [0, 1, 2, 3], ids=["linear", "conv1d", "conv2d", "conv3d"])
def test_gradcheck_local_reparam(nd):
    g = torch.Generator().manual_seed(1)
    x, theta, op = _layer_inputs(nd, g, 2, stride=1, padding=1)
    la = torch.empty_like(theta).uniform_(-3, 1, generator=g)
    bias = torch.randn(theta.shape[0], generator=g, dtype=D)
    eps = torch.randn(op(x, theta, None).shape, generator=g, dtype=D)
    args = tuple(t.requires_grad_() for t in (x, theta, la, bias))
    assert torch.autograd.gradcheck(lambda x, t, a, b: BF.local_reparam(x, t, a, b, op, eps=eps), args)


def test_kl_approximation_matches_monte_carlo_up_to_a_constant():
    """KL(N(theta, alpha theta^2) || log-uniform) = const - 0.5 log alpha + E log|1 + sqrt(alpha) eps|."""
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(2_000_000, generator=g, dtype=D)
    grid = torch.linspace(-8, 8, 17, dtype=D)
    mc = torch.stack([-0.5 * a + torch.log((1 + torch.exp(0.5 * a) * eps).abs()).mean() for a in grid])
    diff = BF.kl_log_uniform(grid) - mc
    # Molchanov et al. report the approximation to within ~0.01 nats; MC noise here is < 1e-3.
    assert (diff - diff.mean()).abs().max() < 0.015
    # and it is the KL normalized to vanish as alpha -> infinity, non-negative and decreasing
    kl = BF.kl_log_uniform(grid)
    assert kl[-1] < 1e-3 and (kl >= 0).all() and (kl.diff() < 0).all()


def _weight_sampled_moments(x, theta, la, bias, op, samples):
    """Draw whole weight tensors w ~ N(theta, alpha theta^2), run op per draw, return empirical mean/var."""
    g = torch.Generator().manual_seed(3)
    outs = []
    for chunk in range(0, samples, 2000):
        n = min(2000, samples - chunk)
        w = theta + torch.exp(0.5 * la) * theta.abs() * torch.randn(n, *theta.shape, generator=g, dtype=D)
        # stack the draws as extra output channels: one op call evaluates all of them
        y = op(x, w.reshape(n * theta.shape[0], *theta.shape[1:]), None)
        y = y.reshape(y.shape[0], n, theta.shape[0], *y.shape[2:]) + bias.reshape(1, 1, -1, *([1] * (y.dim() - 2)))
        outs.append(y)
    y = torch.cat(outs, 1)
    return y.mean(1), y.var(1)


@pytest.mark.parametrize("nd", [0, 1, 2, 3], ids=["linear", "conv1d", "conv2d", "conv3d"])
def test_local_reparam_moments_match_weight_sampling(nd):
    g = torch.Generator().manual_seed(2)
    x, theta, op = _layer_inputs(nd, g, 3, stride=2, padding=1, dilation=1)
    la = torch.empty_like(theta).uniform_(-2, 1, generator=g)
    bias = torch.randn(3, generator=g, dtype=D)
    S = 40_000
    mean_mc, var_mc = _weight_sampled_moments(x, theta, la, bias, op, S)
    mean, var = BF.local_reparam_moments(x, theta, la, bias, op)
    assert ((mean_mc - mean).abs() <= 5 * (var / S).sqrt()).all()
    torch.testing.assert_close(var_mc, var, rtol=0.06, atol=1e-6)
    # the sampled pre-activations of the trick itself have the same moments
    lrt = torch.stack([BF.local_reparam(x, theta, la, bias, op) for _ in range(4000)])
    assert ((lrt.mean(0) - mean).abs() <= 5 * (var / 4000).sqrt()).all()
    torch.testing.assert_close(lrt.var(0), var, rtol=0.2, atol=1e-6)


def test_conv_nd_rejects_bad_rank():
    with pytest.raises(ValueError, match="1-3 spatial dims"):
        BF.conv_nd(torch.randn(1, 1, 2, 2, 2, 2), torch.randn(1, 1, 1, 1, 1, 1))


def test_fused_vd_weight_stats_equal_the_composed_formulas_value_and_gradient():
    torch.manual_seed(0)
    theta = (torch.randn(9, 6, dtype=torch.float64) * 0.5).requires_grad_()
    log_sigma2 = (torch.randn(9, 6, dtype=torch.float64) * 4 - 4).requires_grad_()  # some log alpha clipped
    mask = torch.rand(9, 6) > 0.3
    for m in (None, mask):
        def composed(t, s):
            la = BF.log_alpha(t, s)
            kl = BF.kl_log_uniform(la)
            return torch.exp(la) * t * t, (kl * m.double()).sum() if m is not None else kl.sum()

        def fused(t, s):
            var_w, kl, _ = BF.vd_weight_stats(t, s, m)
            return var_w, kl

        assert torch.autograd.gradcheck(fused, (theta, log_sigma2))
        cot = (torch.randn(9, 6, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64))
        for a, b in zip(composed(theta, log_sigma2), fused(theta, log_sigma2)):
            torch.testing.assert_close(a, b)
        ga = torch.autograd.grad(composed(theta, log_sigma2), (theta, log_sigma2), cot)
        gb = torch.autograd.grad(fused(theta, log_sigma2), (theta, log_sigma2), cot)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b)


@pytest.mark.skipif(not _fusedkernel.available(), reason="no C++ compiler: the ATen formulas serve")
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("with_g_var", [True, False])
def test_cpp_vd_kernel_equals_the_float64_formulas(masked, with_g_var):
    """The float32 C++ kernel against the composed ATen formulas in float64, value and gradient; the weights
    cover zeros (log alpha clipped at +8), tiny and large values, and log sigma^2 clipped at both ends."""
    torch.manual_seed(1)
    theta = torch.randn(257, 129) * 0.1  # odd sizes: vector tails; > one chunk of the kernel's split
    theta[0, :7] = 0.0
    theta[1, :7] = 3.0
    log_sigma2 = torch.empty(257, 129).uniform_(-20.0, 4.0)
    mask = (torch.rand(257, 129) > 0.3).float() if masked else None
    g_var = torch.randn(257, 129) if with_g_var else None
    g_kl = 0.7

    def composed(t, s):
        la = BF.log_alpha(t, s)
        kl = BF.kl_log_uniform(la)
        return torch.exp(la) * t * t, (kl * mask.double()).sum() if masked else kl.sum(), la

    ref_t = theta.double().requires_grad_()
    ref_s = log_sigma2.double().requires_grad_()
    ref_var, ref_kl, ref_la = composed(ref_t, ref_s)
    ref_loss = ref_kl * g_kl + ((ref_var * g_var.double()).sum() if with_g_var else 0.0)
    ref_gt, ref_gs = torch.autograd.grad(ref_loss, (ref_t, ref_s))

    t = theta.clone().requires_grad_()
    s = log_sigma2.clone().requires_grad_()
    assert _fusedkernel.usable(t, s)
    var, kl, la = BF.vd_weight_stats(t, s, mask)
    assert var.grad_fn is not None and type(var.grad_fn).__name__.startswith("_VDWeightStatsCPU")
    loss = kl * g_kl + ((var * g_var).sum() if with_g_var else 0.0)
    gt, gs = torch.autograd.grad(loss, (t, s))
    torch.testing.assert_close(var, ref_var.float(), rtol=2e-5, atol=1e-9)
    torch.testing.assert_close(la, ref_la.float(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(kl.double(), ref_kl, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(gt, ref_gt.float(), rtol=2e-4, atol=1e-3)
    torch.testing.assert_close(gs, ref_gs.float(), rtol=2e-4, atol=1e-6)


@pytest.mark.skipif(not _fusedkernel.available(), reason="no C++ compiler: the ATen formulas serve")
def test_cpp_vd_kernel_propagates_nan_and_inf_as_the_aten_formulas():
    """A non-finite parameter must give a non-finite result (never a silently finite one), as ATen's does."""
    theta = torch.randn(40, 30)
    log_sigma2 = torch.full((40, 30), -6.0)
    theta[0, 0] = float("nan")
    log_sigma2[1, 1] = float("nan")
    log_sigma2[2, 2] = float("inf")
    fused = BF.vd_weight_stats(theta, log_sigma2)
    aten = BF._VDWeightStats.apply(theta, log_sigma2, None, BF.LOG_ALPHA_CLIP)
    for a, b in ((fused[0], aten[0]), (fused[2], aten[2])):
        assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.isinf(a), torch.isinf(b))
    assert torch.isnan(fused[1]) and torch.isnan(aten[1])


@pytest.mark.skipif(not _fusedkernel.available(), reason="no C++ compiler: the ATen formulas serve")
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("with_g_gates", [True, False])
@pytest.mark.parametrize("beta", [BF.HC_BETA, 0.5])  # the kernel's 2/3 shortcut (one exp) and its general form
def test_cpp_hard_concrete_kernel_equals_the_float64_formulas_on_its_noise(masked, with_g_gates, beta):
    """The C++ gates against the composed ATen formulas in float64 fed the same noise (``hc_uniform``), log
    alphas far out in both tails included (where the 2/3 shortcut's exp over- or underflows)."""
    torch.manual_seed(2)
    log_alpha = torch.randn(301, 67) * 3
    log_alpha[0, :8] = torch.tensor([-300.0, -120.0, -60.0, -30.0, 30.0, 60.0, 120.0, 300.0])
    mask = (torch.rand(301, 67) > 0.4).float() if masked else None
    g_gates = torch.randn(301, 67) if with_g_gates else None
    la = log_alpha.clone().requires_grad_()
    torch.manual_seed(5)
    gates, l0 = BF.hard_concrete_gates(la, mask, beta=beta)
    assert type(gates.grad_fn).__name__.startswith("_HardConcreteGatesCPU")
    torch.manual_seed(5)
    u = _fusedkernel.hc_uniform(log_alpha.shape, _fusedkernel.new_seed())
    ref_la = log_alpha.double().requires_grad_()
    ref_gates = BF.hard_concrete_sample(ref_la, u.double(), beta=beta)
    p = BF.hard_concrete_prob_nonzero(ref_la, beta=beta)
    ref_l0 = (p * mask.double()).sum() if masked else p.sum()
    torch.testing.assert_close(gates, ref_gates.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l0.double(), ref_l0, rtol=1e-5, atol=0.0)
    loss = l0 * 0.3 + ((gates * g_gates).sum() if with_g_gates else 0.0)
    ref_loss = ref_l0 * 0.3 + ((ref_gates * g_gates.double()).sum() if with_g_gates else 0.0)
    (grad,) = torch.autograd.grad(loss, la)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_la)
    torch.testing.assert_close(grad, ref_grad.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not _fusedkernel.available(), reason="no C++ compiler: the ATen formulas serve")
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("g_l0", [0.0, 0.3])
@pytest.mark.parametrize("beta", [BF.HC_BETA, 0.9])
def test_cpp_gated_weight_equals_the_float64_formulas_on_its_noise(masked, g_l0, beta):
    """``hard_concrete_weight`` (theta * gates in the gates' pass, both gradients in one backward pass) against
    ``theta * hard_concrete_sample`` and the expected L0 composed in float64 on the same noise."""
    torch.manual_seed(3)
    theta = torch.randn(301, 67)
    theta[0, :5] = 0.0
    log_alpha = torch.randn(301, 67) * 3
    mask = (torch.rand(301, 67) > 0.4).float() if masked else None
    g_w = torch.randn(301, 67)
    t, la = theta.clone().requires_grad_(), log_alpha.clone().requires_grad_()
    torch.manual_seed(7)
    weight, l0 = BF.hard_concrete_weight(t, la, mask, beta=beta)
    assert type(weight.grad_fn).__name__.startswith("_HardConcreteWeightCPU")
    torch.manual_seed(7)
    u = _fusedkernel.hc_uniform(log_alpha.shape, _fusedkernel.new_seed()).double()
    ref_t, ref_la = theta.double().requires_grad_(), log_alpha.double().requires_grad_()
    ref_weight = ref_t * BF.hard_concrete_sample(ref_la, u, beta=beta)
    p = BF.hard_concrete_prob_nonzero(ref_la, beta=beta)
    ref_l0 = (p * mask.double()).sum() if masked else p.sum()
    torch.testing.assert_close(weight, ref_weight.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l0.double(), ref_l0, rtol=1e-5, atol=0.0)
    grads = torch.autograd.grad((weight * g_w).sum() + g_l0 * l0, (t, la), retain_graph=True)
    ref_grads = torch.autograd.grad((ref_weight * g_w.double()).sum() + g_l0 * ref_l0, (ref_t, ref_la),
                                    retain_graph=True)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref.float(), rtol=1e-4, atol=1e-5)
    # only the L0 term carries a gradient: theta's is exactly zero
    g_t, g_la = torch.autograd.grad(l0 * 0.5, (t, la), allow_unused=True, materialize_grads=True)
    assert not g_t.any()
    torch.testing.assert_close(g_la, torch.autograd.grad(0.5 * ref_l0, ref_la)[0].float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kernel", [True, False])
def test_fused_functions_refuse_a_double_backward_instead_of_wrong_second_derivatives(kernel):
    """Hand-written gradients carry no graph: create_graph=True must fail with the fix named (kernel and ATen
    paths alike), and the unfused formulas it names do give differentiable gradients."""
    t, s = torch.randn(5, 4, requires_grad=True), torch.full((5, 4), -3.0, requires_grad=True)
    la = torch.randn(5, 4, requires_grad=True)
    with contextlib.nullcontext() if kernel else _fusedkernel.disabled():
        for fn, wrt in ((lambda: BF.vd_weight_stats(t, s)[1], t), (lambda: BF.hard_concrete_gates(la)[1], la),
                        (lambda: BF.hard_concrete_weight(t, la)[0].pow(2).sum(), la)):
            with pytest.raises(RuntimeError, match=r"double backward .* not supported.*compose the unfused"):
                torch.autograd.grad(fn(), wrt, create_graph=True)
    (g,) = torch.autograd.grad(BF.kl_log_uniform(BF.log_alpha(t, s)).sum(), t, create_graph=True)
    assert g.requires_grad


def test_hard_concrete_weight_equals_theta_times_gates_off_the_kernel():
    """Where the kernel does not apply (float64 here) it is the composition, same noise for the same seed;
    mismatched shapes are refused."""
    theta = torch.randn(6, 4, dtype=torch.float64)
    log_alpha = torch.randn(6, 4, dtype=torch.float64)
    torch.manual_seed(4)
    weight, l0 = BF.hard_concrete_weight(theta, log_alpha)
    torch.manual_seed(4)
    gates, ref_l0 = BF.hard_concrete_gates(log_alpha)
    torch.testing.assert_close(weight, theta * gates)
    torch.testing.assert_close(l0, ref_l0)
    with pytest.raises(ValueError, match="equal shapes"):
        BF.hard_concrete_weight(theta, log_alpha[:3])


@pytest.mark.skipif(not _fusedkernel.available(), reason="no C++ compiler: the ATen formulas serve")
def test_cpp_hard_concrete_noise_is_uniform_reproducible_and_seed_dependent():
    """Moments and a Kolmogorov-Smirnov bound of the hashed noise, the same noise for the same torch seed,
    different noise for the next draw."""
    u = _fusedkernel.hc_uniform(torch.Size([200_000]), 12345).double()
    assert abs(float(u.mean()) - 0.5) < 3e-3 and abs(float(u.var()) - 1 / 12) < 1e-3
    sorted_u, _ = torch.sort(u)
    ks = float((sorted_u - torch.arange(1, u.numel() + 1, dtype=torch.float64) / u.numel()).abs().max())
    assert ks < 1.63 / u.numel() ** 0.5  # the 1% critical value
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.01  # neighbours uncorrelated
    la = torch.zeros(50, 40)
    torch.manual_seed(9)
    a = BF.hard_concrete_gates(la)[0]
    torch.manual_seed(9)
    b = BF.hard_concrete_gates(la)[0]
    c = BF.hard_concrete_gates(la)[0]
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_vd_weight_stats_takes_the_aten_formulas_where_the_kernel_does_not_apply(monkeypatch):
    """float64 (gradcheck), torch.compile tracing and a disabled kernel all take the ATen autograd function."""
    t = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    s = torch.full((4, 3), -5.0, dtype=torch.float64, requires_grad=True)
    assert type(BF.vd_weight_stats(t, s)[0].grad_fn).__name__.startswith("_VDWeightStatsBackward")
    monkeypatch.setattr(_fusedkernel, "usable", lambda *a: False)
    t32 = torch.randn(4, 3, requires_grad=True)
    assert type(BF.vd_weight_stats(t32, s.float())[0].grad_fn).__name__.startswith("_VDWeightStatsBackward")


def test_vd_layer_reuses_the_forward_kl_and_never_serializes_it():
    import copy
    import pickle

    import bayes_sparse as bs

    layer = bs.VDLinear(6, 4)
    with torch.no_grad():
        layer.log_sigma2.uniform_(-6, 0)
    layer(torch.randn(3, 6))
    assert "_reg_cache" in layer.__dict__
    expected = BF.kl_log_uniform(BF.log_alpha(layer.raw_weight, layer.log_sigma2)).sum()
    torch.testing.assert_close(layer.regularizer(), expected)  # from the cache
    assert "_reg_cache" not in layer.__dict__
    torch.testing.assert_close(layer.regularizer(), expected)  # computed afresh
    layer(torch.randn(3, 6))
    with torch.no_grad():
        layer.log_sigma2.add_(1.0)  # the parameters moved: the cached value is stale and not used
    moved = BF.kl_log_uniform(BF.log_alpha(layer.raw_weight, layer.log_sigma2)).sum()
    torch.testing.assert_close(layer.regularizer(), moved)
    layer(torch.randn(3, 6))
    twin = pickle.loads(pickle.dumps(layer))
    assert "_reg_cache" not in twin.__dict__ and "_reg_cache" not in copy.deepcopy(layer).__dict__


def test_fused_hard_concrete_gates_equal_the_composed_formulas():
    torch.manual_seed(1)
    log_alpha = (torch.randn(8, 5, dtype=torch.float64) * 3).requires_grad_()
    u = torch.rand(8, 5, dtype=torch.float64)
    mask = torch.rand(8, 5) > 0.4
    for m in (None, mask):
        def fused(la):
            return BF.hard_concrete_gates(la, m, u)

        def composed(la):
            p = BF.hard_concrete_prob_nonzero(la)
            return BF.hard_concrete_sample(la, u), (p * m.double()).sum() if m is not None else p.sum()

        assert torch.autograd.gradcheck(fused, (log_alpha,))
        cot = (torch.randn(8, 5, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64))
        for a, b in zip(composed(log_alpha), fused(log_alpha)):
            torch.testing.assert_close(a, b)
        for a, b in zip(torch.autograd.grad(composed(log_alpha), log_alpha, cot),
                        torch.autograd.grad(fused(log_alpha), log_alpha, cot)):
            torch.testing.assert_close(a, b)


def test_l1_norm_equals_abs_sum_in_value_gradient_and_second_derivatives():
    """``l1_norm`` against ``abs().sum()``: gradcheck and gradgradcheck in float64 (away from the kink), the
    subgradient 0 at exactly 0, and the same gradient through a weighted sum."""
    torch.manual_seed(0)
    w = torch.randn(7, 5, dtype=torch.float64)
    w = (w + 0.2 * torch.sign(w)).requires_grad_()  # no entry near 0, where abs has its kink
    assert torch.autograd.gradcheck(BF.l1_norm, (w,))
    assert torch.autograd.gradgradcheck(lambda t: BF.l1_norm(t) * t.sum(), (w,))
    v = torch.tensor([2.0, -3.0, 0.0, -0.0, 1e-30], requires_grad=True)
    (g,) = torch.autograd.grad(BF.l1_norm(v) * 2.5, v)
    (ref,) = torch.autograd.grad(v.abs().sum() * 2.5, v)
    assert torch.equal(g, ref) and torch.equal(g, torch.tensor([2.5, -2.5, 0.0, 0.0, 2.5]))
    assert torch.equal(BF.l1_norm(v), v.abs().sum())
