"""Sparse inference kernels against the dense masked model, on every layer type."""

import time

import pytest
import torch
from torch import nn

import bayes_sparse as bs
from bayes_sparse.export import KERNELS, kernel_report
from tests.cases import CASE_IDS, LAYER_CASES


def _pruned(layer, density=0.1):
    with torch.no_grad():
        layer.weight.mul_((torch.rand_like(layer.weight) < density).float())
    return layer


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", LAYER_CASES, ids=CASE_IDS)
def test_every_kernel_matches_dense_on_every_layer_type(case, kernel):
    _, dense_cls, _, kwargs, shape = case
    torch.manual_seed(0)
    layer = _pruned(dense_cls(**kwargs)).eval()
    x = torch.randn(shape)
    fast = bs.export.compile(nn.Sequential(layer), kernel=kernel)
    torch.testing.assert_close(fast(x), layer(x), rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in fast.parameters())


def test_compile_from_a_thresholded_sparse_model_and_auto():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Unflatten(1, (1, 10, 10)), bs.VDConv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        bs.VDLinear(800, 64), nn.ReLU(), bs.VDLinear(64, 10))
    bs.threshold_(net, sparsity=0.8)
    x = torch.rand(4, 100)
    with pytest.raises(ValueError, match="needs example_input"):
        bs.export.compile(net, kernel="auto")
    fast = bs.export.compile(net, kernel="auto", batch_size=4, threads=1, example_input=x)
    torch.testing.assert_close(fast(x), net.eval()(x), rtol=1e-5, atol=1e-5)
    rep = kernel_report(fast)
    assert [r["type"] for r in rep] == ["Conv2d", "Linear", "Linear"]
    for r in rep:  # auto keeps the fastest of what it timed, dense always among the candidates
        assert "dense" in r["timings"] and r["kernel"] == min(r["timings"], key=r["timings"].get)
    # a layer above max_density stays dense without timing
    dense_net = bs.export.compile(nn.Sequential(nn.Linear(8, 8)), kernel="csr")
    assert dense_net[0].kind == "dense"


def test_the_cpp_kernel_is_built_where_a_compiler_exists():
    import shutil

    from bayes_sparse.export import _csrkernel
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine")
    assert _csrkernel.available()  # otherwise the fast_csr cases above silently ran the dense fallback
    lin = _pruned(nn.Linear(40000, 3), density=0.01)  # more than 32767 inputs: the int32 index path
    x = torch.randn(2, 40000)
    fast = bs.export.SparseKernel(lin, "fast_csr")
    assert fast.mm.col.dtype == torch.int32
    torch.testing.assert_close(fast(x), lin(x), rtol=1e-4, atol=1e-4)


def test_compile_errors():
    with pytest.raises(ValueError, match="unknown kernel 'coo'; known: auto, dense, csr, bsr, fast_csr, dense_native"):
        bs.export.compile(nn.Linear(2, 2), kernel="coo")
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        bs.export.compile(nn.Linear(2, 2), batch_size=0)
    with pytest.raises(RuntimeError, match="call bayes_sparse.threshold_"):
        bs.export.compile(nn.Sequential(bs.VDLinear(2, 2)))


@pytest.mark.parametrize("kernel", KERNELS)
def test_edge_inputs_bare_layers_shared_layers(kernel):
    torch.manual_seed(0)
    lin = _pruned(nn.Linear(16, 8)).eval()
    fast = bs.export.compile(lin, kernel=kernel)  # a bare layer is compiled too
    assert isinstance(fast, bs.export.SparseKernel)
    assert fast(torch.randn(0, 16)).shape == (0, 8)  # empty batch
    conv = _pruned(nn.Conv2d(3, 4, 3, padding=1)).eval()
    x = torch.randn(3, 6, 6)  # unbatched, as torch accepts
    torch.testing.assert_close(bs.export.compile(conv, kernel=kernel)(x), conv(x), rtol=1e-5, atol=1e-5)
    shared = nn.Sequential(lin, nn.ReLU(), nn.Linear(8, 16), lin)
    c = bs.export.compile(shared, kernel=kernel)
    assert isinstance(c[3], bs.export.SparseKernel) and c[0] is c[3]
    xs = torch.randn(2, 16)
    torch.testing.assert_close(c(xs), shared.eval()(xs), rtol=1e-5, atol=1e-5)


def test_auto_keeps_unreached_convs_dense():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 2, 3), nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.a(x)

    fast = bs.export.compile(Branchy(), kernel="auto", example_input=torch.randn(1, 1, 8, 8))
    assert fast.b.kind == "dense" and fast.b.timings == {}


# ----- the im2col path at batch 1 (no transposes) and above ----------------------------------------------
@pytest.mark.parametrize("kernel", [k for k in KERNELS if k != "dense"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("conv", [lambda: nn.Conv1d(4, 8, 3, padding=1), lambda: nn.Conv2d(4, 8, 3, stride=2),
                                  lambda: nn.Conv2d(4, 8, 1, bias=False)], ids=["conv1d", "conv2d", "conv1x1"])
def test_sparse_convolutions_match_dense_at_every_batch_size(kernel, batch, conv):
    torch.manual_seed(0)
    layer = _pruned(conv()).eval()
    x = torch.randn(batch, 4, *([9] * (layer.weight.dim() - 2)))
    fast = bs.export.SparseKernel(layer, kernel)
    torch.testing.assert_close(fast(x), layer(x), rtol=1e-5, atol=1e-5)


# ----- kernel="auto": what is timed, and timed once ------------------------------------------------------
def _count_timings(monkeypatch):
    from bayes_sparse.export import kernels
    calls = []
    real = kernels._time_candidates

    def counting(kinds, make, floor=None):
        calls.append(list(kinds))
        return real(kinds, make, floor)

    monkeypatch.setattr(kernels, "_time_candidates", counting)
    return calls


def _same_mask_linears(n, shape=(64, 48)):
    torch.manual_seed(0)
    mask = torch.rand(shape) < 0.1
    layers = []
    for _ in range(n):
        lin = nn.Linear(shape[1], shape[0])
        with torch.no_grad():
            lin.weight.mul_(mask)
        layers += [lin, nn.ReLU()] if shape[0] == shape[1] else [lin]
    return layers


def test_auto_times_layers_of_one_shape_once(monkeypatch):
    calls = _count_timings(monkeypatch)
    net = nn.Sequential(*_same_mask_linears(6, (48, 48)), *_same_mask_linears(1, (10, 48))).eval()
    x = torch.randn(2, 48)
    fast = bs.export.compile(net, kernel="auto", batch_size=2)
    assert len(calls) == 2  # one timing for the six 48x48 layers, one for the 10x48 head
    rep = kernel_report(fast)
    assert [r["cached"] for r in rep] == [False, True, True, True, True, True, False]
    assert len({r["kernel"] for r in rep[:6]}) == 1 and all(r["timings"] == rep[0]["timings"] for r in rep[:6])
    torch.testing.assert_close(fast(x), net(x), rtol=1e-5, atol=1e-5)
    # another batch size is another timing; a shared cache serves a second call without timing anything
    cache = {}
    bs.export.compile(net, kernel="auto", batch_size=3, timing_cache=cache)
    assert len(calls) == 4
    again = bs.export.compile(net, kernel="auto", batch_size=3, timing_cache=cache)
    assert len(calls) == 4 and all(r["cached"] for r in kernel_report(again))


def test_auto_tells_apart_densities_and_geometries(monkeypatch):
    calls = _count_timings(monkeypatch)
    torch.manual_seed(0)
    net = nn.Sequential(_pruned(nn.Linear(32, 32), 0.1), _pruned(nn.Linear(32, 32), 0.02),
                        _pruned(nn.Linear(32, 32, bias=False), 0.1)).eval()
    bs.export.compile(net, kernel="auto")
    assert len(calls) == 3
    with pytest.raises(TypeError, match="timing_cache must be a dict"):
        bs.export.compile(net, kernel="auto", timing_cache=[])


def test_bsr_is_timed_only_for_well_filled_blocks():
    from bayes_sparse.export.kernels import _candidates
    torch.manual_seed(0)
    scattered = _pruned(nn.Linear(64, 64), 0.1)
    blocky = nn.Linear(64, 64)
    with torch.no_grad():
        blocky.weight.mul_((torch.rand(16, 16) < 0.1).repeat_interleave(4, 0).repeat_interleave(4, 1))
    assert "bsr" not in _candidates(scattered) and "bsr" in _candidates(blocky)
    assert _candidates(scattered)[0] == "dense"


def _busy(seconds):
    def f():
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
    return f


def test_time_candidates_drops_losers_after_one_round_and_stops_at_the_floor():
    from bayes_sparse.export.kernels import _ROUNDS, _time_candidates
    counts = {}

    def make(kind):
        counts[kind] = 0
        f = _busy({"dense": 4e-4, "csr": 1e-4, "bsr": 4e-3, "dense_native": 1e-4}[kind])

        def call():
            counts[kind] += 1
            f()
        return call

    t = _time_candidates(["dense", "csr", "bsr"], make)
    assert set(t) == {"dense", "csr", "bsr"} and min(t, key=t.get) == "csr"
    assert t["bsr"] > 2 * t["csr"] and counts["bsr"] == 2  # warm-up and the first round, then dropped
    assert counts["csr"] > _ROUNDS
    counts.clear()
    t = _time_candidates(["dense", "csr"], make, floor=_busy(4e-3))  # im2col alone slower than dense
    assert list(t) == ["dense"] and set(counts) == {"dense"}
    counts.clear()  # dense_native pays no im2col: still timed behind the floor, and wins here
    t = _time_candidates(["dense", "csr", "dense_native"], make, floor=_busy(4e-3))
    assert set(t) == {"dense", "dense_native"} and min(t, key=t.get) == "dense_native" and "csr" not in counts


def test_auto_conv_choice_is_among_what_was_timed_and_matches_dense():
    torch.manual_seed(0)
    net = nn.Sequential(_pruned(nn.Conv2d(8, 16, 3, padding=1), 0.05), nn.ReLU(),
                        _pruned(nn.Conv2d(16, 16, 1), 0.05)).eval()
    x = torch.randn(1, 8, 12, 12)
    fast = bs.export.compile(net, kernel="auto", example_input=x)
    for r in kernel_report(fast):
        assert "dense" in r["timings"] and r["kernel"] == min(r["timings"], key=r["timings"].get)
    torch.testing.assert_close(fast(x), net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "csr", "bsr", "fast_csr", "dense_native"])
def test_compiled_layers_expose_their_dense_weight_to_readers(kind):
    from bayes_sparse.export.kernels import _supported

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8), nn.Conv2d(1, 4, 3))
    with torch.no_grad():
        for m in net:
            m.weight.mul_(torch.rand_like(m.weight) > 0.7)
    if not any(_supported(m, kind) for m in net):
        pytest.skip(f"{kind} unavailable here")
    compiled = bs.export.compile(net, kernel=kind, max_density=1.0)
    for a, b in zip(compiled, net):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    compiled = bs.export.compile(mha, kernel=kind, max_density=1.0)  # the attention code reads out_proj.weight
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, x, x)[0], mha(x, x, x)[0], rtol=1e-5, atol=1e-5)


# ----- dense_native: torch's dense convolution with oneDNN off for the call --------------------------------
needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("conv", [lambda: nn.Conv1d(4, 6, 3, padding=1), lambda: nn.Conv2d(4, 6, 3, stride=2),
                                  lambda: nn.Conv2d(4, 8, 3, groups=2, padding="same"),
                                  lambda: nn.Conv3d(2, 3, 2)], ids=["conv1d", "conv2d", "grouped", "conv3d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_native_matches_the_onednn_convolution_and_restores_the_flag(conv, dtype):
    torch.manual_seed(0)
    layer = conv().to(dtype).eval()
    x = torch.randn(3, layer.in_channels, *([7] * (layer.weight.dim() - 2)), dtype=dtype)
    fast = bs.export.SparseKernel(layer, "dense_native")
    assert torch.backends.mkldnn.enabled
    with torch.no_grad():
        torch.testing.assert_close(fast(x), layer(x))
        torch.testing.assert_close(fast(x[0]), layer(x[0]))  # unbatched
    assert torch.backends.mkldnn.enabled  # switched back on after the call
    assert torch.equal(fast.weight, layer.weight) and torch.equal(fast.bias, layer.bias)
    # an error inside the convolution leaves the flag as it was, on or off
    seen = []

    def boom(_):
        seen.append(torch.backends.mkldnn.enabled)
        raise RuntimeError("boom")

    fast.layer.forward = boom
    for setting in (True, False):
        with torch.backends.mkldnn.flags(enabled=setting):
            with pytest.raises(RuntimeError, match="boom"):
                fast(x)
            assert torch.backends.mkldnn.enabled == setting
    assert seen == [False, False]  # off during the call


@needs_onednn
def test_compile_dense_native_runs_convolutions_only_and_auto_times_it_on_kept_dense_convolutions():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()
    x = torch.randn(1, 1, 12, 12)
    fast = bs.export.compile(net, kernel="dense_native")  # unpruned: above max_density, still dense_native
    assert [r["kernel"] for r in kernel_report(fast)] == ["dense_native", "dense"]  # a Linear has no oneDNN path
    torch.testing.assert_close(fast(x), net(x))
    auto = bs.export.compile(net, kernel="auto", example_input=x)
    conv, lin = kernel_report(auto)
    assert set(conv["timings"]) == {"dense", "dense_native"}
    assert conv["kernel"] == min(conv["timings"], key=conv["timings"].get)
    assert lin["kernel"] == "dense" and lin["timings"] == {}  # an unpruned Linear: nothing to time
    torch.testing.assert_close(auto(x), net(x))
    # a pruned convolution: the sparse kernels and both dense ones are timed, whatever the im2col floor
    sparse = nn.Sequential(_pruned(nn.Conv2d(8, 16, 3, padding=1), 0.05)).eval()
    r = kernel_report(bs.export.compile(sparse, kernel="auto", example_input=torch.randn(1, 8, 12, 12)))[0]
    assert {"dense", "dense_native"} <= set(r["timings"])


def test_dense_native_is_no_candidate_without_onednn(monkeypatch):
    from bayes_sparse.export.kernels import _candidates, _supported

    conv = nn.Conv2d(2, 3, 3)
    assert not _supported(nn.Linear(3, 3), "dense_native")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert not _supported(conv, "dense_native") and "dense_native" not in _candidates(conv)
    with pytest.raises(ValueError, match="kernel 'dense_native' does not support Linear"):
        bs.export.SparseKernel(nn.Linear(3, 3), "dense_native")
