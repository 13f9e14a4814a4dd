"""A sixth method defined here, registered with one call, runs through every consumer of the protocol.

Nothing in the package knows this method: sparsify, both training paths (plain loop with the schedule
hooks, and Pyro SVI), threshold_ (its criterion with a threshold, per-layer and global sparsity),
to_dense, report, export.save/load, export.compile, pickling and the state_dict.
"""

import copy
import pickle

import pyro
import pyro.infer
import pyro.optim
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayes_sparse as bs
from bayes_sparse._validation import check_number
from bayes_sparse.layers import COMMON_OPTIONS


class Saliency(bs.SparseLayer):
    """SNIP-like toy method: keep-score |w| * running |grad|, a small weight-decay penalty, hooks that count."""

    method = "toy_saliency"
    criterion_in_eval = False  # evaluates unpruned until thresholded, like magnitude pruning
    threshold_name = "saliency"
    threshold_low = 0.0
    options = {**COMMON_OPTIONS,
               "strength": bs.Option(0.01, lambda v, n: check_number(v, n, low=0.0), "penalty strength, 1/N"),
               "momentum": bs.Option(0.9, lambda v, n: check_number(v, n, low=0.0, high=1.0), "EMA of |grad|")}
    state_attributes = ("epochs_seen", "steps_seen")

    def init_parameters(self):
        if "saliency" not in self._buffers:
            self.register_buffer("saliency", torch.ones_like(self.raw_weight))
        self.epochs_seen = 0
        self.steps_seen = 0

    def keep_score(self):
        return self.raw_weight.abs() * self.saliency

    def criterion_mask(self, threshold=None):
        return self.keep_score() > self.check_threshold(threshold, 1e-3)

    def regularizer(self):
        return self.strength * self._masked_sum(self.raw_weight.square())

    def on_epoch_start(self, epoch, epochs):
        super().on_epoch_start(epoch, epochs)
        self.epochs_seen += 1

    def after_step(self, lr, num_data):
        self.steps_seen += 1
        g = self.raw_weight.grad
        if g is not None:
            with torch.no_grad():
                self.saliency.mul_(self.momentum).add_((1 - self.momentum) * g.abs())


N = 256


@pytest.fixture(autouse=True, scope="module")
def _registered():
    bs.register_method(Saliency)  # the one call that plugs the method into every consumer
    yield
    bs.convert.unregister_method("toy_saliency")


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 1, 6, 6, generator=g)
    y = (x.flatten(1)[:, :4].sum(1) > 0).long() + (x.flatten(1)[:, 4:8].sum(1) > 1).long()
    return x, y


def _dense():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(144, 32), nn.ReLU(),
                         nn.Linear(32, 3))


def test_registered_by_one_call_and_converted():
    assert "toy_saliency" in bs.methods() and bs.method_class("toy_saliency") is Saliency
    dense = _dense().eval()
    net = bs.sparsify(dense, method="toy_saliency", strength=0.02).eval()
    assert isinstance(net[0], Saliency) and isinstance(net[0], nn.Conv2d) and type(net[0]).__name__ == "SaliencyConv2d"
    assert type(net[3]) is Saliency[nn.Linear] is bs.sparse_class(Saliency, nn.Linear)
    assert net[3].strength == 0.02
    x, _ = _data()
    torch.testing.assert_close(net(x), dense(x))
    assert {r[0] for r in bs.conversion_report(net).converted} == {"0", "3", "5"}


def test_bad_options_and_thresholds_name_the_method():
    with pytest.raises(TypeError, match=r"method 'toy_saliency' has no option\(s\) \['bogus'\]; accepted: "
                                        r"\['momentum', 'strength', 'warmup'\]"):
        bs.sparsify(_dense(), method="toy_saliency", bogus=1)
    with pytest.raises(ValueError, match=r"momentum must be in \[0.0, 1.0\], got 2.0"):
        bs.sparsify(_dense(), method="toy_saliency", momentum=2.0)
    net = bs.sparsify(_dense(), method="toy_saliency")
    with pytest.raises(ValueError, match=r"threshold \(saliency\) of method 'toy_saliency' must be in \[0.0, inf\]"):
        bs.threshold_(net, -1.0)
    with pytest.raises(ValueError, match="method 'l0' prunes by its own learned criterion and takes no threshold"):
        bs.threshold_(bs.sparsify(_dense(), method="l0"), 0.5)


def test_a_hook_that_raises_is_named():
    class Broken(Saliency):
        method = "toy_broken"

        def on_epoch_start(self, epoch, epochs):
            raise KeyError("boom")

    net = nn.Sequential(Broken[nn.Linear](3, 2))
    with pytest.raises(RuntimeError, match=r"the on_epoch_start hook of method 'toy_broken' failed on layer '0' "
                                           r"\(BrokenLinear\): KeyError"):
        bs.on_epoch_start(net, 0, 3)


def _train_plain(net, epochs=3, lr=1e-2):
    x, y = _data()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for epoch in range(epochs):
        bs.on_epoch_start(net, epoch, epochs)
        net.train()
        for i in range(0, N, 64):
            loss = F.cross_entropy(net(x[i:i + 64]), y[i:i + 64]) + bs.regularizer(net) / N
            opt.zero_grad()
            loss.backward()
            opt.step()
            bs.after_step(net, lr, N)
            losses.append(loss.item())
    return losses


def test_plain_loop_runs_the_hooks_and_learns():
    net = bs.sparsify(_dense(), method="toy_saliency")
    losses = _train_plain(net)
    assert sum(losses[-4:]) < sum(losses[:4])
    for _, layer in bs.sparse_layers(net):
        assert layer.epochs_seen == 3 and layer.steps_seen == 12
        assert not torch.equal(layer.saliency, torch.ones_like(layer.saliency))


def test_svi_path_trains_and_its_loss_is_the_objective_by_hand():
    net = bs.sparsify(_dense(), method="toy_saliency", strength=0.5)
    model = bs.SVIModel(net, num_data=N)
    x, y = _data()
    xb, yb = x[:32], y[:32]
    loss = pyro.infer.Trace_ELBO().loss(model, model.guide, xb, yb)
    with torch.no_grad():
        by_hand = N / 32 * F.cross_entropy(net(xb), yb, reduction="sum") + bs.regularizer(net)
    assert loss == pytest.approx(float(by_hand), rel=1e-5)
    before = [p.detach().clone() for p in net.parameters()]
    svi = pyro.infer.SVI(model, model.guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    for _ in range(3):
        svi.step(xb, yb)
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_threshold_to_dense_report_files_and_kernels(tmp_path):
    dense_arch = _dense()
    net = bs.sparsify(dense_arch, method="toy_saliency")
    _train_plain(net, epochs=2)
    # the method's criterion with a threshold
    scores = {n: layer.keep_score().detach().clone() for n, layer in bs.sparse_layers(net)}
    t = float(torch.cat([s.flatten() for s in scores.values()]).median())
    d = bs.threshold_(net, t, min_density=0)
    for name, layer in bs.sparse_layers(net):
        assert torch.equal(layer.weight_mask, scores[name] > t)
        assert d[name] == pytest.approx(float((scores[name] > t).float().mean()))
    # per-layer and global target sparsity (masks only prune more)
    layer_net = copy.deepcopy(net)
    bs.threshold_(layer_net, sparsity=0.8)
    assert all(abs(layer.density - 0.2) < 0.02 for _, layer in bs.sparse_layers(layer_net))
    global_net = bs.sparsify(_dense(), method="toy_saliency")
    bs.threshold_(global_net, sparsity=0.9, scope="global")
    assert bs.report(global_net).density == pytest.approx(0.1, abs=2e-3)

    net.eval()
    x, _ = _data()
    expected = net(x)
    exported = bs.to_dense(net)
    assert not any(isinstance(m, bs.SparseLayer) for m in exported.modules())
    fresh = _dense()
    fresh.load_state_dict(exported.state_dict())
    torch.testing.assert_close(fresh.eval()(x), expected)
    assert bs.report(net).nonzero == bs.report(fresh).nonzero < bs.report(fresh).weights
    # every reader of .weight sees the masked weight
    torch.testing.assert_close(F.linear(torch.relu(net[3](net[2](net[1](net[0](x))))), net[5].weight, net[5].bias),
                               expected)

    path = tmp_path / "toy.safetensors"
    bs.export.save(net, path)
    torch.testing.assert_close(bs.export.load(path)(x), expected)
    compiled = bs.export.compile(net, kernel="csr", max_density=1.0)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-5)


def test_pickle_state_dict_and_method_mismatch():
    net = bs.sparsify(_dense(), method="toy_saliency", strength=0.3)
    _train_plain(net, epochs=1)
    bs.threshold_(net, sparsity=0.5)
    twin = pickle.loads(pickle.dumps(net))
    assert type(twin[0]) is Saliency[nn.Conv2d] and twin[0].mask_fixed and twin[0].strength == 0.3
    x, _ = _data()
    torch.testing.assert_close(twin.eval()(x), net.eval()(x))
    other = bs.sparsify(_dense(), method="toy_saliency")
    other.load_state_dict(net.state_dict())
    assert other[3].mask_fixed and other[3].strength == 0.3 and other[3].steps_seen == net[3].steps_seen
    torch.testing.assert_close(other.eval()(x), net(x))
    with pytest.raises(RuntimeError, match="holds a 'toy_saliency' layer, but VDConv2d is method 'vd'"):
        bs.sparsify(_dense(), method="vd").load_state_dict(net.state_dict(), strict=False)
