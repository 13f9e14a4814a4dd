"""export.shrink: removed units physically gone (MLP, LeNet-5-Caffe through Flatten, resnet18's residual
channels, mobilenet_v2's depthwise blocks), outputs unchanged, parameter counts by hand, refusals."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import bayes_sparse as bs


def _nparams(m):
    return sum(p.numel() for p in m.parameters())


def _zero_units(layer, idxs):
    with torch.no_grad():
        layer.weight[idxs] = 0
        if layer.bias is not None:
            layer.bias[idxs] = 0


def _check_same(model, small, x):
    model.eval()
    torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)
    probe = torch.randn_like(x)
    torch.testing.assert_close(small(probe), model(probe), rtol=1e-4, atol=1e-5)


def test_mlp_units_and_inputs_of_the_next_layer_go():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
    _zero_units(net[0], [1, 4, 7])
    _zero_units(net[2], [0])
    state = copy.deepcopy(net.state_dict())
    x = torch.randn(4, 6)
    small = bs.export.shrink(net, x)
    _check_same(net, small, x)
    assert [small[0].out_features, small[2].in_features, small[2].out_features, small[4].in_features] == [5, 5, 4, 4]
    assert _nparams(small) == 5 * 6 + 5 + 4 * 5 + 4 + 3 * 4 + 3
    assert small.shrink_summary.units == {"0": (8, 5), "2": (5, 4), "4": (3, 3)}
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())  # the input model is untouched


def test_zero_units_read_as_a_nonzero_constant_are_kept():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 2)).eval()
    _zero_units(net[0], [2])  # sigmoid(0) = 0.5 reaches the next layer: not removable
    x = torch.randn(3, 4)
    small = bs.export.shrink(net, x)
    assert small[0].out_features == 6
    _check_same(net, small, x)
    conv = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1)).eval()
    with torch.no_grad():
        conv[1].running_mean.uniform_(-1, 1)
        conv[1].bias.fill_(0.5)
    _zero_units(conv[0], [1])  # the BatchNorm maps 0 to a non-zero constant
    x = torch.randn(2, 2, 6, 6)
    small = bs.export.shrink(conv, x)
    assert small[0].out_channels == 4
    _check_same(conv, small, x)


def _constant_units(layer, idxs, bias):
    with torch.no_grad():
        layer.weight[idxs] = 0
        layer.bias[idxs] = torch.as_tensor(bias, dtype=layer.bias.dtype)


def test_units_with_a_constant_output_are_folded_into_their_readers_biases():
    """Zero weights but a non-zero bias: the unit outputs a constant, which the next layer's bias absorbs, and the
    unit goes; the shifted bias is checked against the constant worked out by hand."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    _constant_units(net[0], [1, 3], [0.7, -0.4])  # relu: 0.7 reaches the next layer, -0.4 becomes 0
    x = torch.randn(8, 6)
    small = bs.export.shrink(net, x)
    _check_same(net, small, x)
    assert [small[0].out_features, small[2].in_features] == [3, 3]
    torch.testing.assert_close(small[2].bias, net[2].bias + 0.7 * net[2].weight[:, 1])
    # constant units in two successive layers both fold
    two = copy.deepcopy(net)
    _constant_units(two[2], [0], [0.5])
    small = bs.export.shrink(two, x)
    _check_same(two, small, x)
    assert [small[0].out_features, small[2].out_features, small[4].in_features] == [3, 3, 3]
    # a constant unit of the last layer is the model's output: kept, outputs equal
    _constant_units(net[4], [0], [0.3])
    small = bs.export.shrink(net, x)
    assert small[4].out_features == 3
    _check_same(net, small, x)


@pytest.mark.parametrize("padding, kept", [(0, 3), (1, 4)])
def test_constant_conv_channels_fold_unless_padding_makes_them_position_dependent(padding, kept):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=padding), nn.ReLU(),
                        nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(3, 2, 9, 9)
    net(x)
    net.eval()
    _constant_units(net[0], [2], [0.5])  # zero padding around a constant map is not constant: kept
    small = bs.export.shrink(net, x)
    assert small[0].out_channels == kept
    _check_same(net, small, x)


def test_lenet5_constant_channel_folds_through_pooling_and_flatten():
    torch.manual_seed(0)
    net = _lenet5().eval()
    _constant_units(net[4], [5, 9], [0.2, 0.1])  # conv2 channels: constant maps, pooled, flattened into fc1
    x = torch.rand(4, 784)
    small = bs.export.shrink(net, x)
    _check_same(net, small, x)
    assert small[4].out_channels == 48 and small[8].in_features == 48 * 16


def _lenet5():
    return nn.Sequential(nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(800, 500),
                         nn.ReLU(), nn.Linear(500, 10))


def test_lenet5_channels_go_through_flatten():
    torch.manual_seed(0)
    net = _lenet5().eval()
    _zero_units(net[1], [3, 7])
    _zero_units(net[4], [0, 5, 9])
    _zero_units(net[8], list(range(100)))
    x = torch.randn(2, 784)
    small = bs.export.shrink(net, x)
    _check_same(net, small, x)
    c1, c2, f1 = 18, 47, 400
    assert (small[1].out_channels, small[4].in_channels, small[4].out_channels) == (c1, c1, c2)
    assert (small[8].in_features, small[8].out_features, small[10].in_features) == (c2 * 16, f1, f1)
    assert _nparams(small) == c1 * 25 + c1 + c2 * c1 * 25 + c2 + f1 * c2 * 16 + f1 + 10 * f1 + 10


def test_lenet5_trained_with_group_l0_shrinks_to_the_report():
    torch.manual_seed(0)
    net = bs.sparsify(_lenet5(), "group_l0", exclude=["10"])
    with torch.no_grad():  # as if trained: close some units' gates
        net[1].log_alpha[[0, 4]] = -10
        net[4].log_alpha[[1, 2, 3]] = -10
        net[8].log_alpha[:250] = -10
    bs.threshold_(net)
    rep = {r.name: r.units_kept for r in bs.report(net).layers}
    x = torch.randn(2, 784)
    small = bs.export.shrink(net.eval(), x)
    _check_same(net, small, x)
    assert (small[1].out_channels, small[4].out_channels, small[8].out_features) == (rep["1"], rep["4"], rep["8"])
    assert (rep["1"], rep["4"], rep["8"]) == (18, 47, 250)


def test_resnet18_coupled_residual_channels_go_together_or_not_at_all():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    stage1 = [net.bn1, net.layer1[0].bn2, net.layer1[1].bn2]  # their channels are added together
    with torch.no_grad():
        for bn in stage1:
            bn.weight[[5, 6]] = 0
            bn.bias[[5, 6]] = 0
        net.layer1[1].bn2.weight[6] = 1.0  # channel 6 is not zero in one of the coupled places: it stays
        net.layer2[0].bn1.weight[[1, 2]] = 0  # a plain (uncoupled) channel pair
        net.layer2[0].bn1.bias[[1, 2]] = 0
    before = _nparams(net)
    x = torch.randn(1, 3, 32, 32)
    small = bs.export.shrink(net, x)
    _check_same(net, small, x)
    assert small.conv1.out_channels == small.layer1[0].conv2.out_channels == small.layer1[1].conv2.out_channels == 63
    assert small.layer1[0].conv1.in_channels == small.layer2[0].downsample[0].in_channels == 63
    assert small.layer2[0].conv1.out_channels == 126 and small.layer2[0].conv2.in_channels == 126
    removed = (3 * 49 + 2) + 2 * (64 * 9 + 64 * 9 + 2) + 128 * 9 + 128  # channel 5 of stage 1
    removed += 2 * (63 * 9 + 2 + 128 * 9)  # channels 1, 2 of layer2[0].conv1
    assert _nparams(small) == before - removed


def test_mobilenet_v2_depthwise_block_channels_go():
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(num_classes=10).eval()
    block = net.features[2].conv  # expand 1x1 + BN + ReLU6, depthwise 3x3 + BN + ReLU6, project 1x1 + BN
    with torch.no_grad():
        for bn in (block[0][1], block[1][1]):
            bn.weight[[3, 4]] = 0
            bn.bias[[3, 4]] = 0
    before = _nparams(net)
    x = torch.randn(1, 3, 32, 32)
    small = bs.export.shrink(net, x)
    _check_same(net, small, x)
    sb = small.features[2].conv
    assert (sb[0][0].out_channels, sb[1][0].in_channels, sb[1][0].out_channels, sb[1][0].groups,
            sb[2].in_channels) == (94, 94, 94, 94, 94)
    assert _nparams(small) == before - 2 * (16 + 2 + 9 + 2 + 24)


class _ChannelScale(nn.Module):
    """Scales channels by a buffer: a per-channel use that the dependency graph does not see."""

    def __init__(self, c):
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 2.0, c).view(c, 1, 1))

    def forward(self, x):
        return x * self.scale


def test_an_op_it_cannot_follow_raises_and_leaves_the_model_unchanged():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), _ChannelScale(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    _zero_units(net[0], [1])
    state = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=r"shrink: removing output units \[1\] of layer '0' \(Conv2d\) broke the "
                                         r"forward pass"):
        bs.export.shrink(net, torch.randn(2, 2, 6, 6))
    assert net[0].out_channels == 4 and all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_a_group_touching_a_norm_it_cannot_follow_raises():
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        net[1].weight[1] = 0
        net[1].bias[1] = 0
    _zero_units(net[0], [1])
    with pytest.raises(ValueError, match=r"touches '1' \(GroupNorm\), which shrink cannot follow"):
        bs.export.shrink(net, torch.randn(2, 2, 6, 6))


def test_sparse_model_without_fixed_masks_is_refused():
    with pytest.raises(RuntimeError, match="call bayes_sparse.threshold_"):
        bs.export.shrink(bs.sparsify(nn.Sequential(nn.Linear(3, 2)), "group_l0"), torch.randn(1, 3))


def test_channels_no_reader_looks_at_go_whatever_their_producers_write():
    """Input gates (``unit="in"``) zero the next layer's columns, not the producer's rows: those units are
    computed but never read, so they go too (LeNet-300's 266-88-33 are such counts)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    with torch.no_grad():
        net[2].weight[:, [0, 3]] = 0  # hidden units 0 and 3 of the first layer are never read
        net[4].weight[:, 1] = 0
    x = torch.randn(4, 6)
    small = bs.export.shrink(net, x)
    _check_same(net, small, x)
    assert (small[0].out_features, small[2].in_features, small[2].out_features, small[4].in_features) == (6, 6, 4, 4)
    assert _nparams(small) == 6 * 6 + 6 + 4 * 6 + 4 + 3 * 4 + 3
    lenet = _lenet5().eval()
    with torch.no_grad():
        lenet[8].weight.view(500, 50, 16)[:, [2, 11]] = 0  # every fc1 input of conv2 channels 2 and 11
        lenet[8].weight.view(500, 50, 16)[:, 5, :8] = 0  # half of channel 5's: still read, kept
    x = torch.randn(2, 784)
    small = bs.export.shrink(lenet, x)
    _check_same(lenet, small, x)
    assert (small[4].out_channels, small[8].in_features) == (48, 48 * 16)


def test_a_channel_ignored_by_one_reader_but_read_by_another_is_kept():
    torch.manual_seed(0)

    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(5, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h) + self.c(h)

    net = TwoReaders().eval()
    with torch.no_grad():
        net.b.weight[:, 2] = 0  # b ignores unit 2, c still reads it
        net.b.weight[:, 4] = 0
        net.c.weight[:, 4] = 0  # nobody reads unit 4
    x = torch.randn(3, 4)
    small = bs.export.shrink(net, x)
    _check_same(net, small, x)
    assert small.a.out_features == 4 and small.b.in_features == 4 and small.c.in_features == 4
