"""Module-tree recipe: every recordable module type is described as JSON and rebuilt with equal constructor
arguments; anything else is not described, and malformed descriptions are refused."""

import json

import pytest
import torch
from torch import nn

import bayes_sparse as bs
from bayes_sparse.export import CorruptFileError, _tree

# one instance of every recordable type, with non-default arguments where it has any
EXAMPLES = [
    nn.Linear(5, 3, bias=False),
    nn.Conv1d(2, 4, 3, stride=2, padding=1, dilation=2, groups=2, bias=False, padding_mode="circular"),
    nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), padding_mode="reflect"),
    nn.Conv3d(1, 2, 3, padding="same", padding_mode="replicate"),
    nn.ReLU(inplace=True), nn.ReLU6(inplace=True), nn.Tanh(), nn.Sigmoid(), nn.GELU(approximate="tanh"),
    nn.Identity(), nn.Dropout(0.3), nn.Flatten(2, -2), nn.Unflatten(1, (4, 6)), nn.Softmax(dim=0),
    nn.LogSoftmax(dim=1),
    nn.MaxPool1d(3, stride=1, padding=1, dilation=2, return_indices=True, ceil_mode=True),
    nn.MaxPool2d((2, 3), stride=(1, 2), padding=(1, 1), ceil_mode=True),
    nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False, divisor_override=2),
    nn.AdaptiveAvgPool2d((3, None)),
    nn.BatchNorm1d(7, eps=1e-3, momentum=None, affine=False, track_running_stats=False),
    nn.BatchNorm2d(4, eps=1e-4, momentum=0.2),
]

# the constructor arguments each type takes, read off the module independently of _tree.SPECS
_ARGS = {
    nn.Linear: ("in_features", "out_features"), nn.Conv1d: ("in_channels", "out_channels", "kernel_size", "stride",
                                                            "padding", "dilation", "groups", "padding_mode"),
    nn.ReLU: ("inplace",), nn.ReLU6: ("inplace",), nn.Tanh: (), nn.Sigmoid: (), nn.GELU: ("approximate",),
    nn.Identity: (), nn.Dropout: ("p",), nn.Flatten: ("start_dim", "end_dim"),
    nn.Unflatten: ("dim", "unflattened_size"), nn.Softmax: ("dim",), nn.LogSoftmax: ("dim",),
    nn.MaxPool1d: ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode"),
    nn.AvgPool2d: ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    nn.AdaptiveAvgPool2d: ("output_size",),
    nn.BatchNorm1d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
}
_ARGS[nn.Conv2d] = _ARGS[nn.Conv3d] = _ARGS[nn.Conv1d]
_ARGS[nn.MaxPool2d] = _ARGS[nn.MaxPool1d]
_ARGS[nn.BatchNorm2d] = _ARGS[nn.BatchNorm1d]


def _args(m):
    out = {a: getattr(m, a) for a in _ARGS[type(m)]}
    if hasattr(m, "bias") and type(m) not in (nn.BatchNorm1d, nn.BatchNorm2d):
        out["bias"] = m.bias is not None
    return out


def _rebuilt(m):
    return _tree.build(json.loads(json.dumps(_tree.describe(m))))  # through JSON, as in a file


def test_the_examples_cover_every_recorded_type():
    assert {type(m) for m in EXAMPLES} == set(_tree.SPECS) == set(_ARGS)


@pytest.mark.parametrize("module", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_type_is_rebuilt_with_equal_arguments_on_the_meta_device(module):
    back = _rebuilt(module)
    assert type(back) is type(module)
    assert _args(back) == _args(module)
    assert repr(back) == repr(module)
    assert all(t.is_meta for t in [*back.parameters(), *back.buffers()])
    assert [n for n, _ in back.named_parameters()] == [n for n, _ in module.named_parameters()]
    assert [n for n, _ in back.named_buffers()] == [n for n, _ in module.named_buffers()]


def test_nested_sequentials():
    net = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), nn.Sequential(), nn.Linear(4, 2))
    desc = _tree.describe(net)
    assert desc["type"] == "Sequential" and [c["type"] for c in desc["children"]] == ["Sequential"] * 2 + ["Linear"]
    assert repr(_rebuilt(net)) == repr(net)


class _Custom(nn.Module):
    def forward(self, x):
        return x


class _MyLinear(nn.Linear):
    pass


@pytest.mark.parametrize("module", [
    _Custom(), _MyLinear(2, 2), nn.ModuleList([nn.Linear(2, 2)]), nn.LeakyReLU(),
    nn.Sequential(nn.Linear(2, 2), _Custom()),
    nn.Sequential(nn.Sequential(nn.ELU())), bs.VDLinear(2, 2),
], ids=["custom", "subclass", "modulelist", "unlisted", "inside", "deep", "sparse"])
def test_anything_else_is_not_described(module):
    assert _tree.describe(module) is None


def test_a_tree_is_recorded_only_if_it_rebuilds_to_the_state_dict():
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    assert _tree.recordable(net, net.state_dict()) == _tree.describe(net)
    net.register_buffer("extra", torch.zeros(2))  # a tensor of the Sequential itself: no recipe rebuilds it
    assert _tree.describe(net) is not None and _tree.recordable(net, net.state_dict()) is None
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    net[1].num_batches_tracked = torch.tensor(0, dtype=torch.int32)  # not the int64 the recipe makes
    assert _tree.recordable(net, net.state_dict()) is None
    net = nn.Sequential(nn.Linear(3, 2))
    net[0].weight = nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))  # another float: still rebuilt
    assert _tree.recordable(net, net.state_dict()) is not None


def test_a_listed_type_with_children_is_not_described():
    lin = nn.Linear(2, 2)
    lin.extra = nn.ReLU()
    assert _tree.describe(lin) is None


def _nest(depth):
    node = {"type": "Identity", "kwargs": {}}
    for _ in range(depth):
        node = {"type": "Sequential", "children": [node]}
    return node


def test_nesting_limit():
    assert isinstance(_tree.build(_nest(_tree.MAX_DEPTH)), nn.Sequential)
    with pytest.raises(CorruptFileError, match="malformed module entry"):
        _tree.build(_nest(_tree.MAX_DEPTH + 1))


@pytest.mark.parametrize("node,msg", [
    (None, "malformed module entry"), ([], "malformed module entry"), ({"kwargs": {}}, "malformed module entry"),
    ({"type": 3}, "malformed module entry"),
    ({"type": "Sequential", "children": {"a": 1}}, "children is not a list"),
    ({"type": "Sequential", "children": [5]}, "malformed module entry"),
    ({"type": "Module", "kwargs": {}}, "unknown module type 'Module'"),
    ({"type": "__class__", "kwargs": {}}, "unknown module type '__class__'"),
    ({"type": "Linear", "kwargs": [1, 2]}, "malformed arguments for Linear"),
    ({"type": "Linear", "kwargs": {"in_features": 2}}, "cannot build Linear"),
    ({"type": "Linear", "kwargs": {"in_features": 2, "out_features": 2, "device": "cpu", "evil": 1}},
     "cannot build Linear"),
    ({"type": "Linear", "kwargs": {"in_features": -2, "out_features": 2}}, "cannot build Linear"),
    ({"type": "Conv2d", "kwargs": {"in_channels": 2, "out_channels": 3, "kernel_size": 3, "groups": 2}},
     "cannot build Conv2d"),
    ({"type": "Dropout", "kwargs": {"p": 2.0}}, "cannot build Dropout"),
], ids=["none", "list", "no-type", "int-type", "children", "child", "module", "dunder", "kwargs", "missing",
        "unexpected", "negative", "groups", "p"])
def test_malformed_descriptions_are_refused(node, msg):
    with pytest.raises(CorruptFileError, match=msg):
        _tree.build(node)


def test_a_huge_layer_costs_no_memory():
    big = _tree.build({"type": "Linear", "kwargs": {"in_features": 1 << 20, "out_features": 1 << 20, "bias": True}})
    assert big.weight.is_meta and big.weight.shape == (1 << 20, 1 << 20)
    assert torch.device("meta") == big.bias.device
