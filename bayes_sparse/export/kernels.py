"""Inference kernels for thresholded models: masked dense, torch CSR, torch BSR and a C++ CSR kernel.

:func:`compile` turns a thresholded (or exported dense) model into an inference-only copy in which each
Linear and Conv layer runs on the kernel that is fastest for it at a given batch size and thread count
(``kernel="auto"`` times the candidates on that layer), so the compiled model is never slower than the
dense one at that setting, up to timing noise. Convolutions run as im2col (``F.unfold``) times a sparse
matrix; grouped convolutions and Conv3d stay on the masked dense kernel.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_module, check_number, check_positive_int
from ..layers.base import SUPPORTED_DENSE_TYPES, replace_each_
from . import _csrkernel
from .dense import dense_copy

__all__ = ["KERNELS", "SparseKernel", "compile", "kernel_report"]

logger = logging.getLogger(__name__)

KERNELS = ("dense", "csr", "bsr", "fast_csr")
_BSR_BLOCK = 4


class _Matmul(nn.Module):
    """``x @ W^T + b`` for x of shape (batch, in) with W stored in one of the kernel formats."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.detach().clone().float().contiguous()
        w = weight.detach().float()
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        if kind == "dense":
            self.weight = w.contiguous()
        elif kind == "csr":
            self.weight = w.to_sparse_csr()
        elif kind == "bsr":
            self.weight = w.to_sparse_bsr((_BSR_BLOCK, _BSR_BLOCK))
        elif kind == "fast_csr":
            c = w.to_sparse_csr()
            self.rowptr = c.crow_indices().to(torch.int64)
            idx_dtype = torch.int16 if self.in_features <= 32767 else torch.int32
            self.col = c.col_indices().to(idx_dtype)
            self.val = c.values().contiguous()
        else:
            raise ValueError(f"unknown kernel {kind!r}; known: {', '.join(KERNELS)}")

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "dense":
            return F.linear(x, self.weight, self.bias)
        if self.kind == "fast_csr":
            return _csrkernel.spmm(self.rowptr, self.col, self.val, x.contiguous(), self.bias)
        y = torch.mm(self.weight, x.t()).t()
        return y + self.bias if self.bias is not None else y


def _supported(layer: nn.Module, kind: str) -> bool:
    if kind == "dense":
        return True
    if isinstance(layer, (nn.Conv3d,)) or (isinstance(layer, nn.modules.conv._ConvNd) and layer.groups != 1):
        return False
    if isinstance(layer, nn.modules.conv._ConvNd) and isinstance(layer.padding, str):
        return False
    if kind == "bsr":
        rows, cols = layer.weight.shape[0], layer.weight[0].numel()
        return rows % _BSR_BLOCK == 0 and cols % _BSR_BLOCK == 0
    if kind == "fast_csr":
        return _csrkernel.available()
    return True


class SparseKernel(nn.Module):
    """Inference-only stand-in for one Linear/Conv1d/Conv2d layer, running on ``kind``.

    Attributes:
        kind: The kernel (one of :data:`KERNELS`).
        timings: Seconds per call of each candidate when chosen by ``kernel="auto"`` (else empty).
        density: Fraction of non-zero weights.
    """

    def __init__(self, layer: nn.Module, kind: str) -> None:
        super().__init__()
        if not _supported(layer, kind):
            raise ValueError(f"kernel {kind!r} does not support {type(layer).__name__} with this geometry")
        self.kind = kind
        self.source_type = type(layer).__name__
        self._weight_shape = tuple(layer.weight.shape)
        self.timings: dict[str, float] = {}
        w = layer.weight.detach()
        self.density = float((w != 0).float().mean())
        self.conv = isinstance(layer, nn.modules.conv._ConvNd)
        if self.conv and kind != "dense":
            self.nd = len(layer.kernel_size)
            self.kernel_size, self.stride = layer.kernel_size, layer.stride
            self.padding, self.dilation, self.padding_mode = layer.padding, layer.dilation, layer.padding_mode
            self.out_channels = layer.out_channels
            self.mm = _Matmul(w.reshape(w.shape[0], -1), layer.bias, kind)
        elif self.conv:
            self.layer = copy.deepcopy(layer).eval()  # masked dense convolution: torch's own kernel
            for p in self.layer.parameters():
                p.requires_grad_(False)
        else:
            self.mm = _Matmul(w, layer.bias, kind)

    def _conv(self, x: Tensor) -> Tensor:
        if x.dim() == self.nd + 1:  # unbatched input, as torch's convolutions accept
            return self._conv(x.unsqueeze(0)).squeeze(0)
        if self.nd == 1:  # treat as 2-d with a height of one
            x = x.unsqueeze(2)
            k, s, p, d = (1, *self.kernel_size), (1, *self.stride), (0, *self.padding), (1, *self.dilation)
        else:
            k, s, p, d = self.kernel_size, self.stride, self.padding, self.dilation
        if self.padding_mode != "zeros":
            pads = [q for q in reversed(p) for _ in range(2)]
            x = F.pad(x, pads, mode="circular" if self.padding_mode == "circular" else self.padding_mode)
            p = (0, 0)
        b, _, h, w = x.shape
        cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (B, C*kh*kw, L)
        oh = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
        ow = (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
        y = self.mm(cols.transpose(1, 2).reshape(-1, cols.shape[1]))  # (B*L, O)
        y = y.reshape(b, oh * ow, self.out_channels).transpose(1, 2).reshape(b, self.out_channels, oh, ow)
        return y.squeeze(2) if self.nd == 1 else y

    def forward(self, x: Tensor) -> Tensor:
        if not self.conv:
            if x.dim() == 2:
                return self.mm(x)
            shape = x.shape
            return self.mm(x.reshape(-1, shape[-1])).reshape(*shape[:-1], self.mm.out_features)
        if self.kind == "dense":
            return self.layer(x)
        return self._conv(x)

    @property
    def weight(self) -> Tensor:
        """The dense weight, rebuilt from the kernel's storage, for code that reads ``layer.weight`` instead of
        calling the layer (``nn.MultiheadAttention`` reads ``out_proj.weight``); shaped like the original."""
        if self.conv and self.kind == "dense":
            return self.layer.weight
        mm = self.mm
        if mm.kind == "dense":
            w = mm.weight
        elif mm.kind == "fast_csr":
            w = torch.sparse_csr_tensor(mm.rowptr, mm.col.long(), mm.val, (mm.out_features, mm.in_features)).to_dense()
        else:
            w = mm.weight.to_dense()
        return w.reshape(self._weight_shape)

    @property
    def bias(self) -> Optional[Tensor]:
        """The bias (``None`` when the layer has none)."""
        return self.layer.bias if self.conv and self.kind == "dense" else self.mm.bias

    def extra_repr(self) -> str:
        return f"{self.source_type}, kernel={self.kind}, density={self.density:.4f}"


def _time(module: nn.Module, x: Tensor, threads: int) -> float:
    from torch.utils import benchmark  # imported on use: it pulls in cpp_extension, which warns without CUDA

    t = benchmark.Timer("m(x)", globals={"m": module, "x": x}, num_threads=threads)
    return t.blocked_autorange(min_run_time=0.05).median


@torch.no_grad()
def compile(model: nn.Module, kernel: str = "auto", batch_size: int = 1, threads: int = 1,
            example_input: Optional[Tensor] = None, max_density: float = 0.5) -> nn.Module:
    """An inference-only copy of ``model`` whose Linear/Conv layers run on sparse kernels.

    Args:
        model: A thresholded sparse model (``threshold_``) or a plain model with pruned (zero) weights.
        kernel: ``"dense"`` (masked dense), ``"csr"`` / ``"bsr"`` (torch sparse, BSR with 4x4 blocks),
            ``"fast_csr"`` (this package's C++ kernel) or ``"auto"``: per layer, the fastest of those that
            support it, timed at ``batch_size`` and ``threads``. A layer a kernel cannot run stays dense.
        batch_size: Batch size to time at (``"auto"``).
        threads: Thread count to time at (``"auto"``); the compiled model does not change torch's setting.
        example_input: One input batch; needed by ``"auto"`` when the model has convolutions (to know
            their spatial size). Its batch dimension is replaced by ``batch_size``.
        max_density: Layers denser than this stay on the dense kernel whatever ``kernel`` says (sparse
            formats cannot win there, and converting, say, an unpruned 100M-weight layer costs minutes).

    Returns:
        The compiled model in eval mode; :func:`kernel_report` lists each layer's kernel and timings.

    Raises:
        ValueError: unknown kernel, bad sizes, or a conv model with ``"auto"`` and no ``example_input``.

    Example:
        >>> import bayes_sparse as bs
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 32))
        >>> fast = bs.export.compile(net, kernel="csr")
        >>> torch.allclose(fast(torch.ones(2, 64)), net(torch.ones(2, 64)), atol=1e-5)
        True
    """
    check_module(model)
    max_density = check_number(max_density, "max_density", low=0.0, high=1.0)
    if kernel not in KERNELS + ("auto",):
        raise ValueError(f"unknown kernel {kernel!r}; known: auto, {', '.join(KERNELS)}")
    check_positive_int(batch_size, "batch_size")
    check_positive_int(threads, "threads")
    dense = dense_copy(model)
    dense.eval()
    layers = [(n, m) for n, m in dense.named_modules(remove_duplicate=False) if isinstance(m, SUPPORTED_DENSE_TYPES)]
    inputs: dict[str, Tensor] = {}
    if kernel == "auto":
        if example_input is None:
            if any(not isinstance(m, nn.Linear) for _, m in layers):
                raise ValueError("kernel='auto' needs example_input=<one input batch> to time convolutions")
        else:
            hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.__setitem__(n, args[0]))
                     for n, m in dict(layers).items()]
            dense(example_input)
            for h in hooks:
                h.remove()

    def choose(name: str, layer: nn.Module) -> SparseKernel:
        if float((layer.weight != 0).float().mean()) > max_density:
            return SparseKernel(layer, "dense")
        if kernel != "auto":
            return SparseKernel(layer, kernel if _supported(layer, kernel) else "dense")
        if name in inputs:
            x = torch.randn(batch_size, *inputs[name].shape[1:], dtype=torch.float32)
        elif isinstance(layer, nn.Linear):
            x = torch.randn(batch_size, layer.in_features)
        else:  # a convolution the example forward did not reach: nothing to time it on
            return SparseKernel(layer, "dense")
        timings = {}
        best, best_t = None, float("inf")
        for kind in KERNELS:
            if not _supported(layer, kind):
                continue
            cand = SparseKernel(layer, kind)
            timings[kind] = _time(cand, x, threads)
            if timings[kind] < best_t:
                best, best_t = cand, timings[kind]
        best.timings = timings
        logger.info("compile: %s -> %s (%s)", name, best.kind, timings)
        return best

    # a layer used at several places gets one kernel
    return replace_each_(dense, lambda _, m: isinstance(m, SUPPORTED_DENSE_TYPES), choose)


def kernel_report(model: nn.Module) -> list[dict[str, Any]]:
    """For each :class:`SparseKernel` in a compiled model: name, layer type, kernel, density, timings."""
    return [{"name": n, "type": m.source_type, "kernel": m.kind, "density": m.density, "timings": m.timings}
            for n, m in model.named_modules() if isinstance(m, SparseKernel)]
