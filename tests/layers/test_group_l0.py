"""Group L0 (a hard-concrete gate per unit): masks per unit, the group penalty by hand, training removes
units, threshold_/to_dense/save/load agree with the sparse layer, SVI, shrink of the result."""

import math

import pyro
import pyro.infer
import pyro.optim
import pytest
import torch
from torch import nn

import bayes_sparse as bs
from tests.cases import CASE_IDS, LAYER_CASES, TOY_N, toy_data, toy_mlp, train_toy

N = TOY_N


@pytest.mark.parametrize("unit", ["out", "in"])
@pytest.mark.parametrize("case", LAYER_CASES, ids=CASE_IDS)
def test_converted_layer_equals_dense_and_masks_whole_units(case, unit):
    _, dense_cls, suffix, kwargs, shape = case
    torch.manual_seed(0)
    dense = dense_cls(**kwargs).eval()
    layer = getattr(bs, "GroupL0" + suffix).from_dense(dense, unit=unit).eval()
    x = torch.randn(shape)
    torch.testing.assert_close(layer(x), dense(x))
    w = layer.raw_weight
    n_units = w.shape[0] if unit == "out" else w.shape[1] * getattr(layer, "groups", 1)
    assert layer.log_alpha.shape == (n_units,)
    closed = [0, n_units - 1]
    with torch.no_grad():  # close the first and the last unit
        layer.log_alpha[closed] = -10.0
    mask = layer.criterion_mask()
    # by hand: the weights touching the closed units
    expected = torch.ones_like(w, dtype=torch.bool)
    if unit == "out":
        expected[closed] = False
    else:
        g = getattr(layer, "groups", 1)
        in_g, out_g = w.shape[1], w.shape[0] // g
        for j in closed:
            expected[(j // in_g) * out_g:(j // in_g + 1) * out_g, j % in_g] = False
    assert torch.equal(mask, expected)
    bs.threshold_(layer)
    y = layer(x)
    twin = bs.to_dense(layer).eval()
    torch.testing.assert_close(twin(x), y)
    if unit == "out":  # a removed unit outputs exactly 0, bias included
        assert (y.movedim(-1 if dense_cls is nn.Linear else 1, 0)[closed] == 0).all()
        if twin.bias is not None:
            assert (twin.bias[closed] == 0).all()
    layer.train()
    assert layer(x).shape == y.shape


@pytest.mark.parametrize("unit", ["out", "in"])
def test_penalty_is_the_group_expected_l0_by_hand(unit):
    layer = bs.GroupL0Conv2d(4, 6, 3, groups=2, unit=unit, penalty=0.3)
    with torch.no_grad():
        layer.log_alpha.copy_(torch.linspace(-3, 3, layer.log_alpha.numel()))
    la = layer.log_alpha.detach().double()
    p = 1 / (1 + torch.exp(-(la - (2 / 3) * math.log(0.1 / 1.1))))  # P(gate != 0), Louizos et al. Eq. 12
    size = 2 * 9 if unit == "out" else 3 * 9  # weights per unit: 2 inputs x 3x3, or 3 outputs x 3x3
    assert float(layer.regularizer()) == pytest.approx(float(0.3 * size * p.sum()), rel=1e-5)
    # once thresholded, only the kept weights of each group count
    mask = torch.ones_like(layer.weight_mask)
    mask[0, 0] = False  # 9 weights of output unit 0 / input channel 0
    layer.set_mask_(mask)
    kept = torch.full_like(la, float(size))
    kept[0] -= 9
    assert float(layer.regularizer()) == pytest.approx(float(0.3 * (kept * p).sum()), rel=1e-5)
    assert float(bs.penalty(layer)) == pytest.approx(float(layer.regularizer())) and float(bs.kl(layer)) == 0


@pytest.mark.parametrize("unit", ["out", "in"])
def test_gated_weight_decay_by_hand(unit):
    torch.manual_seed(0)
    layer = bs.GroupL0Conv2d(4, 6, 3, groups=2, unit=unit, penalty=0.3, weight_decay=7.0)
    with torch.no_grad():
        layer.log_alpha.copy_(torch.linspace(-3, 3, layer.log_alpha.numel()))
    la = layer.log_alpha.detach().double()
    p = 1 / (1 + torch.exp(-(la - (2 / 3) * math.log(0.1 / 1.1))))
    w = layer.raw_weight.detach().double()
    # by hand, unit by unit: output channel j holds row j; input channel j of group g holds column j % 2 of
    # that group's 3 output rows
    sq = torch.stack([w[j].pow(2).sum() if unit == "out" else w[(j // 2) * 3:(j // 2 + 1) * 3, j % 2].pow(2).sum()
                      for j in range(la.numel())])
    size = 2 * 9 if unit == "out" else 3 * 9
    expected = 0.3 * size * p.sum() + 0.5 * 7.0 * (p * sq).sum()
    assert float(layer.regularizer()) == pytest.approx(float(expected), rel=1e-5)
    # the gradient reaches both the weights (scaled by P(z != 0)) and the gates
    layer.regularizer().backward()
    g_w = layer.raw_weight.grad.double()
    if unit == "out":
        torch.testing.assert_close(g_w[0], 7.0 * p[0] * w[0])
    assert layer.log_alpha.grad.abs().min() > 0
    # once a mask is fixed, removed weights no longer count
    mask = torch.ones_like(layer.weight_mask)
    mask[0] = False
    layer.set_mask_(mask)
    w_kept = w * mask.double()
    sq = torch.stack([w_kept[j].pow(2).sum() if unit == "out"
                      else w_kept[(j // 2) * 3:(j // 2 + 1) * 3, j % 2].pow(2).sum() for j in range(la.numel())])
    sizes = torch.stack([mask[j].sum() if unit == "out" else mask[(j // 2) * 3:(j // 2 + 1) * 3, j % 2].sum()
                         for j in range(la.numel())]).double()
    expected = 0.3 * (sizes * p).sum() + 0.5 * 7.0 * (p * sq).sum()
    assert float(layer.regularizer()) == pytest.approx(float(expected), rel=1e-5)


def test_gated_weight_decay_rejects_bad_values():
    with pytest.raises(ValueError, match="weight_decay"):
        bs.GroupL0Linear(3, 2, weight_decay=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        bs.GroupL0Linear(3, 2, weight_decay=float("nan"))


def test_training_gates_are_per_example_and_unit():
    torch.manual_seed(0)
    layer = bs.GroupL0Linear(5, 3, bias=False)
    with torch.no_grad():
        layer.raw_weight.fill_(1.0)
    out = layer(torch.ones(64, 5))
    gates = out / 5
    assert ((gates >= 0) & (gates <= 1)).all()
    assert len(torch.unique(gates)) > 3  # not one gate per unit for the whole batch
    assert (gates == 0).any() and (gates == 1).any()  # hard concrete: exact 0 and 1


def test_strong_penalty_removes_units_and_exports_agree(tmp_path):
    net = bs.sparsify(toy_mlp(), "group_l0", exclude=["4"], penalty=0.3)
    train_toy(net, 150)
    bs.threshold_(net, min_density=0)
    rep = bs.report(net)
    assert rep.layers[0].units_kept < 32 and rep.layers[1].units_kept < 16
    x, _ = toy_data()
    y = net(x)
    dense = bs.to_dense(net).eval()
    torch.testing.assert_close(dense(x), y)
    plain = toy_mlp().eval()
    plain.load_state_dict(dense.state_dict())
    torch.testing.assert_close(plain(x), y)
    path = tmp_path / "g.safetensors"
    bs.export.save(net, path)
    torch.testing.assert_close(bs.export.load(path)(x), y)
    small = bs.export.shrink(net, x[:4])
    torch.testing.assert_close(small(x), y, rtol=1e-4, atol=1e-5)
    assert small[0].out_features == rep.layers[0].units_kept
    assert small[2].out_features == rep.layers[1].units_kept and small[2].in_features == small[0].out_features


def test_input_gates_on_the_first_layer_remove_input_features():
    net = bs.sparsify(toy_mlp(), "group_l0", include=["0"], unit="in", penalty=0.3)
    train_toy(net, 150)
    bs.threshold_(net, min_density=0)
    alive = net[0].hard_mask().any(dim=0)
    assert alive[:2].all() and alive.sum() < 10  # the informative inputs 0 and 1 stay


def test_svi_path_trains():
    net = bs.sparsify(toy_mlp(), "group_l0", penalty=0.5)
    model = bs.SVIModel(net, num_data=N)
    x, y = toy_data()
    before = net[0].log_alpha.detach().clone()
    svi = pyro.infer.SVI(model, model.guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    losses = [svi.step(x[:64], y[:64]) for _ in range(5)]
    assert all(math.isfinite(v) for v in losses) and not torch.equal(before, net[0].log_alpha)
