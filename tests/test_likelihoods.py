"""Likelihood objects of SVIModel: built-in ones, user callables and modules, and their errors."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import bayes_sparse as bs
from bayes_sparse.likelihoods import Categorical, Gaussian, Likelihood, as_likelihood


def test_categorical_shapes_and_target_checks():
    lik = Categorical()
    assert lik(torch.zeros(4, 3)).batch_shape == (4,)
    seq = lik(torch.zeros(4, 5, 3))  # per-position labels: the positions belong to the event
    assert seq.batch_shape == (4,) and seq.event_shape == (5,)
    lik.check_target(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer class labels, got y of dtype torch.bool"):
        lik.check_target(torch.zeros(4, 3), torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"logits of shape \(4, 3\) but y has shape \(4, 1\); labels must have "
                                         r"shape \(4,\) \(e.g. y.squeeze\(-1\)\)"):
        lik.check_target(torch.zeros(4, 3), torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits shaped \(batch, ..., classes\), got shape \(4,\)"):
        lik(torch.zeros(4))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\] for a network with 3 logits, got 3 \(1 labels"):
        lik.check_target(torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"got -1 \(2 labels out of range\)"):
        lik.check_target(torch.zeros(4, 3), torch.tensor([-1, 1, -1, 0]))


def test_gaussian_fixed_and_learned_scale():
    fixed = Gaussian(0.5)
    assert not fixed.learned and fixed.scale == 0.5 and list(fixed.parameters()) == []
    d = fixed(torch.zeros(4, 2))
    assert d.batch_shape == (4,) and d.event_shape == (2,) and torch.equal(d.base_dist.scale, torch.full((4, 2), 0.5))
    learned = Gaussian(init_scale=2.0)
    assert learned.learned and float(learned.scale.detach()) == pytest.approx(2.0)
    assert list(learned.state_dict()) == ["log_scale"] and learned.log_scale.requires_grad
    other = Gaussian()
    other.load_state_dict(learned.state_dict())
    assert float(other.scale.detach()) == pytest.approx(2.0)
    assert repr(fixed) == "Gaussian(scale=0.5)" and repr(learned) == "Gaussian(scale=learned)"
    with pytest.raises(ValueError, match=r"init_scale must be in \(0.0, inf\], got 0.0"):
        Gaussian(init_scale=0.0)
    with pytest.raises(ValueError, match=r"obs_scale must be in \(0.0, inf\], got -1.0. Pass None to learn it."):
        Gaussian(-1.0)


def test_as_likelihood_names_and_errors():
    assert isinstance(as_likelihood("categorical"), Categorical)
    assert isinstance(as_likelihood("gaussian"), Gaussian) and as_likelihood("gaussian", 0.2).scale == 0.2
    mod = nn.Linear(1, 1)
    assert as_likelihood(mod) is mod
    wrapped = as_likelihood(lambda out: dist.Normal(out, 1.0).to_event(1))
    assert isinstance(wrapped, Likelihood) and wrapped(torch.zeros(3, 2)).batch_shape == (3,)
    with pytest.raises(ValueError, match="obs_scale=0.1 only applies to likelihood='gaussian', not 'categorical'"):
        as_likelihood("categorical", 0.1)
    with pytest.raises(ValueError, match=r"give the scale to the likelihood object itself"):
        as_likelihood(Gaussian(), 0.1)
    with pytest.raises(TypeError, match="likelihood must be 'categorical', 'gaussian', a Likelihood module or a "
                                        "callable returning a Pyro distribution, got int"):
        as_likelihood(3)


def test_gaussian_string_follows_the_network_dtype():
    net = nn.Sequential(bs.VDLinear(2, 1)).double()
    model = bs.SVIModel(net, 10, likelihood="gaussian")
    assert model.likelihood.log_scale.dtype == torch.float64
    loss = pyro.infer.Trace_ELBO().loss(model, model.guide, torch.randn(3, 2, dtype=torch.float64),
                                        torch.randn(3, 1, dtype=torch.float64))
    assert loss == loss  # finite, no dtype clash


class _StudentT(Likelihood):
    """A user likelihood with a learned parameter of its own."""

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, out):
        return dist.StudentT(4.0, out, self.log_scale.exp()).to_event(1)


def test_user_likelihoods_train_and_are_saved():
    torch.manual_seed(0)
    x = torch.randn(64, 2)
    y = x[:, :1] * 2 + 0.1 * torch.randn(64, 1)
    model = bs.SVIModel(nn.Sequential(bs.VDLinear(2, 1)), 64, likelihood=_StudentT())
    assert "likelihood.log_scale" in model.state_dict()
    svi = pyro.infer.SVI(model, model.guide, pyro.optim.Adam({"lr": 5e-2}), pyro.infer.Trace_ELBO())
    for _ in range(100):
        svi.step(x, y)
    assert float(model.likelihood.log_scale.detach()) < -0.5  # the user's parameter was trained by SVI
    assert "net.likelihood$$$log_scale" in pyro.get_param_store()
    # a plain function works too, and predictive samples come from it
    fn_model = bs.SVIModel(nn.Sequential(bs.VDLinear(2, 1)), 64,
                           likelihood=lambda out: dist.Normal(out, 1e-3).to_event(1))
    obs = fn_model.predictive(x[:5], num_samples=4)["obs"]
    assert obs.shape == (4, 5, 1)


def test_user_likelihood_errors_name_the_fix():
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    bad_shape = bs.SVIModel(nn.Sequential(bs.VDLinear(3, 2)), 10, likelihood=lambda out: dist.Normal(out, 1.0))
    with pytest.raises(ValueError, match=r"batch_shape \(4, 2\) for a minibatch of 4; it must be \(4,\): move the "
                                         r"per-example dimensions into the event with .to_event\(n\)"):
        bad_shape(x, y)
    not_dist = bs.SVIModel(nn.Sequential(bs.VDLinear(3, 2)), 10, likelihood=lambda out: out)
    with pytest.raises(TypeError, match="the likelihood must return a Pyro distribution, got Tensor"):
        not_dist(x, y)
