"""Every method family behind the one protocol: shapes, masks, penalties, export, both training paths."""

import math

import pyro
import pyro.infer
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayes_sparse as bs
from bayes_sparse.layers.magnitude import pruning_rounds
from bayes_sparse import functional as BF
from tests.cases import CASE_IDS, LAYER_CASES

METHODS = ["vd", "l0", "ltp", "l1", "magnitude", "group_l0", "group_vd"]
PREFIX = {"vd": "VD", "l0": "L0", "ltp": "LTP", "l1": "L1", "magnitude": "Magnitude", "group_l0": "GroupL0",
          "group_vd": "GroupVD"}


def _cls(method, suffix):
    return getattr(bs, PREFIX[method] + suffix)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", LAYER_CASES, ids=CASE_IDS)
def test_protocol_on_every_layer_type(method, case):
    _, dense_cls, suffix, kwargs, shape = case
    dense = dense_cls(**kwargs)
    layer = _cls(method, suffix).from_dense(dense)
    assert isinstance(layer, dense_cls) and layer.method == method
    x = torch.randn(shape)
    out = layer(x)
    assert isinstance(out, torch.Tensor) and out.shape == dense(x).shape
    assert layer.keep_score().shape == layer.weight.shape
    assert layer.hard_mask().dtype == torch.bool and 0 <= layer.density <= 1
    assert bs.regularizer(layer).shape == ()
    d = bs.threshold_(layer, sparsity=0.5)[""]
    assert d == pytest.approx(0.5, abs=1 / layer.weight.numel())
    twin = bs.to_dense(layer)
    assert type(twin) is dense_cls
    assert torch.equal(twin.eval()(x), layer.eval()(x))


def test_kl_and_penalty_split_over_a_mixed_model():
    net = nn.Sequential(bs.VDLinear(4, 5), bs.L0Linear(5, 5), bs.LTPLinear(5, 5), bs.L1Linear(5, 3),
                        bs.MagnitudeLinear(3, 2))
    kl = BF.kl_log_uniform(net[0].log_alpha).sum()
    pen = (0.1 * BF.hard_concrete_prob_nonzero(net[1].log_alpha).sum()
           + 1e-3 * BF.soft_threshold_mask(net[2].raw_weight, 1e-6 * net[2].raw_weight.pow(2).mean(),
                                            0.25 * net[2].raw_weight.pow(2).mean()).sum()
           + 1.0 * net[3].weight.abs().sum())
    torch.testing.assert_close(bs.kl(net), kl)
    torch.testing.assert_close(bs.penalty(net), pen)
    torch.testing.assert_close(bs.regularizer(net), kl + pen)


def test_l0_gates_and_eval_weights():
    layer = bs.L0Linear.from_dense(nn.Linear(50, 40), droprate_init=0.5)
    with torch.no_grad():
        layer.log_alpha.uniform_(-6, 4)
    torch.manual_seed(0)
    x = torch.ones(1, 50)
    outs = torch.stack([layer(x) for _ in range(3)])
    assert not torch.equal(outs[0], outs[1])  # stochastic gates in training
    gate = BF.hard_concrete_test_gate(layer.log_alpha)
    layer.eval()
    torch.testing.assert_close(layer(x), F.linear(x, layer.raw_weight * gate, layer.bias))
    assert layer.density == pytest.approx((gate > 0).float().mean().item())
    # the penalty is lambda * expected L0 = lambda * sum P(gate != 0)
    torch.testing.assert_close(layer.regularizer(), 0.1 * BF.hard_concrete_prob_nonzero(layer.log_alpha).sum())
    # initialisation: log alpha = log((1 - p) / p)
    assert torch.allclose(bs.L0Linear.from_dense(nn.Linear(3, 3), droprate_init=0.2).log_alpha,
                          torch.tensor(4.0).log())


def test_ltp_soft_mask_threshold_and_temperature():
    layer = bs.LTPLinear.from_dense(nn.Linear(30, 20), temperature=0.5, tau_init=0.3)
    w2 = layer.raw_weight.detach() ** 2
    s2 = w2.mean()
    # the initial threshold is lowered below the smallest squared weight: nothing starts pruned
    torch.testing.assert_close(layer.tau.detach(), 0.5 * w2.min())
    assert layer.criterion_mask().all()
    with torch.no_grad():
        layer.log_tau.fill_(math.log(0.3) / 20)
    torch.testing.assert_close(layer.tau.detach(), 0.3 * s2)
    torch.testing.assert_close(layer.soft_mask(), torch.sigmoid((w2 - 0.3 * s2) / (0.5 * s2)))
    assert torch.equal(layer.criterion_mask(), w2 > layer.tau)
    # lowering the temperature hardens the soft mask towards the step used in eval
    gaps = []
    for t in (0.5, 0.05, 1e-4):
        bs.set_temperature_(layer, t)
        gaps.append((layer.soft_mask() - (w2 > layer.tau).float()).abs().mean().item())
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-2
    assert bs.temperature_schedule(0, 10) == pytest.approx(0.25)
    assert bs.temperature_schedule(9, 10) == pytest.approx(0.0025)
    # tau is learned (through log tau): the soft-L0 penalty pushes it up
    layer.regularizer().backward()
    assert layer.log_tau.grad < 0 and layer.tau > 0


def test_l1_proximal_step_gives_exact_zeros():
    torch.manual_seed(0)
    layer = bs.L1Linear.from_dense(nn.Linear(20, 10), penalty=1.0, proximal=True)
    w0 = layer.weight.detach().clone()
    assert bs.regularizer(layer) == 0  # the proximal step replaces the penalty in the loss
    bs.proximal_step_(layer, lr=0.05, num_data=10)  # threshold 0.05 * 1.0 / 10 = 0.005
    expected = torch.sign(w0) * (w0.abs() - 0.005).clamp(min=0)
    torch.testing.assert_close(layer.weight.detach(), expected)
    assert (layer.weight == 0).sum() == (w0.abs() <= 0.005).sum() > 0
    plain = bs.L1Linear.from_dense(nn.Linear(4, 2), penalty=2.0)
    torch.testing.assert_close(bs.penalty(plain), 2.0 * plain.weight.abs().sum())


def test_l1_penalty_value_and_gradient_with_and_without_a_fixed_mask():
    """The penalty (one reduction while no mask is fixed) is 2 |w|_1 with gradient 2 sign(w); once a mask is
    fixed only the kept weights count, and a weight at exactly 0 gets the subgradient 0."""
    torch.manual_seed(1)
    layer = bs.L1Linear.from_dense(nn.Linear(30, 20), penalty=2.0)
    with torch.no_grad():
        layer.raw_weight[0, :3] = 0.0
    w = layer.raw_weight
    ref = 2.0 * w.detach().double().abs().sum()
    torch.testing.assert_close(bs.penalty(layer).double(), ref, rtol=1e-6, atol=0.0)
    (g,) = torch.autograd.grad(bs.penalty(layer), w)
    assert torch.equal(g, 2.0 * torch.sign(w.detach()))
    keep = w.detach().abs() > 0.05
    layer.set_mask_(keep)
    torch.testing.assert_close(bs.penalty(layer).double(), 2.0 * (w.detach().double().abs() * keep).sum(),
                               rtol=1e-6, atol=0.0)
    (g,) = torch.autograd.grad(bs.penalty(layer), w)
    assert torch.equal(g, 2.0 * torch.sign(w.detach()) * keep)


def test_magnitude_criterion_one_shot_and_global():
    layer = bs.MagnitudeLinear.from_dense(nn.Linear(100, 50), quality=1.0)
    w = layer.weight.detach()
    assert torch.equal(layer.criterion_mask(), w.abs() > w.std())
    net = nn.Sequential(bs.MagnitudeLinear(100, 50), bs.MagnitudeLinear(50, 10))
    with torch.no_grad():
        net[1].weight.mul_(10)  # the second layer's weights are all larger
    d = bs.threshold_(net, sparsity=0.9, scope="global")
    total = 100 * 50 + 50 * 10
    kept = d["0"] * 5000 + d["1"] * 500
    assert kept == pytest.approx(0.1 * total, abs=1)
    assert d["1"] > d["0"]
    all_w = torch.cat([net[0].weight.detach().abs().flatten(), net[1].weight.detach().abs().flatten()])
    cut = all_w.sort(descending=True).values[int(0.1 * total) - 1]
    assert (net[0].weight.abs()[net[0].weight_mask] >= cut).all()


def test_iterative_magnitude_pruning_schedule_and_finetuning():
    torch.manual_seed(0)
    x = torch.randn(200, 20)
    y = (x[:, :2].sum(1) > 0).long()
    net = bs.sparsify(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2)), method="magnitude")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    seen = []

    def finetune(model, step):
        seen.append(step)
        for _ in range(30):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    hist = bs.iterative_magnitude_prune_(net, finetune, final_sparsity=0.9, steps=3)
    assert seen == [1, 2, 3]
    targets = [bs.sparsity_schedule(k, 3, 0.9) for k in (1, 2, 3)]
    assert targets[0] < targets[1] < targets[2] == pytest.approx(0.9)
    for h, t in zip(hist, targets):
        assert h["0"] == pytest.approx(1 - t, abs=1e-3)
    # pruned weights stay pruned from round to round, and the pruned net still fits
    assert bs.report(net).density == pytest.approx(0.1, abs=0.01)
    assert bs.error_rate(net, x, y) < 0.15


def _mlp(method):
    return bs.sparsify(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), method=method)


@pytest.mark.parametrize("method", METHODS)
def test_svi_and_plain_loop_gradients_agree(method):
    N, B = 300, 16
    net = _mlp(method)
    x, y = torch.randn(B, 6), torch.randint(0, 3, (B,))
    model = bs.SVIModel(net, num_data=N)
    pyro.set_rng_seed(5)
    loss = pyro.infer.Trace_ELBO().loss_and_grads(model, model.guide, x, y)
    svi = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    torch.manual_seed(5)
    plain = F.cross_entropy(net(x), y) + bs.regularizer(net) / N
    plain.backward()
    assert loss == pytest.approx(N * plain.item(), rel=1e-5)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad * N, svi[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("method,option,value,err", [
    ("l0", "penalty", -0.1, r"penalty must be in \[0.0, inf\], got -0.1"),
    ("l0", "penalty", float("nan"), "penalty must be a finite number"),
    ("l0", "droprate_init", 1.0, "droprate_init must be in"),
    ("ltp", "temperature", 0.0, r"temperature must be in \(0.0, inf\], got 0.0"),
    ("ltp", "temperature", float("nan"), "temperature must be a finite number"),
    ("ltp", "penalty", -1.0, "penalty must be in"),
    ("l1", "penalty", float("inf"), "penalty must be a finite number"),
    ("l1", "proximal", "yes", "proximal must be True or False"),
    ("magnitude", "quality", -1.0, "quality must be in"),
])
def test_bad_options(method, option, value, err):
    with pytest.raises((ValueError, TypeError), match=err):
        _mlp_kw(method, **{option: value})


def _mlp_kw(method, **kw):
    return bs.sparsify(nn.Sequential(nn.Linear(6, 8)), method=method, **kw)


def test_bad_threshold_arguments():
    net = _mlp("l0")
    for bad in (1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="sparsity must be"):
            bs.threshold_(net, sparsity=bad)
    with pytest.raises(ValueError, match="unknown scope 'model'; known: layer, global"):
        bs.threshold_(net, sparsity=0.5, scope="model")
    with pytest.raises(ValueError, match="not both"):
        bs.threshold_(net, log_alpha=3.0, sparsity=0.5)
    mixed = nn.Sequential(bs.VDLinear(3, 3), bs.L0Linear(3, 3))
    with pytest.raises(ValueError, match=r"mixes \['l0', 'vd'\]. Use scope='layer'"):
        bs.threshold_(mixed, sparsity=0.5, scope="global")
    with pytest.raises(ValueError, match="min_density must be in"):
        bs.threshold_(net, min_density=2.0)
    with pytest.raises(ValueError, match="temperature must be in"):
        bs.set_temperature_(net, -1.0)


def test_l0_mask_never_keeps_a_gated_off_weight():
    layer = bs.L0Linear(10, 10)
    with torch.no_grad():
        layer.log_alpha.fill_(-5.0)  # every test-time gate is exactly 0
        layer.log_alpha[0, :4] = 3.0
    d = bs.threshold_(layer, sparsity=0.5, min_density=0)
    assert d[""] == pytest.approx(0.04)  # only the four open gates can be kept
    assert int((layer.masked_weight() != 0).sum()) == 4
    assert bs.report(layer).nonzero == bs.report(bs.to_dense(layer)).nonzero == 4
    with pytest.raises(ValueError, match="method 'l0' prunes by its own learned criterion and takes no threshold"):
        layer.criterion_mask(0.5)


def test_min_density_guard_never_resurrects_pruned_weights():
    layer = bs.MagnitudeLinear(100, 10)
    bs.threshold_(layer, sparsity=0.999, min_density=0)
    kept = layer.weight_mask.clone()
    assert int(kept.sum()) == 1
    bs.threshold_(layer, sparsity=0.999, min_density=0.01)
    assert torch.equal(layer.weight_mask, kept)


def test_hyperparameters_travel_in_the_state_dict():
    a = bs.sparsify(nn.Sequential(nn.Linear(4, 3)), method="l1", penalty=5.0, proximal=True, prune_below=0.01)
    b = bs.sparsify(nn.Sequential(nn.Linear(4, 3)), method="l1")
    b.load_state_dict(a.state_dict())
    assert (b[0].penalty_strength, b[0].proximal, b[0].prune_below) == (5.0, True, 0.01)
    c = bs.sparsify(nn.Sequential(nn.Linear(4, 3)), method="ltp", temperature=0.1)
    d = bs.sparsify(nn.Sequential(nn.Linear(4, 3)), method="ltp")
    d.load_state_dict(c.state_dict())
    assert d[0].temperature == 0.1


def test_log_alpha_threshold_needs_vd_layers_and_dtype_of_empty_sums():
    with pytest.raises(ValueError, match=r"log_alpha=5.0 applies to methods whose threshold is a log alpha \(Sparse VD\), and this model has \['l1'\]"):
        bs.threshold_(bs.L1Linear(10, 10), log_alpha=5.0)
    assert bs.kl(nn.Linear(2, 2).double()).dtype == torch.float64


def test_global_magnitude_schedule_ranks_all_layers_together():
    """scope='global': each round keeps the schedule's fraction of the largest |w| over both layers, checked
    against a ranking done here by hand; the small classifier keeps a larger share than the per-layer scope."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 3))
    with torch.no_grad():
        dense[2].weight.mul_(4.0)  # the classifier's weights are larger, as after training
    opts = dict(target_sparsity=0.9, rounds=3, prune_start=0.0, prune_end=0.6)
    net = bs.sparsify(dense, method="magnitude", scope="global", **opts)
    per_layer = bs.sparsify(dense, method="magnitude", **opts)
    epochs = 10
    schedule = pruning_rounds(epochs, 0.9, 3, 0.0, 0.6)
    for epoch in range(epochs):
        before = [layer.ranking_score().clone() for _, layer in bs.sparse_layers(net)]
        bs.on_epoch_start(net, epoch, epochs)
        bs.on_epoch_start(per_layer, epoch, epochs)
        if epoch in schedule:
            flat = torch.cat([b.flatten() for b in before])
            keep = flat.numel() - round(schedule[epoch] * flat.numel())
            cut = flat.sort(descending=True).values[keep - 1]
            for (_, layer), b in zip(bs.sparse_layers(net), before):
                assert torch.equal(layer.weight_mask, b >= cut)
        with torch.no_grad():  # training moves the weights between rounds; pruned ones must stay pruned
            for _, layer in bs.sparse_layers(net):
                layer.raw_weight.add_(0.05 * torch.randn_like(layer.raw_weight))
    masks = [layer.weight_mask for _, layer in bs.sparse_layers(net)]
    assert sum(int(m.sum()) for m in masks) == 1290 - round(0.9 * 1290)
    assert masks[1].float().mean() > 0.3 > [l.weight_mask for _, l in bs.sparse_layers(per_layer)][1].float().mean()
    assert bs.threshold_(net)["0"] == pytest.approx(float(masks[0].float().mean()))  # the criterion keeps them


def test_global_magnitude_keeps_a_floor_per_layer_and_refuses_an_unfinished_schedule():
    torch.manual_seed(0)
    net = bs.sparsify(nn.Sequential(nn.Linear(100, 40), nn.ReLU(), nn.Linear(40, 30)), method="magnitude",
                      scope="global", target_sparsity=0.9, rounds=2, prune_start=0.0, prune_end=0.5)
    with torch.no_grad():
        net[2].raw_weight.mul_(1e-4)  # every weight of the second layer ranks below the first layer's
    bs.on_epoch_start(net, 0, 10)  # the first of two rounds
    with pytest.raises(ValueError, match=r"stopped at sparsity 0.7875 before its last round"):
        bs.threshold_(net)
    bs.on_epoch_start(net, 2, 10)
    kept = [int(layer.weight_mask.sum()) for _, layer in bs.sparse_layers(net)]
    assert kept[1] == 2  # ceil(1e-3 * 1200): not cut off whole
    assert kept[0] == 5200 - round(0.9 * 5200)  # the global ranking gave every kept weight to the first layer
    again = bs.sparsify(nn.Sequential(nn.Linear(100, 40), nn.ReLU(), nn.Linear(40, 30)), method="magnitude",
                        scope="global", target_sparsity=0.9, rounds=2, prune_start=0.0, prune_end=0.5)
    again.load_state_dict(net.state_dict())  # the schedule's progress travels with the state_dict
    assert bs.threshold_(again) == bs.threshold_(net)


def test_global_magnitude_refuses_what_it_cannot_rank():
    net = bs.sparsify(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)), method="magnitude",
                      scope="global", target_sparsity=0.5)
    with pytest.raises(ValueError, match="has not pruned yet"):
        bs.threshold_(net)
    net[2].set_options_(target_sparsity=0.8)
    with pytest.raises(RuntimeError, match="must share target_sparsity"):
        bs.on_epoch_start(net, 5, 10)
    with pytest.raises(ValueError, match="scope must be 'layer'"):
        bs.sparsify(nn.Linear(3, 2), method="magnitude", scope="all")


def test_iterative_pruning_rejects_bad_arguments_up_front():
    net = _mlp("magnitude")
    calls = []
    with pytest.raises(ValueError, match=r"final_sparsity must be in \[0, 1\), got 1.0"):
        bs.iterative_magnitude_prune_(net, lambda m, s: calls.append(s), final_sparsity=1.0, steps=2)
    assert calls == []
    with pytest.raises(TypeError, match="finetune must be a callable"):
        bs.iterative_magnitude_prune_(net, None, final_sparsity=0.5, steps=2)
    with pytest.raises(ValueError, match="steps must be a positive int, got 0"):
        bs.sparsity_schedule(0, 0, 0.9)


def test_state_dicts_written_before_the_protocol_still_load():
    """Old checkpoints kept the fixed-mask flag in a bool buffer and VD layers had no extra state."""
    net = _mlp("vd")
    bs.threshold_(net, sparsity=0.5)
    old = {k: v for k, v in net.state_dict().items() if not k.endswith("_extra_state")}
    old["0.mask_fixed"] = torch.tensor(True)
    old["2.mask_fixed"] = torch.tensor(True)
    fresh = _mlp("vd")
    fresh.load_state_dict(old)
    assert fresh[0].mask_fixed and torch.equal(fresh[0].weight_mask, net[0].weight_mask)
    x = torch.randn(4, 6)
    torch.testing.assert_close(fresh.eval()(x), net.eval()(x))


def test_one_methods_state_dict_does_not_load_into_another():
    l1, magnitude = _mlp("l1"), _mlp("magnitude")
    with pytest.raises(RuntimeError, match=r"holds a 'l1' layer, but MagnitudeLinear is method 'magnitude'; load "
                                           r"it into a model sparsified with method='l1'"):
        magnitude.load_state_dict(l1.state_dict())


@pytest.mark.parametrize("method", METHODS)
def test_float16_is_refused_with_the_fix_and_bfloat16_trains(method):
    with pytest.raises(TypeError, match="float16 weights are not supported.*use bfloat16"):
        bs.sparsify(nn.Sequential(nn.Linear(4, 3)).half(), method=method)
    net = _mlp(method)
    with pytest.raises(TypeError, match="float16 weights are not supported"):
        net.half()(torch.randn(2, 6, dtype=torch.float16))
    net = _mlp(method).to(torch.bfloat16)
    loss = net(torch.randn(8, 6, dtype=torch.bfloat16)).float().square().mean() + bs.regularizer(net).float() / 100
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_nan_weights_stop_threshold_naming_the_layer():
    net = _mlp("vd")
    with torch.no_grad():
        net[2].raw_weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"layer '2' \(VDLinear\) has 1 non-finite weight"):
        bs.threshold_(net)


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_loads_with_weights_only(method, tmp_path):
    net = _mlp(method)
    bs.threshold_(net, sparsity=0.3)
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    state = torch.load(tmp_path / "sd.pt", weights_only=True)
    fresh = _mlp(method)
    fresh.load_state_dict(state)
    x = torch.randn(3, 6)
    torch.testing.assert_close(fresh.eval()(x), net.eval()(x))
    assert fresh[0].mask_fixed


@pytest.mark.parametrize("method", METHODS)
def test_pickle_and_torch_save_after_svi_steps(method, tmp_path):
    import pickle

    net = bs.sparsify(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3), nn.Embedding(3, 2)), method=method,
                      include=["0", "2"])
    model = bs.SVIModel(nn.Sequential(*list(net)[:3]), num_data=50)
    svi = pyro.infer.SVI(model, model.guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    svi.step(x, y)
    twin = pickle.loads(pickle.dumps(net))
    torch.save(net, tmp_path / "net.pt")
    loaded = torch.load(tmp_path / "net.pt", weights_only=False)
    for other in (twin, loaded):
        torch.testing.assert_close(other[:3].eval()(x), net[:3].eval()(x))
