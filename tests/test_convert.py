"""sparsify: registry conversion of arbitrary and torchvision models, restore, checkpoints, errors."""

import copy
import io
import pickle

import pyro
import pyro.infer
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import bayes_sparse as bs


class Zoo(nn.Module):
    """Every supported layer type and geometry, nested, with a residual addition and BatchNorm."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"), nn.ReLU(),
                                   nn.Conv2d(8, 8, 1, dilation=1))
        self.c1 = nn.Conv1d(8, 4, 3, padding=2, dilation=2, padding_mode="circular")
        self.c3 = nn.Conv3d(1, 2, (1, 3, 3), padding=(0, 1, 1))
        self.head = nn.ModuleDict({"fc": nn.Linear(4 * 8 + 2 * 8 * 8, 5)})

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        h = h + self.block(h)  # residual
        a = self.c1(h.mean(-1))  # (B, 4, 8)
        b = self.c3(h[:, :1].unsqueeze(1))  # (B, 2, 1, 8, 8)
        return self.head["fc"](torch.cat([a.flatten(1), b.flatten(1)], 1))


def _tree(model):
    return [(n, type(m)) for n, m in model.named_modules()]


def test_converted_model_matches_original_and_restores_exactly():
    orig = Zoo().eval()
    x = torch.randn(2, 3, 16, 16)
    sp = bs.sparsify(orig)
    assert all(not isinstance(m, bs.SparseLayer) for m in orig.modules())  # not in place by default
    kinds = {type(m).__name__ for m in sp.modules() if isinstance(m, bs.SparseLayer)}
    assert kinds == {"VDConv1d", "VDConv2d", "VDConv3d", "VDLinear"}
    torch.testing.assert_close(sp.eval()(x), orig(x), rtol=1e-6, atol=1e-6)
    rep = bs.conversion_report(sp)
    assert len(rep.converted) == 6 and rep.kept == (("bn", "BatchNorm2d", "no conversion registered"),)
    assert "stem: Conv2d -> VDConv2d" in str(rep) and rep.to_dict()["kept"][0]["type"] == "BatchNorm2d"
    bs.threshold_(sp)
    back = bs.to_dense(sp)
    assert _tree(back) == _tree(orig)
    torch.testing.assert_close(back.eval()(x), orig(x), rtol=1e-6, atol=1e-6)  # nothing was pruned yet


def test_include_exclude_by_type_name_and_pattern():
    orig = Zoo()
    sparse_names = lambda m: sorted(n for n, l in m.named_modules() if isinstance(l, bs.SparseLayer))  # noqa: E731
    assert sparse_names(bs.sparsify(orig, include=[nn.Conv2d])) == ["block.0", "block.2", "stem"]
    assert sparse_names(bs.sparsify(orig, include=["block"])) == ["block.0", "block.2"]
    assert sparse_names(bs.sparsify(orig, include=["c?", "head.*"])) == ["c1", "c3", "head.fc"]
    assert sparse_names(bs.sparsify(orig, exclude=["stem", "head"])) == ["block.0", "block.2", "c1", "c3"]
    assert sparse_names(bs.sparsify(orig, include=[nn.Conv2d], exclude=["block.*"])) == ["stem"]
    same = bs.sparsify(orig, include="c1", inplace=True)
    assert same is orig and isinstance(orig.c1, bs.VDConv1d)


def test_user_registered_type():
    class MyLinear(nn.Linear):
        pass

    net = nn.Sequential(MyLinear(3, 4), nn.Linear(4, 2))
    assert isinstance(bs.sparsify(net)[0], MyLinear)  # exact-type registry: left alone by default
    bs.register("vd", MyLinear, bs.VDLinear)
    try:
        sp = bs.sparsify(net)
        assert isinstance(sp[0], bs.VDLinear)
        bs.threshold_(sp)
        assert type(bs.to_dense(sp)[0]) is MyLinear
    finally:
        bs.convert._REGISTRY["vd"].pop(MyLinear)


def test_method_options_reach_the_layers():
    sp = bs.sparsify(nn.Sequential(nn.Linear(3, 4)), init_log_sigma2=-12.0, init_log_alpha_max=None)
    assert torch.all(sp[0].log_sigma2 == -12.0)


def _step_both_ways(model, x, y, n=100):
    """One plain-loop step and one SVI step; returns the two losses."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    loss = F.cross_entropy(model(x), y) + bs.kl(model) / n
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is not None for n_, p in model.named_parameters() if "log_sigma2" in n_)
    opt.step()
    pyro.clear_param_store()
    svi_model = bs.SVIModel(model, num_data=n)
    svi = pyro.infer.SVI(svi_model, svi_model.guide, pyro.optim.Adam({"lr": 1e-4}), pyro.infer.Trace_ELBO())
    return loss.item(), svi.step(x, y)


TORCHVISION = [
    ("resnet18", {}),
    ("mobilenet_v2", {}),
    # the two 4096-wide classifier layers (119M weights) stay dense to keep the test fast; every conv and the
    # last classifier layer are converted
    ("vgg11_bn", {"exclude": ["classifier.0", "classifier.3"]}),
]


METHODS = ["vd", "l0", "ltp", "l1", "magnitude"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,kw", TORCHVISION, ids=[t[0] for t in TORCHVISION])
def test_torchvision_networks(name, kw, method):
    orig = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
    # 64x64 and a batch of 4 keep the last BatchNorms (2x2 maps) away from near-zero batch variances
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([1, 7, 0, 3])
    sp = bs.sparsify(orig, method=method, **kw)
    n_sparse = sum(isinstance(m, bs.SparseLayer) for m in sp.modules())
    assert n_sparse == sum(type(m) in (nn.Linear, nn.Conv2d) for m in orig.modules()) - len(kw.get("exclude", []))
    torch.testing.assert_close(sp.eval()(x), orig(x), rtol=1e-5, atol=1e-5)
    plain_loss, svi_loss = _step_both_ways(sp, x, y)
    assert torch.isfinite(torch.tensor([plain_loss, svi_loss])).all()
    densities = bs.threshold_(sp, sparsity=0.7)
    assert all(d == pytest.approx(0.3, abs=0.01) for d in densities.values())
    back = bs.to_dense(sp)
    assert _tree(back) == _tree(orig)
    fresh = getattr(torchvision.models, name)(num_classes=10)
    fresh.load_state_dict(back.state_dict())
    torch.testing.assert_close(fresh.eval()(x), sp.eval()(x), rtol=1e-5, atol=1e-5)
    compiled = bs.export.compile(sp, kernel="csr")  # the sparse-kernel model, BatchNorm and residuals included
    torch.testing.assert_close(compiled(x), sp.eval()(x), rtol=1e-4, atol=1e-4)


def _small():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


@pytest.mark.parametrize("method", METHODS)
def test_deepcopy_pickle_and_state_dict_round_trips(method):
    sp = bs.sparsify(_small(), method=method)
    bs.threshold_(sp, sparsity=0.6)
    x = torch.randn(2, 1, 8, 8)
    ref = sp.eval()(x)
    for clone in (copy.deepcopy(sp), pickle.loads(pickle.dumps(sp))):
        assert torch.equal(clone.eval()(x), ref)
        assert type(bs.to_dense(clone)[0]) is nn.Conv2d
    buf = io.BytesIO()
    torch.save(sp.state_dict(), buf)
    buf.seek(0)
    other = bs.sparsify(_small(), method=method)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(other.eval()(x), ref) and bool(other[0].mask_fixed)


def _run_svi(net, steps, optim_state=None, rng_state=None):  # noqa: D103
    pyro.clear_param_store()
    if rng_state is not None:
        torch.set_rng_state(rng_state)
    model = bs.SVIModel(net, num_data=500)
    optim = pyro.optim.Adam({"lr": 1e-2})
    if optim_state is not None:
        optim.set_state(optim_state)
    svi = pyro.infer.SVI(model, model.guide, optim, pyro.infer.Trace_ELBO())
    for _ in range(steps):
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
        svi.step(x, y)
    return optim


@pytest.mark.parametrize("method", METHODS)
def test_resume_from_checkpoint_equals_uninterrupted_run(method):
    torch.manual_seed(0)
    base = _small()
    uninterrupted = bs.sparsify(base, method=method)
    torch.manual_seed(1)
    _run_svi(uninterrupted, 6)

    first = bs.sparsify(base, method=method)
    torch.manual_seed(1)
    optim = _run_svi(first, 3)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": optim.get_state(), "rng": torch.get_rng_state()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = bs.sparsify(_small(), method=method)
    resumed.load_state_dict(ckpt["model"])
    _run_svi(resumed, 3, optim_state=ckpt["optim"], rng_state=ckpt["rng"])
    for (n, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, n


def test_errors_list_what_was_found_and_supported():
    with pytest.raises(ValueError, match=r"no layer of Sequential can be converted.*found: \['BatchNorm1d'\]; "
                                         r"supported: Linear, Conv1d, Conv2d, Conv3d"):
        bs.sparsify(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match=r"include entry 'feat\*' matches no module of Zoo; module names are: 'stem'"):
        bs.sparsify(Zoo(), include=["feat*"])
    with pytest.raises(ValueError, match="exclude entry 'nothing' matches no module"):
        bs.sparsify(Zoo(), exclude=["nothing"])
    with pytest.raises(TypeError, match=r"method 'vd' has no option\(s\) \['dropout'\]; accepted: "
                                        r"\['init_log_alpha_max', 'init_log_sigma2', 'warmup'\]"):
        bs.sparsify(Zoo(), dropout=0.5)
    with pytest.raises(TypeError, match=r"'bn' \(BatchNorm2d\) was explicitly included but method 'vd' has no "
                                        r"conversion for BatchNorm2d; supported: Linear"):
        bs.sparsify(Zoo(), include=["bn", "stem"])
    with pytest.raises(TypeError, match="explicitly included"):
        bs.sparsify(Zoo(), include=[nn.BatchNorm2d])
    with pytest.raises(ValueError, match="unknown method 'sparse_vd'; known: group_l0, group_vd, l0, l1, ltp, magnitude, vd"):
        bs.sparsify(Zoo(), method="sparse_vd")
    with pytest.raises(TypeError, match="include entries must be module types, names or name patterns, got 3"):
        bs.sparsify(Zoo(), include=[3])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        bs.sparsify("resnet18")


def test_shared_layers_stay_shared():
    lin = nn.Linear(4, 4)
    net = nn.Sequential(lin, nn.ReLU(), lin)
    sp = bs.sparsify(net)
    assert isinstance(sp[0], bs.VDLinear) and sp[0] is sp[2]
    bs.threshold_(sp)
    back = bs.to_dense(sp)
    assert type(back[2]) is nn.Linear and back[0] is back[2]


def test_two_models_built_before_training_do_not_share_parameters():
    pyro.clear_param_store()
    a, b = bs.sparsify(_small()), bs.sparsify(_small())
    ma, mb = bs.SVIModel(a, 10), bs.SVIModel(b, 10)
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    ma(x, y)
    mb(x, y)  # no collision: each SVIModel's own tensors win over Pyro's global store
    assert dict(pyro.get_param_store().named_parameters())["net$$$0.weight"] is b[0].raw_weight
    assert a[0].raw_weight is not b[0].raw_weight
