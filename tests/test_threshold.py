"""threshold_: masks by log alpha, densities, warnings for dead layers, bad thresholds."""

import math
import warnings

import pytest
import torch
from torch import nn

import bayes_sparse as bs


def _net():
    net = nn.Sequential(bs.VDLinear(10, 8), nn.ReLU(), nn.Sequential(bs.VDConv1d(1, 3, 3), nn.Flatten()),
                        nn.Linear(18, 2))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, bs.SparseLayer):
                m.log_sigma2.uniform_(-8, 4)
    return net


@pytest.mark.parametrize("t", [None, 0.0, 1.5, 3.0, 8.0])
def test_masks_and_densities_follow_log_alpha(t):
    net = _net()
    expected = {}
    for name, m in net.named_modules():
        if isinstance(m, bs.SparseLayer):
            la = (m.log_sigma2 - torch.log(m.raw_weight**2 + 1e-16)).clamp(-8, 8)
            expected[name] = (la < (3.0 if t is None else t)).float().mean().item()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        densities = bs.threshold_(net) if t is None else bs.threshold_(net, log_alpha=t)
    assert densities.keys() == expected.keys() == {"0", "2.0"}
    for k in expected:
        assert densities[k] == pytest.approx(expected[k])
        assert bool(net.get_submodule(k).mask_fixed)


def test_mask_stays_fixed_when_parameters_move():
    layer = bs.VDLinear(20, 10)
    with torch.no_grad():
        layer.log_sigma2.uniform_(-8, 4)
    d = bs.threshold_(layer)[""]
    with torch.no_grad():
        layer.log_sigma2.fill_(10.0)  # would prune everything by the criterion
    assert layer.density == d


def test_min_density_guard_keeps_the_best_weights_and_warns():
    layer = bs.VDLinear(100, 10)
    with torch.no_grad():
        layer.log_sigma2.fill_(50.0)
        layer.log_sigma2[0, :3] = -50.0  # three weights would survive the criterion
    with pytest.warns(UserWarning, match=r"layer 'VDLinear' \(VDLinear\) would keep 3 of 1000 weights; "
                                         r"min_density=0.01 keeps its 10 best"):
        d = bs.threshold_(layer, min_density=0.01)
    assert d[""] == 0.01 and layer.weight_mask[0, :3].all()


def test_dead_layer_warns_with_its_name_and_exports():
    net = nn.Sequential()
    net.add_module("fc1", bs.VDLinear(4, 4))
    net.add_module("fc2", bs.VDLinear(4, 2))
    with torch.no_grad():
        net.fc2.log_sigma2.fill_(50.0)  # log alpha clipped at 8 everywhere
    with pytest.warns(UserWarning, match="layer 'fc2' .*no weight left"):
        d = bs.threshold_(net, min_density=0)
    assert d["fc2"] == 0.0
    dense = bs.to_dense(net).eval()
    torch.testing.assert_close(dense(torch.randn(3, 4)), net.fc2.bias.expand(3, 2))


@pytest.mark.parametrize("bad,err,msg", [
    (-1.0, ValueError, r"log_alpha must be in \[0.0, inf\], got -1.0"),
    (float("nan"), ValueError, r"log_alpha must be a finite number .* got nan"),
    (float("inf"), ValueError, "got inf"),
    ("3", TypeError, "log_alpha must be a real number, got str"),
    (True, TypeError, "got bool"),
], ids=["negative", "nan", "inf", "str", "bool"])
def test_bad_thresholds(bad, err, msg):
    with pytest.raises(err, match=msg):
        bs.threshold_(_net(), log_alpha=bad)


def test_bad_models():
    with pytest.raises(ValueError, match="Sequential has no sparse layers"):
        bs.threshold_(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        bs.threshold_({"w": torch.ones(2)})
    assert math.isclose(bs.threshold_(bs.VDLinear(3, 3), log_alpha=torch.tensor(3.0))[""], 1.0)
