"""Every kernel against the dense reference over random geometries, densities 0 to 1, batch sizes 0, 1 and
odd, and contiguous, non-contiguous and channels-last inputs (hypothesis)."""

import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

import bayes_sparse as bs
from bayes_sparse.export import KERNELS
from bayes_sparse.export.kernels import _supported

BATCHES = [None, 0, 1, 3, 5]  # None: unbatched (a conv's (C, *spatial), a Linear's (in,))


def _sizes(low, high):
    """Sizes in [low, high], half of them multiples of 4 (BSR's 4x4 blocks need them)."""
    return st.one_of(st.integers(low, high), st.integers(max(1, low // 4), high // 4).map(lambda n: 4 * n))


@st.composite
def linears(draw):
    layer = nn.Linear(draw(_sizes(1, 40)), draw(_sizes(1, 24)), bias=draw(st.booleans()))
    lead = draw(st.sampled_from([(), (2,)]))  # an extra leading dimension, as Linear accepts
    return layer, lead


@st.composite
def convs(draw):
    nd = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 1, 1, 2]))  # grouped convolutions stay dense
    cin, cout = groups * draw(_sizes(1, 4)), groups * draw(_sizes(1, 8))
    k = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(nd))
    mode = draw(st.sampled_from(["zeros", "zeros", "zeros", "reflect", "circular"]))
    cls = nn.Conv1d if nd == 1 else nn.Conv2d
    layer = cls(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
                bias=draw(st.booleans()), padding_mode=mode)
    # spatial sizes at least the dilated kernel after padding (and above the padding, for reflect/circular)
    size = tuple(draw(st.integers(max(d * (kk - 1) + 1 - 2 * p, p + 1, 1), 9))
                 for kk, d, p in zip(k, dilation, padding))
    return layer, size


def _input(shape, layout):
    """A float32 tensor of ``shape`` with the given memory layout."""
    if layout == "channels_last" and len(shape) == 4:
        return torch.randn(shape).contiguous(memory_format=torch.channels_last)
    if layout == "transposed" and len(shape) >= 2:  # a transposed view: the last two dims swapped in memory
        return torch.randn(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    if layout == "sliced" and shape:  # every other element of a larger tensor
        return torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2]
    return torch.randn(shape)


@settings(max_examples=800, deadline=None)
@given(data=st.data(), kernel=st.sampled_from(KERNELS),
       density=st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0)),
       batch=st.sampled_from(BATCHES), layout=st.sampled_from(["contiguous", "transposed", "sliced", "channels_last"]),
       conv=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float32, torch.float64]))
def test_every_kernel_matches_the_dense_reference(data, kernel, density, batch, layout, conv, dtype):
    torch.manual_seed(data.draw(st.integers(0, 2 ** 16), label="seed"))
    if conv:
        layer, size = data.draw(convs(), label="conv")
        shape = (layer.in_channels, *size) if batch is None else (batch, layer.in_channels, *size)
    else:
        layer, lead = data.draw(linears(), label="linear")
        shape = (layer.in_features,) if batch is None else (*lead, batch, layer.in_features)
    with torch.no_grad():
        layer.weight.mul_((torch.rand_like(layer.weight) < density).float())  # density 0: an all-zero weight
    # no grad on the reference either: torch's matmul folds a strided N-d input differently when the weight
    # requires grad (same maths, other rounding), and the compiled layers' weights do not
    layer = layer.to(dtype).eval().requires_grad_(False)
    x = _input(shape, layout).to(dtype)  # .to keeps the strides
    fast = bs.export.compile(layer, kernel=kernel, max_density=1.0)
    assert fast.kind == (kernel if _supported(layer, kernel) else "dense")
    event(f"{type(layer).__name__} on {fast.kind}, {dtype}")
    with torch.no_grad():
        want = layer(x)
        got = fast(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    if fast.kind == "dense":  # the masked dense kernel (and every fallback to it) runs torch's own ops: exact
        assert torch.equal(got, want)
    else:
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
