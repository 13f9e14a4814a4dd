"""Inference kernels for thresholded models: masked dense, torch CSR, torch BSR and a C++ CSR kernel.

:func:`compile` turns a thresholded (or exported dense) model into an inference-only copy in which each
Linear and Conv layer runs on the kernel that is fastest for it at a given batch size and thread count
(``kernel="auto"`` times the candidates that can win on that layer, once per layer shape and density),
so the compiled model is never slower than the dense one at that setting, up to timing noise.
Convolutions run as im2col (``F.unfold``) times a sparse matrix, laid out so that the sparse kernels read
the columns and write the output without a transpose at batch size 1; grouped convolutions and Conv3d
stay on the masked dense kernel. A dense convolution can also run as ``"dense_native"``: torch's own
convolution with oneDNN switched off for the call, which is several times faster for small convolutions
at batch 1 (oneDNN sets up each call afresh: about 25 us on this project's CPU; ``kernel="auto"`` times it
beside oneDNN for every convolution on the CPU, the kept dense ones included).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
import warnings
from typing import Any, Callable, Optional

import numpy as np

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_module, check_number, check_positive_int
from ..layers.base import SUPPORTED_DENSE_TYPES, replace_each_
from . import _csrkernel
from .dense import dense_copy

__all__ = ["DENSE_NATIVE", "KERNELS", "SparseKernel", "compile", "kernel_report"]

logger = logging.getLogger(__name__)

KERNELS = ("dense", "csr", "bsr", "fast_csr")
#: The dense convolution run with oneDNN off (torch's native kernel): a kernel for convolutions on the CPU,
#: beside :data:`KERNELS` (which are weight formats).
DENSE_NATIVE = "dense_native"
#: The kernels that run the torch layer itself (no im2col, no weight format of their own).
_TORCH_KINDS = ("dense", DENSE_NATIVE)
_BSR_BLOCK = 4


class _Matmul(nn.Module):
    """``x @ W^T + b`` for x of shape (batch, in) with W stored in one of the kernel formats.

    The storage keeps the weight's dtype and device (``fast_csr``: float32 on the CPU only). Inputs are not
    checked here: :class:`SparseKernel` checks them before calling.
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor], kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.out_features, self.in_features = weight.shape
        w = weight.detach()
        self.dtype, self.device = w.dtype, w.device
        self.bias = None if bias is None else bias.detach().to(w.dtype).clone().contiguous()
        warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta", category=UserWarning)
        if kind == "dense":
            self.weight = w.contiguous()
        elif kind == "csr":
            self.weight = w.to_sparse_csr()
        elif kind == "bsr":
            self.weight = w.to_sparse_bsr((_BSR_BLOCK, _BSR_BLOCK))
        elif kind == "fast_csr":
            if w.dtype != torch.float32 or w.device.type != "cpu":
                raise TypeError(f"kernel 'fast_csr' runs float32 weights on the CPU, got {w.dtype} on {w.device}")
            c = w.to_sparse_csr()
            self.rowptr = c.crow_indices().to(torch.int64).contiguous()
            idx_dtype = torch.int16 if self.in_features <= 32767 else torch.int32
            self.col = c.col_indices().to(idx_dtype).contiguous()
            self.val = c.values().contiguous()
            _csrkernel.check_csr(self.rowptr, self.col, self.val, (self.out_features, self.in_features))
        else:
            raise ValueError(f"unknown kernel {kind!r}; known: {', '.join(KERNELS)}")

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "dense":
            return F.linear(x, self.weight, self.bias)
        if self.kind == "fast_csr":
            return _csrkernel.spmm(self.rowptr, self.col, self.val, x, self.bias, self.in_features)
        y = torch.mm(self.weight, x.t()).t()
        return y + self.bias if self.bias is not None else y

    def forward_t(self, xt: Tensor) -> Tensor:
        """``W @ xt + b[:, None]`` for xt of shape (in, n): the layout of im2col columns (no transposes)."""
        if self.kind == "fast_csr":
            return _csrkernel.spmm_t(self.rowptr, self.col, self.val, xt, self.bias, self.in_features)
        y = torch.mm(self.weight, xt)
        return y + self.bias[:, None] if self.bias is not None else y


@functools.lru_cache(maxsize=None)
def _runs(kind: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``kind`` runs weights of ``dtype`` on ``device``: ``fast_csr`` is float32 on the CPU (and a
    compiler); torch's sparse kernels are tried once on a small matrix (on the CPU they lack float16 and
    bfloat16, for one)."""
    if kind == "dense":
        return True
    if kind == "fast_csr":
        return dtype == torch.float32 and device.type == "cpu" and _csrkernel.available()
    if not (dtype.is_floating_point or dtype.is_complex):
        return False
    try:
        w = torch.eye(2 * _BSR_BLOCK, dtype=dtype, device=device)
        mm = _Matmul(w, torch.zeros(2 * _BSR_BLOCK, dtype=dtype, device=device), kind)
        x = torch.ones(3, 2 * _BSR_BLOCK, dtype=dtype, device=device)
        return bool(torch.equal(mm(x), x)) and bool(torch.equal(mm.forward_t(x.t()), x.t()))
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False


def _supported(layer: nn.Module, kind: str) -> bool:
    """Whether ``kind`` can run ``layer``: its geometry, and its weight's dtype and device."""
    if kind == "dense":
        return True
    if kind == DENSE_NATIVE:  # only where there is a oneDNN to switch off
        return (isinstance(layer, nn.modules.conv._ConvNd) and layer.weight.device.type == "cpu"
                and torch.backends.mkldnn.is_available())
    if not _runs(kind, layer.weight.dtype, layer.weight.device):
        return False
    if isinstance(layer, (nn.Conv3d,)) or (isinstance(layer, nn.modules.conv._ConvNd) and layer.groups != 1):
        return False
    if isinstance(layer, nn.modules.conv._ConvNd) and isinstance(layer.padding, str):
        return False
    if kind == "bsr":
        rows, cols = layer.weight.shape[0], layer.weight[0].numel()
        return rows % _BSR_BLOCK == 0 and cols % _BSR_BLOCK == 0
    return True


class SparseKernel(nn.Module):
    """Inference-only stand-in for one Linear/Conv1d/Conv2d layer, running on ``kind``.

    Every call checks its input before running the kernel: a tensor of the layer's dtype, on its device,
    with the layer's in-features in the last dimension (Linear) or shaped (N, C, *spatial) or (C, *spatial)
    with the layer's in-channels (convolutions). Any strides are accepted (non-contiguous views,
    channels-last): the kernels that need a contiguous input copy it.

    Attributes:
        kind: The kernel (one of :data:`KERNELS`).
        timings: Seconds per call of each candidate when chosen by ``kernel="auto"`` (else empty).
        cached: Whether ``timings`` were measured on an earlier layer of the same shape and density.
        density: Fraction of non-zero weights.
        name: The layer's name in the compiled model (set by :func:`compile`; used in error messages).
    """

    def __init__(self, layer: nn.Module, kind: str) -> None:
        super().__init__()
        if not _supported(layer, kind):
            raise ValueError(f"kernel {kind!r} does not support {type(layer).__name__} with this geometry, dtype "
                             f"({layer.weight.dtype}) or device ({layer.weight.device})")
        self.kind = kind
        self.source_type = type(layer).__name__
        self.name = ""
        self._weight_shape = tuple(layer.weight.shape)
        self.timings: dict[str, float] = {}
        self.cached = False
        w = layer.weight.detach()
        self.density = float((w != 0).float().mean())
        self.conv = isinstance(layer, nn.modules.conv._ConvNd)
        self.nd = len(layer.kernel_size) if self.conv else 0
        self._n_in = layer.in_channels if self.conv else layer.in_features  # checked on every call
        if self.conv and kind not in _TORCH_KINDS:
            self.kernel_size, self.stride = layer.kernel_size, layer.stride
            self.padding, self.dilation, self.padding_mode = layer.padding, layer.dilation, layer.padding_mode
            self.out_channels = layer.out_channels
            self.mm = _Matmul(w.reshape(w.shape[0], -1), layer.bias, kind)
        elif self.conv:  # masked dense convolution: torch's own kernel (dense_native: with oneDNN off)
            self.layer = copy.deepcopy(layer).eval()
            for p in self.layer.parameters():
                p.requires_grad_(False)
        else:
            self.mm = _Matmul(w, layer.bias, kind)
        self._refresh()

    @property
    def _torch_conv(self) -> bool:
        """Whether this runs a torch convolution layer (``dense`` or ``dense_native`` on a conv)."""
        return self.conv and self.kind in _TORCH_KINDS

    def _describe(self) -> str:
        name = f" {self.name!r}" if self.name else ""
        return f"compiled {self.source_type}{name} (kernel {self.kind!r})"

    def _refresh(self) -> None:
        """Cache the dtype and device inputs must have (read on every call; ``nn.Module`` attribute lookups of
        submodules are slow): the kernel's storage, or the torch layer's weight for a dense convolution."""
        store = self.layer.weight if self._torch_conv else self.mm
        self._dtype, self._device = store.dtype, store.device

    def _apply(self, fn: Callable, recurse: bool = True) -> "SparseKernel":
        out = super()._apply(fn, recurse)  # .to(), .double(), ...: moves a dense convolution's torch layer
        self._refresh()
        return out

    def _refuse(self, x: Any) -> None:
        """Raise the error that says why ``x`` is no input for this layer (type, dtype, device, then shape);
        return when it is one after all (another dtype under autocast, on the masked dense kernel)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{self._describe()} expects a torch.Tensor input, got {type(x).__name__}")
        dtype, device = self._dtype, self._device
        if x.dtype != dtype and not (self.kind in _TORCH_KINDS and torch.is_autocast_enabled(x.device.type)):
            raise TypeError(f"{self._describe()} expects {dtype} inputs (the dtype of its weights), got "
                            f"{x.dtype}; convert the input with x.to({dtype}), or compile the model in the "
                            "input's dtype")
        if x.device != device:
            raise ValueError(f"{self._describe()} has its weights on {device}, got an input on {x.device}; "
                             f"move the input with x.to('{device}')")
        d, n = x.dim(), self._n_in
        if not self.conv:
            if d == 0 or x.shape[-1] != n:
                raise ValueError(f"{self._describe()} expects inputs of shape (..., {n}) ({n} in-features), got "
                                 f"shape {tuple(x.shape)}")
        elif (d != self.nd + 1 and d != self.nd + 2) or x.shape[-self.nd - 1] != n:
            spatial = ", ".join("DHW"[3 - self.nd:])
            raise ValueError(f"{self._describe()} expects inputs of shape (N, {n}, {spatial}) or ({n}, {spatial}) "
                             f"({n} in-channels), got shape {tuple(x.shape)}")

    def _conv(self, x: Tensor) -> Tensor:
        if x.dim() == self.nd + 1:  # unbatched input, as torch's convolutions accept
            return self._conv(x.unsqueeze(0)).squeeze(0)
        xt, b, oh, ow = self.columns(x)
        yt = self.mm.forward_t(xt)  # (O, B*L)
        if b == 1:
            y = yt.reshape(1, self.out_channels, oh, ow)
        else:
            y = yt.reshape(self.out_channels, b, oh * ow).transpose(0, 1).reshape(b, self.out_channels, oh, ow)
        return y.squeeze(2) if self.nd == 1 else y

    def columns(self, x: Tensor) -> tuple[Tensor, int, int, int]:
        """im2col of a batched input, the first step of a sparse convolution.

        Returns:
            ``(xt, batch, out_height, out_width)`` with ``xt`` of shape (C*kh*kw, batch*L) (a view of
            ``F.unfold``'s output at batch 1).

        Raises:
            ValueError: the input is smaller than the (dilated) kernel, after padding.
        """
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
        oh = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
        ow = (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
        if oh < 1 or ow < 1:
            size = tuple(x.shape[4 - self.nd:])
            raise ValueError(f"{self._describe()}: an input of spatial size {size}"
                             f"{'' if self.padding_mode == 'zeros' else ' (after padding)'} is smaller than the "
                             f"kernel (kernel_size={self.kernel_size}, dilation={self.dilation}, "
                             f"padding={self.padding})")
        cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (B, C*kh*kw, L)
        xt = cols[0] if b == 1 else cols.transpose(0, 1).reshape(cols.shape[1], -1)
        return xt, b, oh, ow

    def forward(self, x: Tensor) -> Tensor:
        # the checks run on every call: the cheap tests inline, the error messages in _refuse
        if not (isinstance(x, Tensor) and x.dtype == self._dtype and x.device == self._device):
            self._refuse(x)
        d = x.dim()
        if not self.conv:
            if d == 0 or x.shape[-1] != self._n_in:
                self._refuse(x)
            if d == 2 or self.kind == "dense":  # F.linear takes any leading dims: the very op of nn.Linear
                return self.mm(x)
            shape = x.shape
            return self.mm(x.reshape(-1, shape[-1])).reshape(*shape[:-1], self.mm.out_features)
        if (d != self.nd + 1 and d != self.nd + 2) or x.shape[-self.nd - 1] != self._n_in:
            self._refuse(x)
        if self.kind == "dense":
            return self.layer(x)
        if self.kind == DENSE_NATIVE:
            return self._native(x)
        return self._conv(x)

    def _native(self, x: Tensor) -> Tensor:
        """The torch convolution with oneDNN off for this call (the flag is process-wide: another thread's
        convolution during this call also runs without oneDNN, which changes its speed, not its meaning)."""
        prev = torch._C._get_mkldnn_enabled()
        torch._C._set_mkldnn_enabled(False)  # what torch.backends.mkldnn.flags does, without its ~5 us
        try:
            return self.layer(x)
        finally:
            torch._C._set_mkldnn_enabled(prev)

    @property
    def weight(self) -> Tensor:
        """The dense weight, rebuilt from the kernel's storage, for code that reads ``layer.weight`` instead of
        calling the layer (``nn.MultiheadAttention`` reads ``out_proj.weight``); shaped like the original."""
        if self._torch_conv:
            return self.layer.weight
        mm = self.mm
        if mm.kind == "dense":
            w = mm.weight
        elif mm.kind == "fast_csr":
            w = torch.sparse_csr_tensor(mm.rowptr, mm.col.long(), mm.val, (mm.out_features, mm.in_features),
                                        check_invariants=False).to_dense()  # checked when built
        else:
            w = mm.weight.to_dense()
        return w.reshape(self._weight_shape)

    @property
    def bias(self) -> Optional[Tensor]:
        """The bias (``None`` when the layer has none)."""
        return self.layer.bias if self._torch_conv else self.mm.bias

    def extra_repr(self) -> str:
        return f"{self.source_type}, kernel={self.kind}, density={self.density:.4f}"


#: Per-call measurement time per round of :func:`_time_candidates` (calls are repeated to fill it).
_ROUND_S = 2e-3
#: Rounds of measurement for the candidates still in the race (their median is kept).
_ROUNDS = 5
#: After the first round, a candidate slower than this multiple of the fastest one is out of the race.
_DROP_FACTOR = 2.0
#: BSR is timed only when the non-zero 4x4 blocks are at least this full on average: below, it does more
#: than twice CSR's multiply-adds (every stored block is dense) and never wins (``benchmarks/kernels.py``).
_BSR_MIN_FILL = 0.5


class _Threads:
    """``with _Threads(n):`` runs torch on n threads and restores the previous count."""

    def __init__(self, n: int) -> None:
        self.n, self.prev = n, torch.get_num_threads()

    def __enter__(self) -> None:
        self.prev = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.prev)


def _per_call(fn: Callable[[], Any], reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def _time_candidates(kinds: list[str], make: Callable[[str], Callable[[], Any]],
                     floor: Optional[Callable[[], Any]] = None) -> dict[str, float]:
    """Seconds per call of each candidate, spending time only on those that can still win.

    Each candidate is called once (warm-up, which also sizes its rounds), then measured in interleaved
    rounds of about ``_ROUND_S`` (the call repeated to fill it). After the first round, candidates slower
    than ``_DROP_FACTOR`` x the fastest are dropped (their first-round time is reported); the others get
    ``_ROUNDS`` rounds, of which the median is kept.

    Args:
        kinds: The candidates; ``"dense"`` first, it is always timed.
        make: Kernel name -> a call of it on the timing input (made only for the candidates timed).
        floor: A cost every im2col candidate pays (for convolutions): measured beside dense first, and when
            it alone takes as long as dense, no candidate that pays it is timed (``dense_native`` still is).

    Returns:
        Kernel name -> seconds per call, for the candidates timed.
    """
    reps: dict[str, int] = {}
    samples: dict[str, list[float]] = {}
    calls: dict[str, Callable[[], Any]] = {} if floor is None else {"(floor)": floor}

    def measure(names: list[str]) -> None:
        for k in names:
            if k not in reps:
                calls.setdefault(k, make(k) if k != "(floor)" else floor)
                reps[k] = max(1, min(10_000, int(_ROUND_S / max(_per_call(calls[k], 1), 1e-9))))
        for k in names:
            samples.setdefault(k, []).append(_per_call(calls[k], reps[k]))

    others = [k for k in kinds if k != "dense"]
    if floor is not None:
        measure(["dense", "(floor)"])
        if samples["(floor)"][0] >= samples["dense"][0]:
            kinds = [k for k in kinds if k in _TORCH_KINDS]
            others = [k for k in others if k == DENSE_NATIVE]
            if not others:
                return {"dense": samples["dense"][0]}
        measure(others)
    else:
        measure(["dense", *others])
    best = min(samples[k][0] for k in kinds)
    alive = [k for k in kinds if samples[k][0] <= _DROP_FACTOR * best]
    for _ in range(_ROUNDS - 1):
        measure(alive)
    return {k: float(np.median(samples[k])) if k in alive else samples[k][0] for k in kinds}


def _candidates(layer: nn.Module) -> list[str]:
    """The kernels that can run ``layer`` and can win: BSR only with well-filled blocks; ``dense_native`` for
    convolutions on the CPU."""
    kinds = [k for k in KERNELS + (DENSE_NATIVE,) if _supported(layer, k)]
    if "bsr" in kinds:
        w = layer.weight.detach()
        w = w.reshape(w.shape[0], -1)
        blocks = (w != 0).reshape(w.shape[0] // _BSR_BLOCK, _BSR_BLOCK, -1, _BSR_BLOCK).any(dim=(1, 3))
        nnz, nblocks = int((w != 0).sum()), int(blocks.sum())
        if nblocks == 0 or nnz < _BSR_MIN_FILL * nblocks * _BSR_BLOCK ** 2:
            kinds.remove("bsr")
    return kinds


def _timing_key(layer: nn.Module, x: Tensor, threads: int, kinds: list[str]) -> tuple:
    """Layers with equal keys get equal timings: same type, geometry, input shape, thread count,
    candidates, and density within a factor of 2**(1/4)."""
    w = layer.weight
    nnz = int((w != 0).sum())
    bucket = round(4 * math.log2(nnz / w.numel())) if nnz else None
    geometry = ()
    if isinstance(layer, nn.modules.conv._ConvNd):
        geometry = (layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups, layer.padding_mode)
    return (type(layer).__name__, tuple(w.shape), layer.bias is not None, geometry, tuple(x.shape), str(x.dtype),
            threads, tuple(kinds), bucket)


@torch.no_grad()
def compile(model: nn.Module, kernel: str = "auto", batch_size: int = 1, threads: int = 1,
            example_input: Optional[Tensor] = None, max_density: float = 0.5,
            timing_cache: Optional[dict] = None) -> nn.Module:
    """An inference-only copy of ``model`` whose Linear/Conv layers run on sparse kernels.

    Args:
        model: A thresholded sparse model (``threshold_``) or a plain model with pruned (zero) weights.
        kernel: ``"dense"`` (masked dense), ``"csr"`` / ``"bsr"`` (torch sparse, BSR with 4x4 blocks),
            ``"fast_csr"`` (this package's C++ kernel), ``"dense_native"`` (convolutions on the CPU: torch's
            dense convolution with oneDNN off, see the module's docstring) or ``"auto"``: per layer, the
            fastest of those that support it and can win, timed at ``batch_size`` and ``threads`` (see
            below). A layer a kernel cannot run (its geometry, dtype or device) stays dense.
        batch_size: Batch size to time at (``"auto"``).
        threads: Thread count to time at (``"auto"``); the compiled model does not change torch's setting.
        example_input: One input batch; needed by ``"auto"`` when the model has convolutions (to know
            their spatial size). Its batch dimension is replaced by ``batch_size``.
        max_density: Layers denser than this stay on a dense kernel whatever ``kernel`` says (sparse
            formats cannot win there, and converting, say, an unpruned 100M-weight layer costs minutes);
            ``"auto"`` still times ``dense_native`` against ``dense`` for such a convolution.
        timing_cache: A dict to keep ``"auto"``'s timings in, to share them across calls (e.g. compiling
            several models on the same machine); by default each call has its own.

    ``kernel="auto"`` times only candidates that can win: ``dense_native`` only for CPU convolutions, BSR
    only when the mask's 4x4 blocks are at
    least half full; for a convolution, the im2col step that every sparse kernel runs is timed beside the
    dense convolution first, and when it alone is as slow, nothing else is timed; after a first short
    round, candidates over twice as slow as the fastest are dropped. Timings are kept by layer type,
    geometry, input shape, thread count and density (within 2**(1/4)), so layers of the same shape (the
    repeated blocks of a ResNet, say) are timed once.

    Each compiled layer keeps its weight's dtype and device: a float64 (or bfloat16, float16) model
    compiles to kernels of that dtype, which take inputs of that dtype. ``"fast_csr"`` runs float32 on the
    CPU only; torch's CSR/BSR kernels run what torch supports (on the CPU, not float16 or bfloat16); layers
    whose dtype a kernel does not run stay dense. On every call, a compiled layer checks its input's
    dtype, device and size (in-features, or in-channels and rank) and raises ``TypeError`` (dtype) or
    ``ValueError`` (device, size) naming what it expects; inputs of any strides (transposed or sliced
    views, channels-last) are accepted.

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
    if kernel not in KERNELS + (DENSE_NATIVE, "auto"):
        raise ValueError(f"unknown kernel {kernel!r}; known: auto, {', '.join(KERNELS + (DENSE_NATIVE,))}")
    check_positive_int(batch_size, "batch_size")
    check_positive_int(threads, "threads")
    if timing_cache is not None and not isinstance(timing_cache, dict):
        raise TypeError(f"timing_cache must be a dict or None, got {type(timing_cache).__name__}")
    cache: dict = {} if timing_cache is None else timing_cache
    dense = dense_copy(model)
    dense.eval()
    layers = [(n, m) for n, m in dense.named_modules(remove_duplicate=False) if isinstance(m, SUPPORTED_DENSE_TYPES)]
    inputs: dict[str, torch.Size] = {}
    if kernel == "auto":
        if example_input is None:
            if any(not isinstance(m, nn.Linear) for _, m in layers):
                raise ValueError("kernel='auto' needs example_input=<one input batch> to time convolutions")
        else:
            hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.__setitem__(n, args[0].shape))
                     for n, m in dict(layers).items()]
            dense(example_input)
            for h in hooks:
                h.remove()

    def choose(name: str, layer: nn.Module) -> SparseKernel:
        made = pick(name, layer)
        made.name = name
        return made

    def pick(name: str, layer: nn.Module) -> SparseKernel:
        too_dense = float((layer.weight != 0).float().mean()) > max_density
        # a dense layer stays on a torch kernel: dense_native when asked for (or, under auto, timed below)
        if too_dense and kernel != DENSE_NATIVE and not (kernel == "auto" and _supported(layer, DENSE_NATIVE)):
            return SparseKernel(layer, "dense")
        if kernel != "auto":
            if _supported(layer, kernel):
                return SparseKernel(layer, kernel)
            logger.info("compile: %s stays dense: kernel %r does not run %s with this geometry, dtype (%s) or "
                        "device (%s)", name, kernel, type(layer).__name__, layer.weight.dtype, layer.weight.device)
            return SparseKernel(layer, "dense")
        like = dict(dtype=layer.weight.dtype, device=layer.weight.device)
        if name in inputs:
            shape = inputs[name]
            if isinstance(layer, nn.modules.conv._ConvNd) and len(shape) == len(layer.kernel_size) + 1:
                shape = (1, *shape)  # an unbatched example
            x = torch.randn(batch_size, *shape[1:], **like)
        elif isinstance(layer, nn.Linear):
            x = torch.randn(batch_size, layer.in_features, **like)
        else:  # a convolution the example forward did not reach: nothing to time it on
            return SparseKernel(layer, "dense")
        kinds = ["dense", DENSE_NATIVE] if too_dense else _candidates(layer)
        key = _timing_key(layer, x, threads, kinds)
        cached = key in cache
        made: dict[str, SparseKernel] = {}

        def get(kind: str) -> SparseKernel:
            if kind not in made:
                made[kind] = SparseKernel(layer, kind)
            return made[kind]

        if not cached:
            floor = None
            im2col = [k for k in kinds if k not in _TORCH_KINDS]
            if im2col and isinstance(layer, nn.modules.conv._ConvNd):
                probe = get(im2col[0])  # a sparse convolution: its im2col step is the floor
                floor = lambda: probe.columns(x)  # noqa: E731
            with _Threads(threads):
                cache[key] = _time_candidates(kinds, lambda kind: (lambda m=get(kind): m(x)), floor)
        timings = dict(cache[key])
        best_kind = min(timings, key=timings.get)
        best = get(best_kind)
        best.timings, best.cached = timings, cached
        logger.info("compile: %s -> %s (%s%s)", name, best.kind, timings, ", cached" if cached else "")
        return best

    # a layer used at several places gets one kernel
    return replace_each_(dense, lambda _, m: isinstance(m, SUPPORTED_DENSE_TYPES), choose)


def kernel_report(model: nn.Module) -> list[dict[str, Any]]:
    """For each :class:`SparseKernel` in a compiled model: name, layer type, kernel, density, timings, and
    whether those timings were reused from a layer of the same shape (``cached``)."""
    return [{"name": n, "type": m.source_type, "kernel": m.kind, "density": m.density, "timings": m.timings,
             "cached": m.cached} for n, m in model.named_modules() if isinstance(m, SparseKernel)]
