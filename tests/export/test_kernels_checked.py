"""Compiled kernels check their input (shape, dtype, device) and keep the model's dtype; the C++ kernel's own
TORCH_CHECKs and the once-per-matrix CSR structure check."""

import shutil

import pytest
import torch
from torch import nn

import bayes_sparse as bs
from bayes_sparse.export import KERNELS, _csrkernel
from bayes_sparse.export.kernels import _supported


def _pruned(layer, density=0.3):
    with torch.no_grad():
        layer.weight.mul_((torch.rand_like(layer.weight) < density).to(layer.weight.dtype))
    return layer.eval()


def _cpp_or_skip():
    if not _csrkernel.available():
        pytest.skip("no C++ kernel on this machine")


def test_the_issue_fast_csr_refuses_a_short_input_instead_of_reading_past_it():
    _cpp_or_skip()
    c = bs.export.compile(nn.Sequential(nn.Linear(100, 10)), kernel="fast_csr", max_density=1.0)
    assert c[0].kind == "fast_csr"
    with pytest.raises(ValueError, match=r"compiled Linear '0' \(kernel 'fast_csr'\) expects inputs of shape "
                                         r"\(\.\.\., 100\) \(100 in-features\), got shape \(2, 5\)"):
        c(torch.randn(2, 5))


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_kernel_refuses_wrong_inputs_clearly(kernel):
    torch.manual_seed(0)
    lin = _pruned(nn.Linear(16, 8))
    conv = _pruned(nn.Conv2d(4, 8, 3, padding=1))
    c = bs.export.compile(nn.Sequential(lin, nn.Unflatten(1, (2, 2, 2)), conv), kernel=kernel, max_density=1.0)
    lin_c, conv_c = c[0], c[2]
    assert lin_c.kind == (kernel if _supported(lin, kernel) else "dense")
    for bad in (torch.randn(2, 15), torch.randn(2, 3, 17), torch.tensor(1.0)):
        with pytest.raises(ValueError, match=r"Linear '0' .* expects inputs of shape \(\.\.\., 16\) \(16 in-f"):
            lin_c(bad)
    for bad in (torch.randn(2, 3, 6, 6), torch.randn(6, 6), torch.randn(1, 2, 4, 6, 6), torch.randn(3, 6, 6)):
        with pytest.raises(ValueError, match=r"Conv2d '2' .* expects inputs of shape \(N, 4, H, W\) or \(4, H, W\)"):
            conv_c(bad)
    for layer, good in ((lin_c, torch.randn(2, 16)), (conv_c, torch.randn(2, 4, 6, 6))):
        with pytest.raises(TypeError, match=r"expects torch.float32 inputs .* got torch.float64; convert the inp"):
            layer(good.double())
        with pytest.raises(TypeError, match="got torch.int64"):
            layer(good.long())
        with pytest.raises(ValueError, match=r"has its weights on cpu, got an input on meta; move the input"):
            layer(good.to("meta"))
        with pytest.raises(TypeError, match="expects a torch.Tensor input, got list"):
            layer(good.tolist())
    with pytest.raises(ValueError, match="Linear '0'"):  # the whole model: the first layer speaks
        c(torch.randn(2, 15))


@pytest.mark.parametrize("kernel", [k for k in KERNELS if k != "dense"])
def test_sparse_convolutions_refuse_inputs_smaller_than_the_kernel(kernel):
    layer = _pruned(nn.Conv2d(4, 4, 3, dilation=2))
    if not _supported(layer, kernel):
        pytest.skip(f"{kernel} unavailable here")
    fast = bs.export.SparseKernel(layer, kernel)
    with pytest.raises(ValueError, match=r"an input of spatial size \(4, 9\) is smaller than the kernel"):
        fast(torch.randn(1, 4, 4, 9))
    conv1d = bs.export.SparseKernel(_pruned(nn.Conv1d(4, 4, 5, padding=1, padding_mode="circular")), kernel)
    with pytest.raises(ValueError, match=r"spatial size \(4,\) \(after padding\) is smaller"):
        conv1d(torch.randn(4, 2))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_models_of_other_dtypes_compile_to_kernels_of_their_dtype(kernel, dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Unflatten(1, (2, 4)), nn.Conv1d(2, 4, 3, padding=1))
    for m in (net[0], net[3]):
        _pruned(m)
    net = net.to(dtype).eval()
    fast = bs.export.compile(net, kernel=kernel, max_density=1.0)
    for m, orig in ((fast[0], net[0]), (fast[3], net[3])):
        assert m.kind == (kernel if _supported(orig, kernel) else "dense")
        assert m.weight.dtype == dtype and m.bias.dtype == dtype
    if kernel == "fast_csr":  # float32 only: the layers stay dense
        assert fast[0].kind == fast[3].kind == "dense"
    if dtype == torch.float64 and kernel in ("csr", "bsr"):  # torch's sparse kernels run float64
        assert fast[0].kind == kernel
    x = torch.randn(3, 16, dtype=dtype)
    with torch.no_grad():
        want = net(x)
        got = fast(x)
    assert got.dtype == dtype
    if fast[0].kind == fast[3].kind == "dense":  # the very same ops
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want)  # the dtype's own tolerance
    with pytest.raises(TypeError, match=f"expects {dtype} inputs"):
        fast(x.float())


def test_a_float64_model_with_auto_times_and_runs_in_float64():
    torch.manual_seed(0)
    net = nn.Sequential(_pruned(nn.Conv2d(2, 8, 3), 0.1), nn.Flatten(), _pruned(nn.Linear(8 * 4 * 4, 8), 0.1))
    net = net.double().eval()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    fast = bs.export.compile(net, kernel="auto", batch_size=2, example_input=x)
    for r in bs.export.kernel_report(fast):
        assert "fast_csr" not in r["timings"] and "dense" in r["timings"]
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), rtol=1e-12, atol=1e-12)
    # an unbatched example input is timed on a batch of the same geometry
    fast = bs.export.compile(net[:1], kernel="auto", example_input=x[0])
    with torch.no_grad():
        torch.testing.assert_close(fast(x[0]), net[0](x[0]), rtol=1e-12, atol=1e-12)


def test_checks_follow_a_dense_convolution_moved_after_compiling():
    torch.manual_seed(0)
    conv = _pruned(nn.Conv2d(2, 4, 3))
    fast = bs.export.compile(conv, kernel="dense").double()  # the torch layer inside moves, and the check with it
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(fast(x), conv.double()(x))
    with pytest.raises(TypeError, match="expects torch.float64 inputs"):
        fast(x.float())


def test_the_masked_dense_kernel_runs_under_autocast_like_the_model():
    torch.manual_seed(0)
    net = nn.Sequential(_pruned(nn.Linear(16, 8)), nn.ReLU(), _pruned(nn.Linear(8, 4))).eval()
    fast = bs.export.compile(net, kernel="dense")
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fast(x), net(x))


# ----- the C++ entry point checks everything itself ---------------------------------------------------------
def _csr(rows=5, cols=7):
    torch.manual_seed(0)
    w = torch.randn(rows, cols) * (torch.rand(rows, cols) < 0.5)
    c = w.to_sparse_csr()
    return w, c.crow_indices(), c.col_indices().to(torch.int16), c.values()


def test_the_cpp_entry_point_checks_every_argument():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine")
    _cpp_or_skip()
    mod = _csrkernel._load()
    w, rp, col, val = _csr()
    x = torch.randn(7, 3)
    torch.testing.assert_close(mod.spmm_t(rp, col, val, x, None, 7, 16), w @ x)
    torch.testing.assert_close(mod.spmm_t(rp, col, val, torch.randn(7, 0), None, 7, 16), torch.zeros(5, 0))
    bad = {
        "input must have shape \\(7, batch\\), got \\[6, 3\\]": (rp, col, val, torch.randn(6, 3), None, 7, 16),
        "input must have shape \\(7, batch\\), got \\[7\\]": (rp, col, val, torch.randn(7), None, 7, 16),
        "input must be float32, got Double": (rp, col, val, x.double(), None, 7, 16),
        "input must be on the CPU, got meta": (rp, col, val, x.to("meta"), None, 7, 16),
        "input must be contiguous": (rp, col, val, x.t().contiguous().t(), None, 7, 16),
        "bias must have 5 entries, got 4": (rp, col, val, x, torch.randn(4), 7, 16),
        "bias must be contiguous": (rp, col, val, x, torch.randn(10)[::2], 7, 16),
        "bias must be float32": (rp, col, val, x, torch.randn(5).double(), 7, 16),
        "rowptr must be int64, got Int": (rp.int(), col, val, x, None, 7, 16),
        "col must be int16 or int32, got Long": (rp, col.long(), val, x, None, 7, 16),
        "val must be float32": (rp, col, val.double(), x, None, 7, 16),
        "val must be 1-d": (rp, col, val[:, None], x, None, 7, 16),
        "col and val must have one entry per non-zero": (rp, col, val[:-1], x, None, 7, 16),
        "rowptr must run from 0 to nnz": (torch.zeros_like(rp), col, val, x, None, 7, 16),
        "int16 column indices cannot address 40000 columns": (rp, col, val, torch.randn(40000, 1), None, 40000, 16),
        "grain must be >= 1": (rp, col, val, x, None, 7, 0),
    }
    for message, args in bad.items():
        with pytest.raises((TypeError, ValueError), match=message):
            mod.spmm_t(*args)
    # the Python wrapper makes a strided input contiguous instead
    torch.testing.assert_close(_csrkernel.spmm_t(rp, col, val, x.t().contiguous().t(), None, 7), w @ x)
    torch.testing.assert_close(_csrkernel.spmm(rp, col, val, x.t(), None, 7), x.t() @ w.t())


def test_the_csr_structure_is_checked_once_when_built():
    w, rp, col, val = _csr()
    _csrkernel.check_csr(rp, col, val, (5, 7))
    out_of_range = col.clone()
    out_of_range[0] = 7
    decreasing = rp.clone()
    decreasing[1], decreasing[2] = decreasing[2], decreasing[1] - 1
    for args, err, message in [
        ((rp, out_of_range, val, (5, 7)), ValueError, r"column indices must be in \[0, 7\)"),
        ((rp, -col - 1, val, (5, 7)), ValueError, r"column indices must be in \[0, 7\)"),
        ((decreasing, col, val, (5, 7)), ValueError, "rowptr must be non-decreasing from 0 to nnz"),
        ((rp, col, val, (4, 7)), ValueError, r"a \(4, 7\) matrix needs 5 row pointers"),
        ((rp, col, val[:-1], (5, 7)), ValueError, "one value per column index"),
        ((rp, col.long(), val, (5, 7)), TypeError, "int16/int32 col"),
        ((rp, col, val.to("meta"), (5, 7)), ValueError, "val must be a contiguous 1-d CPU tensor"),
        ((rp, col, val, (5, 40000)), ValueError, "int16 column indices cannot address 40000 columns"),
    ]:
        with pytest.raises(err, match=message):
            _csrkernel.check_csr(*args)
