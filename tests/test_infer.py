"""Pyro SVI path: the loss is the negative ELBO, gradients match the plain loop, Predictive behaves."""

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
