"""to_dense: plain torch layers, original state_dict keys, identical outputs."""

import os
import stat

import pytest
import torch
from torch import nn

import bayes_sparse as bs
from tests.cases import CASE_IDS, LAYER_CASES


class Net(nn.Module):
    """A nested architecture built from whichever layer classes it is given."""

    def __init__(self, conv=nn.Conv2d, linear=nn.Linear):
        super().__init__()
        self.features = nn.Sequential(conv(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Sequential(conv(4, 6, 3, groups=2, padding_mode="reflect", padding=1)))
        self.head = nn.ModuleDict({"fc": linear(6 * 4 * 4, 10)})

    def forward(self, x):
        return self.head["fc"](self.features(x).flatten(1))


def _sparse_net():
    net = Net(bs.VDConv2d, bs.VDLinear)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, bs.SparseLayer):
                m.log_sigma2.uniform_(-8, 4)
    return net


def test_state_dict_loads_into_original_and_outputs_match():
    net = _sparse_net()
    bs.threshold_(net)
    dense = bs.to_dense(net)
    assert not any(isinstance(m, bs.SparseLayer) for m in dense.modules())
    assert [type(m) for m in dense.modules()] == [type(m) for m in Net().modules()]
    original = Net()
    assert list(dense.state_dict()) == list(original.state_dict())
    original.load_state_dict(dense.state_dict())
    x = torch.randn(5, 1, 8, 8)
    net.eval(), original.eval()
    assert torch.equal(original(x), net(x))
    # the sparse model is untouched
    assert any(isinstance(m, bs.SparseLayer) for m in net.modules())


@pytest.mark.parametrize("case", LAYER_CASES, ids=CASE_IDS)
def test_every_layer_type_round_trips(case):
    _, dense_cls, suffix, kwargs, shape = case
    layer = getattr(bs, "VD" + suffix)(**kwargs)
    with torch.no_grad():
        layer.log_sigma2.uniform_(-8, 4)
    density = bs.threshold_(layer)[""]
    dense = bs.to_dense(layer)
    assert type(dense) is dense_cls
    assert (dense.weight != 0).float().mean().item() == pytest.approx(density)
    x = torch.randn(shape)
    assert torch.equal(dense.eval()(x), layer.eval()(x))


def test_to_dense_needs_threshold_first():
    with pytest.raises(RuntimeError, match=r"layers \['features.0', 'features.3.0', 'head.fc'\] have no fixed mask; "
                                           r"call bayes_sparse.threshold_\(model\)"):
        bs.to_dense(_sparse_net())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        bs.to_dense(None)


def test_report_of_export_equals_report_of_sparse_model():
    net = _sparse_net()
    bs.threshold_(net)
    a, b = bs.report(net), bs.report(bs.to_dense(net))
    assert [(r.name, r.weights, r.nonzero) for r in a.layers] == [(r.name, r.weights, r.nonzero) for r in b.layers]


def test_dense_copy_of_a_sparse_model_is_its_dense_export():
    net = _sparse_net()
    bs.threshold_(net)
    copy = bs.export.dense_copy(net)
    assert [type(m) for m in copy.modules()] == [type(m) for m in Net().modules()]
    reference = bs.to_dense(net).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in copy.state_dict().items())
    assert any(isinstance(m, bs.SparseLayer) for m in net.modules())  # the model is untouched


def test_dense_copy_of_a_plain_model_is_an_independent_copy():
    net = Net()
    copy = bs.export.dense_copy(net)
    assert copy is not net and repr(copy) == repr(net)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in copy.state_dict().items())
    with torch.no_grad():
        copy.head["fc"].weight.zero_()
    assert net.head["fc"].weight.any()


def test_dense_copy_needs_a_thresholded_module():
    with pytest.raises(RuntimeError, match="call bayes_sparse.threshold_"):
        bs.export.dense_copy(_sparse_net())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        bs.export.dense_copy("net")


@pytest.mark.parametrize("method", ["vd", "l0", "ltp", "l1", "magnitude"])
def test_checkpoints_round_trip_without_pickle(method, tmp_path):
    make = lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))  # noqa: E731
    net = bs.sparsify(make(), method=method, warmup=(0.1, 0.5))
    bs.threshold_(net, sparsity=0.4)
    path = bs.export.save_checkpoint(net, tmp_path / "ckpt.safetensors")
    fresh = bs.export.load_checkpoint(bs.sparsify(make(), method=method), path)
    x = torch.randn(4, 6)
    torch.testing.assert_close(fresh.eval()(x), net.eval()(x))
    assert fresh[0].mask_fixed and fresh[0].warmup == (0.1, 0.5)
    with pytest.raises(RuntimeError, match="load it into a model sparsified with method="):
        bs.export.load_checkpoint(bs.sparsify(make(), method="vd" if method != "vd" else "l1"), path)


def test_checkpoint_files_get_the_users_usual_permissions(tmp_path):
    # safetensors' save_file creates 0600 files whatever the umask; a checkpoint is written like any other file
    old = os.umask(0o022)
    try:
        path = bs.export.save_checkpoint(bs.sparsify(nn.Sequential(nn.Linear(3, 2))), tmp_path / "c.safetensors")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o644
