"""Group variational dropout (a Gaussian scale per output unit, log-uniform prior): KL by hand, unit-level
noise, training removes units, threshold_/to_dense/save/load agree, the SVI loss is the ELBO by hand."""

import math

import pyro
import pyro.infer
import pyro.optim
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayes_sparse as bs
from tests.cases import CASE_IDS, LAYER_CASES, TOY_N, toy_data, toy_mlp, train_toy

N = TOY_N
K1, K2, K3 = 0.63576, 1.87320, 1.48695


def _kl_by_hand(la):
    """Molchanov et al. 2017, Eq. 14 (written out independently of functional.kl_log_uniform)."""
    return K1 - K1 / (1 + torch.exp(-(K2 + K3 * la))) + 0.5 * torch.log(1 + torch.exp(-la))


@pytest.mark.parametrize("per_weight", [False, True])
@pytest.mark.parametrize("case", LAYER_CASES, ids=CASE_IDS)
def test_converted_layer_equals_dense_and_threshold_exports_agree(case, per_weight):
    _, dense_cls, suffix, kwargs, shape = case
    torch.manual_seed(0)
    dense = dense_cls(**kwargs).eval()
    layer = getattr(bs, "GroupVD" + suffix).from_dense(dense, per_weight=per_weight).eval()
    x = torch.randn(shape)
    torch.testing.assert_close(layer(x), dense(x))
    assert layer.theta_z.shape == (layer.raw_weight.shape[0],)
    with torch.no_grad():  # unit 0 dropped (log alpha 8), unit 1 scaled by 0.5
        layer.log_sigma2_z[0] = 10.0
        layer.theta_z[1] = 0.5
    assert not layer.criterion_mask()[0].any() and layer.criterion_mask()[1].all()
    bs.threshold_(layer)
    y = layer(x)
    torch.testing.assert_close(bs.to_dense(layer).eval()(x), y)
    unit_axis = -1 if dense_cls is nn.Linear else 1
    assert (y.select(unit_axis, 0) == 0).all()
    w = layer.raw_weight * layer.weight_mask
    ref = F.linear(x, w[1:2], None if layer.bias is None else layer.bias[1:2]) if dense_cls is nn.Linear else None
    if ref is not None:
        torch.testing.assert_close(y[..., 1:2], 0.5 * ref)
    layer.train()
    assert layer(x).shape == y.shape


@pytest.mark.parametrize("per_weight", [False, True])
def test_kl_is_the_sum_of_unit_and_weight_kl_by_hand(per_weight):
    torch.manual_seed(0)
    layer = bs.GroupVDConv2d(3, 5, 3, per_weight=per_weight)
    with torch.no_grad():
        layer.theta_z.uniform_(0.2, 1.5)
        layer.log_sigma2_z.uniform_(-6, 2)
    la_z = (layer.log_sigma2_z - torch.log(layer.theta_z ** 2 + 1e-16)).clamp(-8, 8).detach().double()
    expected = _kl_by_hand(la_z).sum()
    if per_weight:
        w = layer.raw_weight.detach().double()
        la_w = (layer.log_sigma2.detach().double() - torch.log(w * w + 1e-16)).clamp(-8, 8)
        expected = expected + _kl_by_hand(la_w).sum()
    assert float(layer.regularizer()) == pytest.approx(float(expected), rel=1e-5)
    assert float(bs.kl(layer)) == pytest.approx(float(expected), rel=1e-5) and float(bs.penalty(layer)) == 0
    # a thresholded-away unit carries no KL
    mask = torch.ones_like(layer.weight_mask)
    mask[2] = False
    layer.set_mask_(mask)
    keep = torch.ones(5, dtype=torch.float64)
    keep[2] = 0
    expected = (_kl_by_hand(la_z) * keep).sum()
    if per_weight:
        expected = expected + (_kl_by_hand(la_w) * mask).sum()
    assert float(layer.regularizer()) == pytest.approx(float(expected), rel=1e-5)


def test_training_noise_is_one_scale_per_example_and_channel():
    torch.manual_seed(0)
    layer = bs.GroupVDConv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        layer.raw_weight.fill_(1.0)
        layer.log_sigma2_z.fill_(0.0)  # alpha = 1: z ~ N(1, 1)
    out = layer(torch.ones(4000, 1, 3, 3))
    z = out[:, :, 0, 0]
    assert torch.equal(out, z[:, :, None, None].expand_as(out))  # shared over positions
    assert z.mean().item() == pytest.approx(1.0, abs=0.06) and z.std().item() == pytest.approx(1.0, abs=0.06)


@pytest.mark.parametrize("per_weight", [False, True])
def test_training_removes_units_and_exports_agree(tmp_path, per_weight):
    net = bs.sparsify(toy_mlp(), "group_vd", exclude=["4"], per_weight=per_weight)
    train_toy(net, 200, reg_scale=1.0 if per_weight else 10.0)  # the per-weight KL is ~30x larger: no extra push
    bs.threshold_(net, min_density=0)
    rep = bs.report(net)
    assert rep.layers[0].units_kept < 32 and rep.layers[1].units_kept < 16
    x, y_true = toy_data()
    y = net(x)
    assert (y.argmax(1) == y_true).float().mean() > 0.9
    dense = bs.to_dense(net).eval()
    torch.testing.assert_close(dense(x), y)
    path = tmp_path / "g.safetensors"
    bs.export.save(net, path)
    torch.testing.assert_close(bs.export.load(path)(x), y)
    small = bs.export.shrink(net, x[:4])
    torch.testing.assert_close(small(x), y, rtol=1e-4, atol=1e-5)
    assert [small[0].out_features, small[2].out_features] == [rep.layers[0].units_kept, rep.layers[1].units_kept]


def test_svi_loss_is_the_elbo_by_hand_and_trains():
    net = bs.sparsify(toy_mlp(), "group_vd")
    model = bs.SVIModel(net, num_data=N)
    x, y = toy_data()
    xb, yb = x[:32], y[:32]
    pyro.set_rng_seed(1)
    loss = pyro.infer.Trace_ELBO().loss(model, model.guide, xb, yb)
    pyro.set_rng_seed(1)
    with torch.no_grad():
        net.train()
        by_hand = N / 32 * F.cross_entropy(net(xb), yb, reduction="sum") + bs.kl(net)
    assert loss == pytest.approx(float(by_hand), rel=1e-4)
    before = net[0].log_sigma2_z.detach().clone()
    svi = pyro.infer.SVI(model, model.guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    losses = [svi.step(xb, yb) for _ in range(5)]
    assert all(math.isfinite(v) for v in losses) and not torch.equal(before, net[0].log_sigma2_z)
    fit = bs.fit_svi(model, lambda: iter([(xb, yb)]), epochs=2)
    assert fit is not None
