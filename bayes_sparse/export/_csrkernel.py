"""A small C++ CSR kernel for CPU inference, compiled on first use with ``torch.utils.cpp_extension``.

``y^T = W x^T``: the input is transposed once to (in, batch) so that each non-zero adds a contiguous,
vectorizable row of the batch; rows of W are split across threads. Column indices are int16 when the
layer has at most 32767 inputs (less memory traffic), else int32. When no compiler is available,
:func:`available` is False and the ``"fast_csr"`` kernel is simply not offered.

The kernel is float32-only and CPU-only. Its entry point checks every argument with ``TORCH_CHECK``
(dims, sizes, dtypes, devices, contiguity, and the ends of the row pointer) on each call; the O(nnz)
checks of the CSR structure (row pointer monotone, column indices in range) run once, when the matrix is
built, in :func:`check_csr`. The extension is built under a name derived from a hash of its source, so
each version of the source gets its own build (never a stale cached one).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._cppext import Extension

__all__ = ["available", "check_csr", "spmm", "spmm_t"]


_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>

template <typename Index>
static void rows(const int64_t* rowptr, const Index* col, const float* val, const float* xt, const float* bias,
                 float* yt, int64_t batch, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float* out = yt + r * batch;
    const float b0 = bias ? bias[r] : 0.f;
    const int64_t s = rowptr[r], e = rowptr[r + 1];
    if (batch == 1) {
      float acc0 = 0.f, acc1 = 0.f, acc2 = 0.f, acc3 = 0.f;
      int64_t j = s;
      for (; j + 3 < e; j += 4) {
        acc0 += val[j] * xt[col[j]];
        acc1 += val[j + 1] * xt[col[j + 1]];
        acc2 += val[j + 2] * xt[col[j + 2]];
        acc3 += val[j + 3] * xt[col[j + 3]];
      }
      for (; j < e; ++j) acc0 += val[j] * xt[col[j]];
      out[0] = b0 + ((acc0 + acc1) + (acc2 + acc3));
    } else {
      for (int64_t b = 0; b < batch; ++b) out[b] = b0;
      for (int64_t j = s; j < e; ++j) {
        const float v = val[j];
        const float* xr = xt + (int64_t)col[j] * batch;
        #pragma omp simd
        for (int64_t b = 0; b < batch; ++b) out[b] += v * xr[b];
      }
    }
  }
}

static void check_vector(const torch::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "fast_csr: ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 1, "fast_csr: ", name, " must be 1-d, got ", t.dim(), " dims");
  TORCH_CHECK_VALUE(t.is_contiguous(), "fast_csr: ", name, " must be contiguous");
}

// rowptr (out + 1,) int64, col (nnz,) int16/int32, val (nnz,) float32: a CSR matrix of shape (out, n_cols);
// xt: (n_cols, batch) float32 contiguous; bias: None or (out,) float32. Returns yt: (out, batch), bias added.
torch::Tensor spmm_t(torch::Tensor rowptr, torch::Tensor col, torch::Tensor val, torch::Tensor xt,
                     std::optional<torch::Tensor> bias, int64_t n_cols, int64_t grain) {
  check_vector(rowptr, "rowptr");
  check_vector(col, "col");
  check_vector(val, "val");
  TORCH_CHECK_TYPE(rowptr.scalar_type() == torch::kInt64, "fast_csr: rowptr must be int64, got ",
                   rowptr.scalar_type());
  TORCH_CHECK_TYPE(col.scalar_type() == torch::kInt16 || col.scalar_type() == torch::kInt32,
                   "fast_csr: col must be int16 or int32, got ", col.scalar_type());
  TORCH_CHECK_TYPE(val.scalar_type() == torch::kFloat32, "fast_csr: val must be float32, got ", val.scalar_type());
  TORCH_CHECK_VALUE(rowptr.size(0) >= 1, "fast_csr: rowptr must have at least one entry");
  TORCH_CHECK_VALUE(col.size(0) == val.size(0), "fast_csr: col and val must have one entry per non-zero, got ",
                    col.size(0), " and ", val.size(0));
  TORCH_CHECK_VALUE(n_cols >= 0, "fast_csr: n_cols must be >= 0, got ", n_cols);
  TORCH_CHECK_VALUE(col.scalar_type() == torch::kInt32 || n_cols <= 32768,
                    "fast_csr: int16 column indices cannot address ", n_cols, " columns");
  TORCH_CHECK_VALUE(grain >= 1, "fast_csr: grain must be >= 1, got ", grain);
  const int64_t out_rows = rowptr.size(0) - 1, nnz = col.size(0);
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(rp[0] == 0 && rp[out_rows] == nnz, "fast_csr: rowptr must run from 0 to nnz = ", nnz,
                    ", got ", rp[0], " to ", rp[out_rows]);
  TORCH_CHECK_VALUE(xt.device().is_cpu(), "fast_csr: the input must be on the CPU, got ", xt.device());
  TORCH_CHECK_TYPE(xt.scalar_type() == torch::kFloat32, "fast_csr: the input must be float32, got ",
                   xt.scalar_type());
  TORCH_CHECK_VALUE(xt.dim() == 2 && xt.size(0) == n_cols, "fast_csr: the (transposed) input must have shape (",
                    n_cols, ", batch), got ", xt.sizes());
  TORCH_CHECK_VALUE(xt.is_contiguous(), "fast_csr: the (transposed) input must be contiguous");
  const float* bp = nullptr;
  if (bias.has_value()) {
    const torch::Tensor& b = *bias;
    check_vector(b, "bias");
    TORCH_CHECK_TYPE(b.scalar_type() == torch::kFloat32, "fast_csr: bias must be float32, got ", b.scalar_type());
    TORCH_CHECK_VALUE(b.size(0) == out_rows, "fast_csr: bias must have ", out_rows, " entries, got ", b.size(0));
    bp = b.data_ptr<float>();
  }
  const int64_t batch = xt.size(1);
  torch::Tensor yt = torch::empty({out_rows, batch}, xt.options());
  const float* v = val.data_ptr<float>();
  const float* x = xt.data_ptr<float>();
  float* y = yt.data_ptr<float>();
  const bool narrow = col.scalar_type() == torch::kInt16;
  at::parallel_for(0, out_rows, grain, [&](int64_t r0, int64_t r1) {
    if (narrow)
      rows<int16_t>(rp, col.data_ptr<int16_t>(), v, x, bp, y, batch, r0, r1);
    else
      rows<int32_t>(rp, col.data_ptr<int32_t>(), v, x, bp, y, batch, r0, r1);
  });
  return yt;
}
"""

_EXTENSION = Extension("bayes_sparse_csr_", _SOURCE, ["spmm_t"], ["-O3", "-march=native", "-fopenmp"],
                       "fast_csr is unavailable")
_load = _EXTENSION.load


def available() -> bool:
    """Whether the C++ kernel is (or can be) built on this machine."""
    return _load() is not None


def check_csr(rowptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, shape: tuple[int, int]) -> None:
    """Check, once, a CSR matrix meant for :func:`spmm` (the kernel trusts its structure on every call).

    Args:
        rowptr: Row pointer, int64, ``shape[0] + 1`` entries from 0 to nnz, non-decreasing.
        col: Column indices, int16 or int32, one per non-zero, each in ``[0, shape[1])``.
        val: Values, float32, one per non-zero.
        shape: ``(rows, columns)`` of the matrix.

    Raises:
        TypeError: a dtype other than the above.
        ValueError: a wrong size, a row pointer that does not run from 0 to nnz or decreases, a column
            index out of range, or a tensor that is not a contiguous 1-d CPU tensor.
    """
    rows, cols = shape
    for name, t in (("rowptr", rowptr), ("col", col), ("val", val)):
        if t.device.type != "cpu" or t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"fast_csr: {name} must be a contiguous 1-d CPU tensor, got shape {tuple(t.shape)} "
                             f"on {t.device}")
    if rowptr.dtype != torch.int64 or col.dtype not in (torch.int16, torch.int32) or val.dtype != torch.float32:
        raise TypeError(f"fast_csr: needs int64 rowptr, int16/int32 col and float32 val, got {rowptr.dtype}, "
                        f"{col.dtype} and {val.dtype}")
    nnz = col.numel()
    if rowptr.numel() != rows + 1 or val.numel() != nnz:
        raise ValueError(f"fast_csr: a ({rows}, {cols}) matrix needs {rows + 1} row pointers and one value per "
                         f"column index, got {rowptr.numel()} row pointers, {nnz} indices and {val.numel()} values")
    if int(rowptr[0]) != 0 or int(rowptr[-1]) != nnz or bool((rowptr.diff() < 0).any()):
        raise ValueError(f"fast_csr: rowptr must be non-decreasing from 0 to nnz = {nnz}")
    if col.dtype == torch.int16 and cols > 32768:
        raise ValueError(f"fast_csr: int16 column indices cannot address {cols} columns")
    if nnz and (int(col.min()) < 0 or int(col.max()) >= cols):
        raise ValueError(f"fast_csr: column indices must be in [0, {cols}), got [{int(col.min())}, {int(col.max())}]")


def spmm(rowptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor],
         n_cols: int, grain: int = 16) -> torch.Tensor:
    """``x @ W^T + bias`` for a CSR ``W`` of ``n_cols`` columns (rowptr int64, col int16/int32, val float32)
    and a float32 CPU ``x`` of shape (batch, n_cols), any strides."""
    return spmm_t(rowptr, col, val, x.t(), bias, n_cols, grain).t()


def spmm_t(rowptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, xt: torch.Tensor,
           bias: Optional[torch.Tensor], n_cols: int, grain: int = 16) -> torch.Tensor:
    """``W @ xt + bias[:, None]`` (shape (out, n)) for a CSR ``W`` and ``xt`` of shape (n_cols, n): the kernel's
    own layout, which im2col convolutions produce without a transpose. ``xt`` is copied when not contiguous.

    Raises:
        RuntimeError: the kernel is unavailable on this machine.
        TypeError, ValueError: from the kernel's checks (a wrong dtype, device, size or structure).
    """
    mod = _load()
    if mod is None:
        raise RuntimeError("the C++ CSR kernel is unavailable on this machine")
    return mod.spmm_t(rowptr, col, val, xt.contiguous(), bias, n_cols, grain)
