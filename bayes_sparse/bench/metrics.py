"""What a benchmark run measures on its thresholded, exported model: units kept, MACs, latency, log-alpha histogram."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..export import compile as compile_sparse
from ..export import kernel_report
from ..layers.base import SUPPORTED_DENSE_TYPES, sparse_layers

__all__ = ["HIST_EDGES", "latency", "log_alpha_histogram", "macs", "units_kept"]

#: Bin edges of the stored log-alpha histograms (values outside are counted in the end bins).
HIST_EDGES = [x / 2 for x in range(-24, 25)]


def _weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SUPPORTED_DENSE_TYPES)]


def units_kept(model: nn.Module) -> list[dict[str, Any]]:
    """Per Linear/Conv layer of a dense (exported) model: output units (rows, channels) with a non-zero weight.

    Example:
        >>> lin = nn.Linear(3, 2); _ = lin.weight.data[1].zero_()
        >>> units_kept(nn.Sequential(lin))[0]["kept"]
        1
    """
    out = []
    for name, m in _weighted_layers(model):
        w = m.weight.detach()
        out.append({"name": name, "units": w.shape[0], "kept": int(w.reshape(w.shape[0], -1).ne(0).any(1).sum())})
    return out


@torch.no_grad()
def macs(model: nn.Module, example: Tensor) -> dict[str, Any]:
    """Multiply-accumulates of the Linear/Conv weights per example: dense (every weight) and kept (non-zeros).

    A weight is used once per output position: once for a Linear layer, ``H_out * W_out`` times for a 2-d
    convolution (its output's spatial size, found by running ``example``). Biases, activations and pooling
    are not counted. ``reduction`` is dense / kept, the theoretical speedup of skipping zeros.
    """
    sizes: dict[str, int] = {}
    layers = _weighted_layers(model)
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: sizes.__setitem__(n, out[0].numel() // out.shape[1]))
             for n, m in layers]
    try:
        was = model.training
        model.eval()
        model(example[:1])
        model.train(was)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for n, m in layers:
        w = m.weight.detach()
        rows.append({"name": n, "positions": sizes.get(n, 0), "dense": w.numel() * sizes.get(n, 0),
                     "kept": int(w.ne(0).sum()) * sizes.get(n, 0)})
    dense, kept = sum(r["dense"] for r in rows), sum(r["kept"] for r in rows)
    return {"dense": dense, "kept": kept, "reduction": dense / kept if kept else None, "layers": rows}


def _per_call(fn: Callable[[], Any], reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


@torch.inference_mode()
def _time_pair(dense: nn.Module, fast: nn.Module, x: Tensor, rounds: int) -> dict[str, float]:
    dense(x), fast(x)  # warm-up
    once = max(_per_call(lambda: dense(x), 1), 1e-6)
    reps = max(1, int(0.02 / once))  # about 20 ms per measurement
    t_dense, t_fast = [], []
    for _ in range(rounds):  # interleaved, so drifts of the machine hit both alike
        t_dense.append(_per_call(lambda: dense(x), reps))
        t_fast.append(_per_call(lambda: fast(x), reps))
    d, f = statistics.median(t_dense), statistics.median(t_fast)
    return {"dense_ms": 1e3 * d, "sparse_ms": 1e3 * f, "speedup": d / f}


def latency(dense: nn.Module, example: Tensor, batch_sizes: tuple[int, ...] = (1, 64),
            rounds: int = 7) -> dict[str, Any]:
    """CPU latency of ``bayes_sparse.export.compile(model, kernel="auto")`` against the dense model, one thread.

    For each batch size, the model is compiled for that batch size (``"auto"`` times each layer's kernels),
    then dense and compiled forwards alternate for ``rounds`` rounds; the medians give the speedup.

    Args:
        dense: The exported (plain torch) model with pruned weights, on the CPU.
        example: Example inputs (at least one row), on the CPU.
        batch_sizes: Batch sizes to measure.
        rounds: Interleaved rounds.

    Returns:
        ``{"batch<B>": {"dense_ms", "sparse_ms", "speedup", "kernels"}}``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dense = dense.eval()
        out: dict[str, Any] = {}
        for b in batch_sizes:
            x = example[:1].expand(b, *example.shape[1:]).contiguous()
            fast = compile_sparse(dense, kernel="auto", batch_size=b, threads=1, example_input=x)
            out[f"batch{b}"] = _time_pair(dense, fast, x, rounds)
            out[f"batch{b}"]["kernels"] = {r["name"]: r["kernel"] for r in kernel_report(fast)}
        return out
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def log_alpha_histogram(model: nn.Module) -> dict[str, Any] | None:
    """Histogram of every sparse layer's ``log_alpha`` (Sparse VD's log alpha, L0's gate log alpha), or None.

    Counts are over :data:`HIST_EDGES`, values beyond the edges counted in the end bins.
    """
    values = [layer.log_alpha.detach().flatten().float().cpu() for _, layer in sparse_layers(model)
              if isinstance(getattr(layer, "log_alpha", None), Tensor)]
    if not values:
        return None
    v = torch.cat(values).clamp(HIST_EDGES[0], HIST_EDGES[-1])
    counts = torch.histogram(v, bins=torch.tensor(HIST_EDGES)).hist
    return {"edges": HIST_EDGES, "counts": [int(c) for c in counts]}
