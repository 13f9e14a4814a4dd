"""HardConcrete against its own samples and numerical integration."""

import pytest
import torch
from pyro.distributions import TorchDistribution

from bayes_sparse import functional as BF
from bayes_sparse.distributions import HardConcrete

LOG_ALPHAS = torch.tensor([-3.0, -1.0, 0.0, 1.5, 4.0], dtype=torch.float64)


@pytest.fixture(scope="module")
def samples():
    torch.manual_seed(0)
    return HardConcrete(LOG_ALPHAS).sample((400_000,))


def test_is_a_pyro_distribution_with_constraints():
    d = HardConcrete(torch.zeros(3))
    assert isinstance(d, TorchDistribution) and d.has_rsample
    assert d.support.check(torch.tensor([0.0, 0.5, 1.0])).all() and not d.support.check(torch.tensor(1.2))
    e = d.expand((4, 3))
    assert e.batch_shape == (4, 3) and e.rsample((2,)).shape == (2, 4, 3)
    with pytest.raises(ValueError, match="beta > 0, gamma < 0 < 1 < zeta"):
        HardConcrete(torch.zeros(1), beta=-1.0)
    with pytest.raises(ValueError):
        HardConcrete(torch.zeros(1), validate_args=True).log_prob(torch.tensor([1.5]))


def test_prob_nonzero_matches_sample_frequency(samples):
    d = HardConcrete(LOG_ALPHAS)
    freq = (samples > 0).double().mean(0)
    se = (freq * (1 - freq) / samples.shape[0]).sqrt()
    assert ((freq - d.prob_nonzero).abs() < 5 * se + 1e-4).all()
    assert ((samples == 1).double().mean(0) - d.prob_one).abs().max() < 4e-3
    # the closed form the L0 penalty uses is the same quantity
    torch.testing.assert_close(d.prob_nonzero, BF.hard_concrete_prob_nonzero(LOG_ALPHAS))


@pytest.mark.parametrize("z", [-0.5, 0.0, 0.1, 0.5, 0.9, 0.999, 1.0])
def test_cdf_matches_empirical_cdf(samples, z):
    emp = (samples <= z).double().mean(0)
    cdf = HardConcrete(LOG_ALPHAS).cdf(torch.tensor(z, dtype=torch.float64))
    assert (emp - cdf).abs().max() < 4e-3  # DKW bound at 400k samples, > 99.99%: 3.3e-3


def test_log_prob_integrates_to_one():
    d = HardConcrete(LOG_ALPHAS)
    z = torch.linspace(1e-7, 1 - 1e-7, 400_001, dtype=torch.float64).unsqueeze(1)
    continuous = torch.trapezoid(d.log_prob(z).exp(), z, dim=0)
    atoms = d.log_prob(torch.zeros(1, dtype=torch.float64)).exp() + d.log_prob(torch.ones(1, dtype=torch.float64)).exp()
    torch.testing.assert_close(continuous + atoms, torch.ones(5, dtype=torch.float64), atol=1e-4, rtol=0)


def test_rsample_gradcheck_and_test_gate():
    u = torch.tensor([0.3, 0.4, 0.6, 0.7], dtype=torch.float64)
    la = torch.tensor([0.3, -0.2, 0.1, -0.5], dtype=torch.float64, requires_grad=True)  # samples inside (0, 1)
    assert ((BF.hard_concrete_sample(la, u) > 0) & (BF.hard_concrete_sample(la, u) < 1)).all()
    assert torch.autograd.gradcheck(lambda a: BF.hard_concrete_sample(a, u), (la,))
    assert torch.autograd.gradcheck(BF.hard_concrete_prob_nonzero, (la,))
    g = BF.hard_concrete_test_gate(torch.tensor([-10.0, -2.39, -2.41, 0.0, 10.0]))
    assert g[0] == 0 and g[1] > 0 and g[2] == 0 and g[3] == pytest.approx(0.5) and g[4] == 1


def test_log_prob_at_the_atoms_is_finite_for_extreme_locations():
    d = HardConcrete(torch.tensor([20.0, -20.0]))
    lp0, lp1 = d.log_prob(torch.zeros(2)), d.log_prob(torch.ones(2))
    assert torch.isfinite(lp0).all() and torch.isfinite(lp1).all()
    assert lp0[0] == pytest.approx(-20 + (2 / 3) * torch.tensor(0.1 / 1.1).log().item(), abs=1e-3)  # about -21.6
