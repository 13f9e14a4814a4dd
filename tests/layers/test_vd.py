"""Sparse VD drop-in layers: torch compatibility, noise in training, masks in eval, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayes_sparse as bs
from bayes_sparse import functional as BF
from tests.cases import CASE_IDS, LAYER_CASES


def _vd_class(suffix):
    return getattr(bs, "VD" + suffix)


@pytest.mark.parametrize("case", LAYER_CASES, ids=CASE_IDS)
def test_same_constructor_attributes_and_state_dict_keys(case):
    _, dense_cls, suffix, kwargs, _ = case
    layer, dense = _vd_class(suffix)(**kwargs), dense_cls(**kwargs)
    assert isinstance(layer, dense_cls) and isinstance(layer, bs.SparseLayer)
    for attr in ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride", "padding",
                 "dilation", "groups", "padding_mode"):
        assert getattr(layer, attr, None) == getattr(dense, attr, None), attr
    assert layer.weight.shape == dense.weight.shape
    assert (layer.bias is None) == (dense.bias is None)
    assert set(dense.state_dict()) <= set(layer.state_dict())
    assert torch.all(layer.log_sigma2 == -10.0)


@pytest.mark.parametrize("case", LAYER_CASES, ids=CASE_IDS)
def test_training_is_noisy_eval_is_masked_and_deterministic(case):
    _, dense_cls, suffix, kwargs, shape = case
    layer = _vd_class(suffix)(**kwargs)
    with torch.no_grad():
        layer.log_sigma2.uniform_(-6, 1)  # a spread of log alpha on both sides of 3
    x = torch.randn(shape)
    y1, y2 = layer(x), layer(x)
    assert isinstance(y1, torch.Tensor) and not torch.equal(y1, y2)
    layer.eval()
    keep = (layer.log_sigma2 - torch.log(layer.weight**2 + 1e-16)).clamp(-8, 8) < 3
    assert 0 < keep.float().mean() < 1
    reference = dense_cls(**kwargs)
    with torch.no_grad():
        reference.weight.copy_(layer.weight * keep)
        if layer.bias is not None:
            reference.bias.copy_(layer.bias)
    torch.testing.assert_close(layer(x), reference(x))
    assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("case", LAYER_CASES, ids=CASE_IDS)
def test_from_dense_copies_weights_and_training_mean_matches(case):
    _, dense_cls, suffix, kwargs, shape = case
    dense = dense_cls(**kwargs).double()
    layer = _vd_class(suffix).from_dense(dense)
    assert layer.raw_weight.dtype == torch.float64 and torch.equal(layer.raw_weight, dense.weight)
    assert layer.raw_weight.data_ptr() != dense.weight.data_ptr()
    x = torch.randn(shape, dtype=torch.float64)
    # at log sigma^2 = -10 the noise is tiny: the training output is the dense output up to that noise
    mean, var = BF.local_reparam_moments(x, layer.raw_weight, layer.log_alpha, layer.bias, layer._affine)
    torch.testing.assert_close(mean, dense(x))
    torch.testing.assert_close(layer(x), dense(x), atol=6 * var.sqrt().max().item(), rtol=0)
    # nothing starts pruned: in eval the converted layer computes exactly what the dense one did
    assert torch.equal(layer.eval()(x), dense.eval()(x))
    assert layer.log_alpha.max() <= 0.0 and (layer.log_sigma2 <= -10.0).all()
    # the paper's plain initialisation is available too
    plain = _vd_class(suffix).from_dense(dense, init_log_alpha_max=None)
    assert torch.all(plain.log_sigma2 == -10.0)


def test_from_dense_option_errors():
    with pytest.raises(ValueError, match=r"init_log_alpha_max must be in \[-8.0, 2.999\], got 3.0"):
        bs.VDLinear.from_dense(nn.Linear(2, 2), init_log_alpha_max=3.0)
    with pytest.raises(ValueError, match="init_log_sigma2 must be a finite number"):
        bs.VDLinear.from_dense(nn.Linear(2, 2), init_log_sigma2=float("nan"))


def test_from_dense_errors():
    with pytest.raises(TypeError, match="expects a torch.nn.Linear, got Conv2d"):
        bs.VDLinear.from_dense(nn.Conv2d(1, 2, 3))
    with pytest.raises(TypeError, match="got VDLinear"):
        bs.VDLinear.from_dense(bs.VDLinear(3, 2))
    bad = nn.Linear(4, 3)
    bad.weight = nn.Parameter(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"shape \(3, 5\) but its attributes imply \(3, 4\)"):
        bs.VDLinear.from_dense(bad)
    bad = nn.Conv2d(2, 4, 3)
    bad.bias = nn.Parameter(torch.randn(5))
    with pytest.raises(ValueError, match=r"bias has shape \(5,\)"):
        bs.VDConv2d.from_dense(bad)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float64])
def test_wrong_input_dtype_names_the_fix(dtype):
    layer = bs.VDLinear(4, 2)
    with pytest.raises(TypeError, match=rf"dtype {dtype}.*weights are torch.float32.*x.to\(torch.float32\)"):
        layer(torch.zeros(3, 4, dtype=dtype))
    with pytest.raises(TypeError, match="expects a torch.Tensor input, got list"):
        layer([[0.0] * 4])


def test_fixed_mask_removes_pruned_weights_in_training_and_kl():
    layer = bs.VDLinear(6, 3)
    mask = torch.rand(3, 6) > 0.5
    kl_before = BF.kl_log_uniform(layer.log_alpha)
    layer.set_mask_(mask)
    torch.testing.assert_close(bs.kl(layer), (kl_before * mask).sum())
    x = torch.randn(5, 6)
    torch.manual_seed(1)
    y = layer(x)
    with torch.no_grad():  # pruned weights no longer matter, in training either
        layer.weight[~mask] = 123.0
    torch.manual_seed(1)
    torch.testing.assert_close(layer(x), y)
    assert layer.density == pytest.approx(mask.float().mean().item())
    with pytest.raises(ValueError, match="mask shape"):
        layer.set_mask_(torch.ones(6, 3, dtype=torch.bool))


def test_reset_parameters_restores_log_sigma2():
    layer = bs.VDConv2d(1, 2, 3)
    with torch.no_grad():
        layer.log_sigma2.fill_(0.0)
    layer.reset_parameters()
    assert torch.all(layer.log_sigma2 == -10.0)


def test_sparse_model_trains_in_plain_loop():
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x[:, :3].sum(1) > 0).long()
    net = nn.Sequential(bs.VDLinear(10, 16), nn.ReLU(), bs.VDLinear(16, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(200):
        loss = F.cross_entropy(net(x), y) + bs.kl(net) / x.shape[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert bs.error_rate(net, x, y) < 0.1
