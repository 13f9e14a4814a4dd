"""A small C++ CSR kernel for CPU inference, compiled on first use with ``torch.utils.cpp_extension``.

``y^T = W x^T``: the input is transposed once to (in, batch) so that each non-zero adds a contiguous,
vectorizable row of the batch; rows of W are split across threads. Column indices are int16 when the
layer has at most 32767 inputs (less memory traffic), else int32. When no compiler is available,
:func:`available` is False and the ``"fast_csr"`` kernel is simply not offered.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch

__all__ = ["available", "spmm", "spmm_t"]

logger = logging.getLogger(__name__)

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

// xt: (in, batch) contiguous; returns yt: (out, batch), bias added.
torch::Tensor spmm_t(torch::Tensor rowptr, torch::Tensor col, torch::Tensor val, torch::Tensor xt,
                     torch::Tensor bias, int64_t grain) {
  const int64_t out_rows = rowptr.size(0) - 1, batch = xt.size(1);
  torch::Tensor yt = torch::empty({out_rows, batch}, xt.options());
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const float* v = val.data_ptr<float>();
  const float* x = xt.data_ptr<float>();
  float* y = yt.data_ptr<float>();
  at::parallel_for(0, out_rows, grain, [&](int64_t r0, int64_t r1) {
    if (col.scalar_type() == torch::kInt16)
      rows<int16_t>(rp, col.data_ptr<int16_t>(), v, x, bp, y, batch, r0, r1);
    else
      rows<int32_t>(rp, col.data_ptr<int32_t>(), v, x, bp, y, batch, r0, r1);
  });
  return yt;
}
"""

_MODULE: Optional[Any] = None
_FAILED = False


def _load() -> Optional[Any]:
    global _MODULE, _FAILED
    if _MODULE is not None or _FAILED:
        return _MODULE
    if os.environ.get("BAYES_SPARSE_NO_CPP") == "1":
        _FAILED = True
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        _MODULE = load_inline(name="bayes_sparse_csr_v2", cpp_sources=_SOURCE, functions=["spmm_t"],
                              extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                              verbose=False)
    except Exception as e:  # no compiler, no ninja, ...: the kernel is optional
        logger.warning("bayes_sparse: the C++ CSR kernel could not be built (%s); fast_csr is unavailable", e)
        _FAILED = True
    return _MODULE


def available() -> bool:
    """Whether the C++ kernel is (or can be) built on this machine."""
    return _load() is not None


def spmm(rowptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor],
         grain: int = 16) -> torch.Tensor:
    """``x @ W^T + bias`` for a CSR ``W`` (rowptr int64, col int16/int32, val float32) and ``x`` (batch, in)."""
    return spmm_t(rowptr, col, val, x.t(), bias, grain).t()


def spmm_t(rowptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, xt: torch.Tensor,
           bias: Optional[torch.Tensor], grain: int = 16) -> torch.Tensor:
    """``W @ xt + bias[:, None]`` (shape (out, n)) for a CSR ``W`` and ``xt`` of shape (in, n): the kernel's
    own layout, which im2col convolutions produce without a transpose."""
    mod = _load()
    if mod is None:
        raise RuntimeError("the C++ CSR kernel is unavailable on this machine")
    b = bias if bias is not None else torch.empty(0, dtype=xt.dtype)
    return mod.spmm_t(rowptr, col, val, xt.contiguous(), b, grain)
