"""Sparse inference kernels against the dense masked model, on every layer type."""

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
    with pytest.raises(ValueError, match="unknown kernel 'coo'; known: auto, dense, csr, bsr, fast_csr"):
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
