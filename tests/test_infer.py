"""Pyro SVI path: the loss is the negative ELBO, gradients match the plain loop, Predictive behaves."""

import copy
import math
import pickle

import pyro
import pyro.infer
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayes_sparse as bs
from bayes_sparse.infer import flat_then_linear_decay, kl_warmup_weight


def _classifier():
    return nn.Sequential(bs.VDLinear(5, 8), nn.ReLU(), bs.VDConv1d(1, 2, 3, padding=1), nn.Flatten(),
                         bs.VDLinear(16, 3))


class _Unsqueeze(nn.Module):
    def forward(self, x):
        return x.unsqueeze(1)


def _net():
    net = _classifier()
    net.insert(2, _Unsqueeze())  # (B, 8) -> (B, 1, 8) for the conv
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, bs.SparseLayer):
                layer.log_sigma2.uniform_(-4, 0)  # visible noise, so a seed mismatch would show
    return net


def test_svi_loss_equals_negative_elbo_by_hand():
    N, B = 1000, 20
    net = _net()
    x, y = torch.randn(B, 5), torch.randint(0, 3, (B,))
    model = bs.SVIModel(net, num_data=N)
    model.kl_weight = 0.7
    pyro.set_rng_seed(42)
    loss = pyro.infer.Trace_ELBO().loss(model, model.guide, x, y)
    torch.manual_seed(42)
    with torch.no_grad():
        nll = F.cross_entropy(net(x), y, reduction="sum")
        kl = sum(bs.functional.kl_log_uniform(m.log_alpha).sum() for m in net if isinstance(m, bs.SparseLayer))
    assert loss == pytest.approx(float(N / B * nll + 0.7 * kl), rel=1e-5)
    # and the same seed gives the same loss through SVI.evaluate_loss
    svi = pyro.infer.SVI(model, model.guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO())
    pyro.set_rng_seed(42)
    assert svi.evaluate_loss(x, y) == pytest.approx(loss, rel=1e-6)


def test_gaussian_likelihood_loss_by_hand():
    N, B = 500, 10
    net = nn.Sequential(bs.VDLinear(3, 4), nn.Tanh(), bs.VDLinear(4, 2))
    x, y = torch.randn(B, 3), torch.randn(B, 2)
    model = bs.SVIModel(net, num_data=N, likelihood="gaussian", obs_scale=0.5)
    pyro.set_rng_seed(1)
    loss = pyro.infer.Trace_ELBO().loss(model, model.guide, x, y)
    torch.manual_seed(1)
    with torch.no_grad():
        nll = -torch.distributions.Normal(net(x), 0.5).log_prob(y).sum()
        expected = N / B * nll + bs.kl(net)
    assert loss == pytest.approx(float(expected), rel=1e-5)


def test_svi_and_plain_loop_give_the_same_gradients():
    N, B = 600, 30
    net = _net()
    x, y = torch.randn(B, 5), torch.randint(0, 3, (B,))
    model = bs.SVIModel(net, num_data=N)
    pyro.set_rng_seed(7)
    pyro.infer.Trace_ELBO().loss_and_grads(model, model.guide, x, y)
    svi_grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    torch.manual_seed(7)
    loss = F.cross_entropy(net(x), y) + bs.kl(net) / N  # the plain-loop objective = SVI loss / N
    loss.backward()
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad * N, svi_grads[n], rtol=1e-4, atol=1e-5, msg=n)


class _LooseCategorical(bs.likelihoods.Categorical):  # a subclass that changes check_target
    def check_target(self, out, y):
        pass


@pytest.mark.parametrize("own_likelihood", [True, False, "subclass"])
def test_svi_step_validates_the_first_step_and_then_relies_on_its_own_checks(monkeypatch, own_likelihood):
    """Pyro validates the first step; later steps run without it only with the package's likelihoods (whose
    target check runs every step), and give the loss and gradients of a validated step on the same noise."""
    lik = {True: "categorical", "subclass": _LooseCategorical()}.get(
        own_likelihood, lambda out: pyro.distributions.Categorical(logits=out))
    seen = []
    real = bs.infer._svi_loss_and_grads

    def spy(*args, **kwargs):
        seen.append(pyro.infer.util.is_validation_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(bs.infer, "_svi_loss_and_grads", spy)
    net, twin = _net(), _net()
    twin.load_state_dict(net.state_dict())
    x, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    # traced on every step here (direct=False), to see each step's validation; the untraced steps are below
    step = bs.SVIStep(bs.SVIModel(net, num_data=600, likelihood=lik), lr=0.0, direct=False)
    for _ in range(3):
        torch.manual_seed(11)
        loss = step(x, y)
    unvalidated = own_likelihood is True  # a subclass must declare checks_targets itself
    assert seen == [True, not unvalidated, not unvalidated]
    torch.manual_seed(11)
    ref = pyro.infer.Trace_ELBO().loss_and_grads(bs.SVIModel(twin, num_data=600, likelihood=lik),
                                                  lambda *a: None, x, y)
    assert loss == pytest.approx(ref, rel=1e-6)
    if own_likelihood is True:
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
            step(x, torch.full((30,), 5))


def _fit_regression(n, steps=1500, seed=0):
    torch.manual_seed(seed)
    pyro.clear_param_store()
    x = torch.rand(n, 1) * 2 - 1
    y = torch.sin(3 * x) + 0.1 * torch.randn(n, 1)
    net = nn.Sequential(bs.VDLinear(1, 32), nn.Tanh(), bs.VDLinear(32, 1))
    model = bs.SVIModel(net, num_data=n, likelihood="gaussian", obs_scale=0.1)
    svi = pyro.infer.SVI(model, model.guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    b = min(n, 64)
    for _ in range(steps):
        idx = torch.randint(0, n, (b,))
        svi.step(x[idx], y[idx])
    grid = torch.linspace(-1, 1, 21).unsqueeze(1)
    net.train()  # predictive samples need the weight noise
    samples = pyro.infer.Predictive(model, guide=model.guide, num_samples=300, return_sites=["out"])(grid)["out"]
    return samples.squeeze(-1), grid


def test_predictive_spread_shrinks_with_more_data():
    few, grid = _fit_regression(8)
    many, _ = _fit_regression(4000)
    assert few.shape == (300, 21)
    spread_few, spread_many = few.std(0).mean(), many.std(0).mean()
    assert spread_many < 0.6 * spread_few  # seen: 0.40-0.45
    # with many data the predictive mean follows the function
    assert (many.mean(0) - torch.sin(3 * grid.squeeze(1))).abs().mean() < 0.1


def test_fit_svi_trains_and_reports_history():
    torch.manual_seed(0)
    x = torch.randn(400, 6)
    y = (x[:, 0] - x[:, 1] > 0).long()
    net = nn.Sequential(bs.VDLinear(6, 16), nn.ReLU(), bs.VDLinear(16, 2))
    model = bs.SVIModel(net, num_data=400)

    def batches():
        perm = torch.randperm(400)
        return [(x[perm[i:i + 50]], y[perm[i:i + 50]]) for i in range(0, 400, 50)]

    seen = []
    hist = bs.fit_svi(model, batches, epochs=30, lr=1e-2, kl_warmup=(2, 6), progress=False,
                      on_epoch_end=lambda e, s: seen.append(e))
    assert seen == list(range(30)) and len(hist) == 30
    assert [h["kl_weight"] for h in hist[:7]] == [0, 0, 0, 0.25, 0.5, 0.75, 1]
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert bs.error_rate(net, x, y) < 0.1
    with pytest.raises(ValueError, match="yielded no minibatch"):
        bs.fit_svi(model, lambda: [], epochs=1, progress=False)
    with pytest.raises(ValueError, match="epochs must be a positive int, got 0"):
        bs.fit_svi(model, batches, epochs=0)
    with pytest.raises(ValueError, match=r"lr must be in \(0.0, inf\], got -0.1"):
        bs.fit_svi(model, batches, epochs=1, lr=-0.1)


def test_schedules():
    assert [kl_warmup_weight(e) for e in (0, 4, 5, 6, 20, 150)] == [0, 0, 0, pytest.approx(1 / 15), 1, 1]
    f = flat_then_linear_decay(200)
    assert f(0) == f(99) == 1 and f(100) == 1 and f(150) == pytest.approx(0.5) and f(199) == pytest.approx(0.01)


def test_model_input_errors():
    net = nn.Sequential(bs.VDLinear(3, 2))
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'; known: categorical, gaussian"):
        bs.SVIModel(net, 10, likelihood="poisson")
    with pytest.raises(ValueError, match="num_data must be a positive int"):
        bs.SVIModel(net, 0)
    with pytest.raises(TypeError, match="net must be a torch.nn.Module, got str"):
        bs.SVIModel("net", 10)
    with pytest.raises(ValueError, match=r"obs_scale must be a finite number in \(0.0, inf\], got nan"):
        bs.SVIModel(net, 10, likelihood="gaussian", obs_scale=float("nan"))
    model = bs.SVIModel(net, 10)
    with pytest.raises(TypeError, match=r"integer class labels, got y of dtype torch.float32; convert with y.long\(\)"):
        model(torch.randn(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="batch has 11 examples but num_data=10"):
        model(torch.randn(11, 3), torch.zeros(11, dtype=torch.long))
    with pytest.raises(ValueError, match="x has 4 examples but y has 5"):
        model(torch.randn(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="dtype torch.float64 but its weights are torch.float32"):
        model(torch.randn(4, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.long))
    reg = bs.SVIModel(net, 10, likelihood="gaussian")
    with pytest.raises(ValueError, match=r"returns shape \(4, 2\) but y has shape \(4,\)"):
        reg(torch.randn(4, 3), torch.randn(4))
    with pytest.raises(TypeError, match="floating targets"):
        reg(torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.long))


# ----- SVIModel as a PyroModule: parameters, collisions, both training paths ---------------------------------


def _regression_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g) * 2 - 1
    return x, torch.sin(3 * x) + 0.1 * torch.randn(n, 1, generator=g)


def _store_tensors():
    return dict(pyro.get_param_store().named_parameters())  # unconstrained tensors, no weakref attached


def test_parameters_and_learned_obs_scale_are_in_the_state_dict():
    net = nn.Sequential(bs.VDLinear(1, 8), nn.Tanh(), bs.VDLinear(8, 1))
    model = bs.SVIModel(net, num_data=64, likelihood="gaussian")
    assert isinstance(model, pyro.nn.PyroModule) and model.obs_scale == 1.0
    assert "likelihood.log_scale" in model.state_dict() and "net.0.log_sigma2" in model.state_dict()
    assert {id(p) for p in model.parameters()} == {id(p) for p in net.parameters()} | {id(model.likelihood.log_scale)}
    x, y = _regression_data()
    svi = pyro.infer.SVI(model, model.guide, pyro.optim.Adam({"lr": 5e-2}), pyro.infer.Trace_ELBO())
    for _ in range(20):
        svi.step(x, y)
    assert model.obs_scale < 0.5  # the learned scale moved (from 1.0)
    # the store names the module's own tensors, under pyro.module's names
    store = _store_tensors()
    assert store["net$$$0.weight"] is net[0].raw_weight
    assert store["net.likelihood$$$log_scale"] is model.likelihood.log_scale
    # round trip through load_state_dict
    other = bs.SVIModel(nn.Sequential(bs.VDLinear(1, 8), nn.Tanh(), bs.VDLinear(8, 1)), 64, likelihood="gaussian")
    other.load_state_dict(model.state_dict())
    assert other.obs_scale == model.obs_scale
    assert torch.equal(other.net.eval()(x), net.eval()(x))
    fixed = bs.SVIModel(nn.Sequential(bs.VDLinear(1, 1)), 64, likelihood="gaussian", obs_scale=0.3)
    assert fixed.obs_scale == 0.3 and not any("likelihood" in k for k in fixed.state_dict())


def test_two_models_with_the_same_names_each_train_their_own_parameters():
    """Interleaved SVI steps of two same-architecture models (both named "net") give exactly the isolated runs."""
    torch.manual_seed(1)
    net_a = _net()
    torch.manual_seed(2)
    net_b = _net()
    ref_a, ref_b = copy.deepcopy(net_a), copy.deepcopy(net_b)
    xa, ya = torch.randn(20, 5), torch.randint(0, 3, (20,))
    xb, yb = torch.randn(20, 5), torch.randint(0, 3, (20,))

    def svi(net):
        model = bs.SVIModel(net, num_data=100)
        return pyro.infer.SVI(model, model.guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())

    for net, x, y, seed in ((ref_a, xa, ya, 10), (ref_b, xb, yb, 20)):  # isolated runs
        pyro.clear_param_store()
        run = svi(net)
        for i in range(5):
            pyro.set_rng_seed(seed + i)
            run.step(x, y)
    pyro.clear_param_store()
    run_a, run_b = svi(net_a), svi(net_b)
    init_a = copy.deepcopy(net_a.state_dict())
    for i in range(5):  # interleaved, same seeds
        pyro.set_rng_seed(10 + i)
        run_a.step(xa, ya)
        pyro.set_rng_seed(20 + i)
        run_b.step(xb, yb)
    for net, ref in ((net_a, ref_a), (net_b, ref_b)):
        for (name, p), q in zip(net.state_dict().items(), ref.state_dict().values()):
            assert (torch.equal(p, q) if isinstance(p, torch.Tensor) else p == q), name
    assert not torch.equal(net_a[0].raw_weight, init_a["0.weight"])
    assert _store_tensors()["net$$$0.weight"] is net_b[0].raw_weight  # the model that ran last, nothing stale


def test_two_models_with_distinct_names_share_one_param_store():
    a = bs.SVIModel(nn.Sequential(bs.VDLinear(3, 2)), 10, name="a")
    b = bs.SVIModel(nn.Sequential(bs.VDLinear(3, 2)), 10, name="b")
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    a(x, y)
    b(x, y)
    store = _store_tensors()
    assert store["a$$$0.weight"] is a.net[0].raw_weight and store["b$$$0.weight"] is b.net[0].raw_weight


@pytest.mark.parametrize("local_params", [False, True], ids=["global-params", "module-local-params"])
def test_torch_optim_over_the_elbo_module_trains_real_parameters(local_params):
    """Pyro's Lightning recipe: torch.optim over Trace_ELBO()(model, guide).parameters()."""
    with pyro.settings.context(module_local_params=local_params):
        net = nn.Sequential(bs.VDLinear(1, 16), nn.Tanh(), bs.VDLinear(16, 1))
        model = bs.SVIModel(net, num_data=64, likelihood="gaussian")
        elbo = pyro.infer.Trace_ELBO()(model, model.guide)
        params = list(elbo.parameters())
        assert len(params) == 7 and {id(p) for p in params} == {id(p) for p in model.parameters()}
        x, y = _regression_data()
        # the same gradients as Pyro's own loss_and_grads
        pyro.set_rng_seed(3)
        pyro.infer.Trace_ELBO().loss_and_grads(model, model.guide, x, y)
        pyro_grads = [p.grad.clone() for p in params]
        model.zero_grad()
        pyro.set_rng_seed(3)
        elbo(x, y).backward()
        for p, g in zip(params, pyro_grads):
            torch.testing.assert_close(p.grad, g)
        before = [p.detach().clone() for p in params]
        opt = torch.optim.Adam(params, lr=2e-2)
        losses = []
        for _ in range(150):
            opt.zero_grad()
            loss = elbo(x, y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert all(not torch.equal(p, b) for p, b in zip(params, before))  # every parameter trained
        assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
        assert model.obs_scale < 0.7


def test_pickle_and_deepcopy_work_after_svi_steps():
    net = nn.Sequential(bs.VDLinear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), bs.VDLinear(4, 3))
    model = bs.SVIModel(net, num_data=50)
    svi = pyro.infer.SVI(model, model.guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    svi.step(x, y)
    bs.fit_svi(model, lambda: [(x, y)], epochs=2, progress=False)
    assert all("unconstrained" not in p.__dict__ for p in net.parameters())
    for clone in (pickle.loads(pickle.dumps(net)), copy.deepcopy(net)):
        assert torch.equal(clone.eval()(x), net.eval()(x))
    clone = pickle.loads(pickle.dumps(model))
    assert clone.num_data == 50 and torch.equal(clone.net[0].raw_weight, net[0].raw_weight)
    copy.deepcopy(model)


def test_kl_weight_is_a_scale_on_the_regularizer_site():
    N, B = 200, 10
    net = _net()
    model = bs.SVIModel(net, num_data=N)
    x, y = torch.randn(B, 5), torch.randint(0, 3, (B,))
    model.kl_weight = 0.3
    site = pyro.poutine.trace(model).get_trace(x, y).nodes["regularizer"]
    assert site["scale"] == 0.3
    model.kl_weight = 0.0  # warm-up start: the term is masked out
    pyro.set_rng_seed(4)
    loss = pyro.infer.Trace_ELBO().loss(model, model.guide, x, y)
    torch.manual_seed(4)
    with torch.no_grad():
        nll = F.cross_entropy(net(x), y, reduction="sum")
    assert loss == pytest.approx(float(N / B * nll), rel=1e-5)
    with pytest.raises(ValueError, match=r"kl_weight must be in \[0.0, inf\], got -1.0"):
        model.kl_weight = -1.0


def test_frozen_parameters_stay_frozen_and_unnamed():
    net = nn.Sequential(bs.VDLinear(3, 2))
    net[0].bias.requires_grad_(False)
    model = bs.SVIModel(net, 10)
    bias = net[0].bias.detach().clone()
    svi = pyro.infer.SVI(model, model.guide, pyro.optim.Adam({"lr": 1e-1}), pyro.infer.Trace_ELBO())
    svi.step(torch.randn(4, 3), torch.randint(0, 2, (4,)))
    assert not net[0].bias.requires_grad and torch.equal(net[0].bias, bias)
    assert "net$$$0.bias" not in pyro.get_param_store() and "net$$$0.weight" in pyro.get_param_store()


# ----- posterior predictive sampling -----------------------------------------------------------------------


def _bn_net(method):
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3))
    net = bs.sparsify(net, method=method)
    with torch.no_grad():  # running statistics far from the batch statistics, so a BatchNorm update would show
        net[1].running_mean.fill_(0.4)
        net[1].running_var.fill_(3.0)
        if method == "vd":
            for _, layer in bs.sparse_layers(net):
                layer.log_sigma2.fill_(-3.0)  # visible noise
    return net


def _snapshot(module):
    return ({n: b.clone() for n, b in module.named_buffers()}, {n: m.training for n, m in module.named_modules()})


@pytest.mark.parametrize("method", ["vd", "l0", "ltp", "l1", "magnitude"])
@pytest.mark.parametrize("start_mode", ["train", "eval"])
def test_predictive_changes_no_buffer_and_no_mode(method, start_mode):
    net = _bn_net(method)
    model = bs.SVIModel(net, num_data=100)
    model.train(start_mode == "train")
    x = torch.randn(8, 4)
    buffers, modes = _snapshot(model)
    direct = pyro.infer.Predictive(model, guide=model.guide, num_samples=30, return_sites=["out", "obs"])(x)
    samples = model.predictive(x, num_samples=30)
    after_buffers, after_modes = _snapshot(model)
    assert after_modes == modes
    assert buffers.keys() == after_buffers.keys() and len(buffers) >= 5
    for name, b in buffers.items():
        assert torch.equal(b, after_buffers[name]), name  # bit-identical, BatchNorm statistics included
    assert samples["out"].shape == direct["out"].shape == (30, 8, 3) and samples["obs"].shape == (30, 8)
    if method in ("vd", "l0"):  # methods with a posterior: the outputs vary from draw to draw
        assert samples["out"].std(0).min() > 1e-4
    if method in ("ltp", "l1", "magnitude"):  # deterministic training forward, Dropout off: all draws agree
        assert torch.allclose(samples["out"].std(0), torch.zeros(()), atol=1e-6)


def test_predictive_uses_the_running_statistics_and_no_dropout():
    net = _bn_net("vd")
    for _, layer in bs.sparse_layers(net):
        with torch.no_grad():
            layer.log_sigma2.fill_(-30.0)  # the smallest noise (log alpha clipped at -8): a draw ~ the eval output
    model = bs.SVIModel(net, num_data=100).train()
    x = torch.randn(8, 4)
    out = model.predictive(x, num_samples=3, return_sites=["out"])["out"]
    with torch.no_grad():
        expected = copy.deepcopy(net).eval()(x)
        batch_stats = copy.deepcopy(net).train()[:2](x)  # what a BatchNorm in training mode would normalize with
        running = copy.deepcopy(net).eval()[:2](x)
    assert (batch_stats - running).abs().mean() > 0.3  # so the comparison below can tell them apart
    torch.testing.assert_close(out, expected.expand(3, -1, -1), rtol=0, atol=0.02)


def test_sampling_mode_restores_modes_on_error():
    net = nn.Sequential(bs.VDLinear(3, 3), nn.BatchNorm1d(3), nn.Dropout())
    net[1].eval()
    with pytest.raises(KeyError):
        with bs.infer.sampling_mode(net):
            assert [m.training for m in net] == [True, False, False] and not net.training
            raise KeyError("boom")
    assert [m.training for m in net] == [True, False, True] and net.training


# ----- fit_svi: schedule hooks, errors ---------------------------------------------------------------------


class _RecordingVD(bs.VDLinear):
    calls: list = []

    def on_epoch_start(self, epoch, epochs):
        self.calls.append(("epoch", epoch, epochs))

    def after_step(self, lr, num_data):
        self.calls.append(("step", lr, num_data))


def test_fit_svi_runs_the_schedule_hooks_before_the_user_callbacks():
    calls = _RecordingVD.calls = []
    net = nn.Sequential(_RecordingVD(3, 2))
    model = bs.SVIModel(net, num_data=40)
    x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    bs.fit_svi(model, lambda: [(x[:20], y[:20]), (x[20:], y[20:])], epochs=2, lr=0.1, lr_lambda=lambda e: 1 / (e + 1),
               progress=False, on_epoch_start=lambda e: calls.append(("user epoch", e)),
               on_step_end=lambda lr: calls.append(("user step", lr)))
    assert calls == [("epoch", 0, 2), ("user epoch", 0), ("step", 0.1, 40), ("user step", 0.1),
                     ("step", 0.1, 40), ("user step", 0.1),
                     ("epoch", 1, 2), ("user epoch", 1), ("step", 0.05, 40), ("user step", 0.05),
                     ("step", 0.05, 40), ("user step", 0.05)]


def test_empty_minibatch_and_non_finite_loss_give_clear_errors():
    model = bs.SVIModel(nn.Sequential(bs.VDLinear(3, 2)), 10)
    with pytest.raises(ValueError, match=r"the minibatch is empty \(x has shape \(0, 3\)\)"):
        model(torch.randn(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="the minibatch is empty"):
        bs.fit_svi(model, lambda: [(torch.randn(0, 3), torch.zeros(0, dtype=torch.long))], epochs=1, progress=False)
    reg = bs.SVIModel(nn.Sequential(bs.VDLinear(3, 1)), 10, likelihood="gaussian", obs_scale=1.0)
    x, y = torch.randn(4, 3), torch.full((4, 1), 1e30)  # (y - mean)^2 overflows float32
    with pytest.raises(FloatingPointError, match=r"the loss became inf at epoch 0, step 0; lower the learning rate"):
        bs.fit_svi(reg, lambda: [(x, y)], epochs=1, progress=False)
    with pytest.raises(TypeError, match="model must be a bayes_sparse.SVIModel, got Sequential"):
        bs.fit_svi(nn.Sequential(bs.VDLinear(3, 2)), lambda: [], epochs=1)
    with pytest.raises(TypeError, match="net is a PyroModule"):
        bs.SVIModel(pyro.nn.PyroModule[nn.Linear](3, 2), 10)
    with pytest.raises(ValueError, match=r"name must be a non-empty str without '\$\$\$'"):
        bs.SVIModel(nn.Sequential(bs.VDLinear(3, 2)), 10, name="a$$$b")


# --- SVIStep's untraced steps: the same ELBO as Trace_ELBO, step for step -----------------------------------

_DIRECT_METHODS = ["vd", "l0", "ltp", "l1", "magnitude", "group_l0", "group_vd"]


def _small_cnn():
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))


def _twin_steps(method, kl_weights, likelihood="categorical", **model_kw):
    """The same training twice from the same state and seeds: direct=True and direct=False SVISteps."""
    torch.manual_seed(0)
    base = bs.sparsify(_small_cnn(), method)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (40,), generator=g) if likelihood == "categorical" else torch.randn(40, 3, generator=g)
    runs = []
    for direct in (True, False):
        net = copy.deepcopy(base)
        model = bs.SVIModel(net, num_data=400, likelihood=likelihood, **model_kw)
        step = bs.SVIStep(model, lr=1e-2, direct=direct)
        losses, used = [], []
        bs.on_epoch_start(net, 0, 4)
        for i, w in enumerate(kl_weights):
            model.kl_weight = w
            torch.manual_seed(100 + i)
            losses.append(step(x[10 * (i % 4):10 * (i % 4) + 10], y[10 * (i % 4):10 * (i % 4) + 10]))
            bs.after_step(net, step.lr, model.num_data)
            used.append(step.last_step_direct)
        runs.append((losses, used, dict(model.named_parameters())))
    return runs


@pytest.mark.parametrize("method", _DIRECT_METHODS)
def test_untraced_steps_give_trace_elbos_losses_and_parameters(method):
    """After the traced first step, SVIStep evaluates the ELBO without Pyro's tracing; losses and parameters
    match a step traced by Trace_ELBO every time (same seeds), KL weight 0 (masked) included."""
    (loss_d, used_d, params_d), (loss_t, used_t, params_t) = _twin_steps(method, [1.0, 0.5, 0.0, 1.0, 0.2])
    assert used_d == [False, True, True, True, True]
    assert not any(used_t)
    assert loss_d == pytest.approx(loss_t, rel=1e-6, abs=1e-6)
    for name, p in params_t.items():
        torch.testing.assert_close(params_d[name], p, rtol=1e-6, atol=1e-6, msg=name)


def test_untraced_steps_with_a_gaussian_likelihood_and_a_learned_scale():
    (loss_d, used_d, params_d), (loss_t, _, params_t) = _twin_steps(
        "vd", [1.0, 1.0, 1.0], likelihood="gaussian", obs_scale=None)
    assert used_d == [False, True, True]
    assert any("likelihood" in name for name in params_t)  # the learned noise scale trains on both paths
    assert loss_d == pytest.approx(loss_t, rel=1e-6)
    for name, p in params_t.items():
        torch.testing.assert_close(params_d[name], p, rtol=1e-6, atol=1e-6, msg=name)


def test_a_handler_of_the_callers_keeps_the_step_traced():
    """A Pyro handler around the step (here a scale) applies: that step is traced, and its loss is scaled."""
    net = _net()
    x, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    step = bs.SVIStep(bs.SVIModel(net, num_data=600), lr=0.0)
    step(x, y)
    torch.manual_seed(3)
    plain = step(x, y)
    assert step.last_step_direct
    torch.manual_seed(3)
    with pyro.poutine.scale(scale=0.5):
        scaled = step(x, y)
    assert not step.last_step_direct
    assert scaled == pytest.approx(0.5 * plain, rel=1e-6)


class _SampledScale(pyro.nn.PyroModule):  # a Pyro sample site inside the network: not SVIModel's own structure
    def __init__(self):
        super().__init__()
        self.s = pyro.nn.PyroSample(pyro.distributions.LogNormal(0.0, 0.1).expand([3]).to_event(1))

    def forward(self, x):
        return x * self.s


class _OwnModel(bs.SVIModel):  # a subclass with its own forward: its sites are its own business
    def forward(self, x, y=None):
        pyro.sample("extra", pyro.distributions.Normal(0.0, 1.0))
        return super().forward(x, y)


@pytest.mark.parametrize("case", ["pyro_module_inside", "own_forward", "user_likelihood"])
def test_other_structures_stay_traced(case):
    net = _net()
    if case == "pyro_module_inside":
        net.append(_SampledScale())
    cls = _OwnModel if case == "own_forward" else bs.SVIModel
    lik = _LooseCategorical() if case == "user_likelihood" else "categorical"
    step = bs.SVIStep(cls(net, num_data=600, likelihood=lik), lr=1e-3)
    x, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    for _ in range(3):
        step(x, y)
        assert not step.last_step_direct


def test_untraced_steps_are_exact_without_reseeding():
    """No reseeding between steps: the same losses bit for bit, the same parameters and the same generator state
    afterwards (the untraced steps draw exactly the random numbers the traced ones do)."""
    runs = []
    for direct in (True, False):
        torch.manual_seed(0)
        net = bs.sparsify(_small_cnn(), "l0")
        x, y = torch.randn(40, 1, 6, 6), torch.randint(0, 3, (40,))
        step = bs.SVIStep(bs.SVIModel(net, num_data=400), lr=1e-2, direct=direct)
        losses = [step(x[i:i + 10], y[i:i + 10]) for i in range(0, 40, 10)]
        runs.append((losses, [p.detach().clone() for p in net.parameters()], torch.get_rng_state(),
                     step.last_step_direct))
    (l_d, p_d, rng_d, used_d), (l_t, p_t, rng_t, used_t) = runs
    assert used_d and not used_t
    assert l_d == l_t
    assert all(torch.equal(a, b) for a, b in zip(p_d, p_t))
    assert torch.equal(rng_d, rng_t)


def _direct_step(net=None, **kw):
    step = bs.SVIStep(bs.SVIModel(net if net is not None else _net(), num_data=600, **kw), lr=1e-3)
    x, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    step(x, y)
    step(x, y)
    assert step.last_step_direct
    return step, x, y


def test_untraced_steps_still_check_targets_and_batches():
    step, x, y = _direct_step()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        step(x, torch.full((30,), 5))
    with pytest.raises(ValueError, match="num_data must be the full training set size"):
        step(torch.randn(700, 5), torch.randint(0, 3, (700,)))


def test_kl_weight_zero_masks_the_regularizer_out_also_untraced(monkeypatch):
    """At kl_weight 0 the regularizer is masked (Pyro's mask), not multiplied by 0: an infinite one stays out."""
    losses = []
    for direct in (True, False):
        torch.manual_seed(0)
        model = bs.SVIModel(_net(), num_data=600)
        step = bs.SVIStep(model, lr=0.0, direct=direct)
        x, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
        step(x, y)
        model.kl_weight = 0.0
        monkeypatch.setattr(bs.infer, "regularizer", lambda net: torch.tensor(float("inf"), requires_grad=True))
        torch.manual_seed(1)
        losses.append(step(x, y))
        assert step.last_step_direct == direct
        monkeypatch.undo()
    assert math.isfinite(losses[0]) and losses[0] == losses[1]


def test_untraced_steps_keep_the_param_store_naming_the_model():
    step, x, y = _direct_step()
    pyro.clear_param_store()
    step(x, y)
    assert step.last_step_direct
    store = pyro.get_param_store()
    named = {store._params[n] for n in store.keys()}
    assert {id(p) for p in named} == {id(p) for p in step.model.parameters()}


class _CallsParam(nn.Module):  # a plain module with a pyro.param of its own: a param site SVIModel does not own
    def forward(self, x):
        return x * pyro.param("extra_scale", torch.tensor(1.0))


class _OnlyPyroParam(pyro.nn.PyroModule):
    def __init__(self):
        super().__init__()
        self.s = pyro.nn.PyroParam(torch.tensor(1.0), constraint=torch.distributions.constraints.positive)

    def forward(self, x):
        return x * self.s


@pytest.mark.parametrize("extra", [_CallsParam, _OnlyPyroParam])
def test_networks_with_their_own_pyro_params_stay_traced(extra):
    pyro.clear_param_store()
    net = _net()
    net.append(extra())
    step = bs.SVIStep(bs.SVIModel(net, num_data=600), lr=1e-3)
    x, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    for _ in range(3):
        step(x, y)
        assert not step.last_step_direct


def test_hooks_instance_methods_switches_and_later_changes_make_steps_traced():
    step, x, y = _direct_step()
    model = step.model
    handle = model.register_forward_pre_hook(lambda m, args: None)
    step(x, y)
    assert not step.last_step_direct
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: None)
    step(x, y)
    assert not step.last_step_direct
    handle.remove()
    step(x, y)
    assert step.last_step_direct
    step.direct = False
    step(x, y)
    assert not step.last_step_direct
    step.direct = True
    model.net.append(_SampledScale())  # a sample site appears in the network after the first step
    step(x, y)
    assert not step.last_step_direct


def test_the_structure_is_decided_on_the_first_finite_step():
    net = _net()
    step = bs.SVIStep(bs.SVIModel(net, num_data=600), lr=1e-3)
    x, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    saved = copy.deepcopy(net.state_dict())
    with torch.no_grad():
        net[0].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError):
        step(x, y)
    net.load_state_dict(saved)
    step(x, y)
    step(x, y)
    assert step.last_step_direct
