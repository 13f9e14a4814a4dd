"""The encoding policy: which tensors are stored sparse and, for each weight, its value encoding (floats of
a given width, or a k-means codebook whose width ``values="auto"`` derives from the layer's posterior
standard deviation) and the cheapest of the candidate index encodings, judged by their compressed size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..layers.base import SUPPORTED_DENSE_TYPES, SparseLayer
from . import _bits, _codecs, _sparse
from ._spec import VALUE_DTYPES, WEIGHT_DTYPES

__all__ = ["AUTO_BEST_NNZ", "EFFORTS", "Encoded", "auto_bits", "check_effort", "check_finite", "check_values",
           "encode_plain", "encode_weight", "posterior_stds", "resolve_effort", "sparse_weights", "value_bits"]

#: ``save``'s ``effort`` argument: ``"auto"`` or one of the codec efforts.
EFFORTS = ("auto", *_codecs.EFFORTS)
#: ``effort="auto"`` compresses with ``"best"`` when the model keeps at most this many non-zero weights
#: (about 1 s of lzma on one core), else with ``"fast"`` (a few ns per stored byte).
AUTO_BEST_NNZ = 1 << 18


@dataclass(frozen=True)
class Encoded:
    """One state-dict entry, encoded: its header entry, the tensors to store and its line of the report."""

    entry: dict[str, Any]
    tensors: dict[str, Tensor]
    report: dict[str, Any]


def check_values(values: Any) -> None:
    """Check ``save``'s ``values`` argument.

    Args:
        values: A key of ``VALUE_DTYPES``, ``"auto"`` or an int in [1, 8] (not a bool).

    Raises:
        ValueError: anything else.
    """
    if not (values in VALUE_DTYPES or values == "auto" or (isinstance(values, int) and not isinstance(values, bool)
                                                           and 1 <= values <= 8)):
        raise ValueError(f"values must be one of {sorted(VALUE_DTYPES)}, 'auto' or an int in [1, 8], got {values!r}")


def check_effort(effort: Any) -> None:
    """Check ``save``'s ``effort`` argument.

    Raises:
        ValueError: not one of :data:`EFFORTS`.
    """
    if not isinstance(effort, str) or effort not in EFFORTS:
        raise ValueError(f"effort must be one of {EFFORTS}, got {effort!r}")


def resolve_effort(effort: str, nnz: int) -> str:
    """The codec effort for a model: ``effort`` itself, or for ``"auto"`` ``"best"`` up to
    :data:`AUTO_BEST_NNZ` non-zero weights and ``"fast"`` beyond.

    Args:
        effort: A checked ``effort`` argument.
        nnz: Non-zero weights stored sparse in the whole model.
    """
    if effort != "auto":
        return effort
    return "best" if nnz <= AUTO_BEST_NNZ else "fast"


def posterior_stds(model: nn.Module) -> dict[str, Optional[Tensor]]:
    """Each sparse layer's per-weight posterior standard deviation (``None`` for methods without a posterior).

    Args:
        model: A model (sparse layers are found by ``isinstance(m, SparseLayer)``).

    Returns:
        Module name -> ``layer.posterior_std()``.
    """
    return {name: m.posterior_std() for name, m in model.named_modules() if isinstance(m, SparseLayer)}


def sparse_weights(dense: nn.Module) -> dict[str, str]:
    """The state-dict keys that are stored sparse: the weights of Linear and Conv layers.

    Args:
        dense: A model of plain torch layers.

    Returns:
        State-dict key -> name of the module holding it.
    """
    return {f"{n}.weight" if n else "weight": n for n, m in dense.named_modules()
            if isinstance(m, SUPPORTED_DENSE_TYPES)}


def auto_bits(values: np.ndarray, std: np.ndarray, tolerance: float) -> int:
    """Smallest codebook width whose RMS error stays under ``tolerance`` x the RMS posterior std.

    Args:
        values: The kept (non-zero) weights.
        std: Their posterior standard deviations.
        tolerance: Allowed RMS error, as a multiple of the RMS std.

    Returns:
        Bits per value code, 2-8 (8 when no width meets the budget; 2 for a layer with no value left).
    """
    if values.size == 0:
        return 2
    budget = tolerance * float(np.sqrt(np.mean(std.astype(np.float64) ** 2)))
    for bits in range(2, 9):
        book, codes = _bits.kmeans_codebook(values, (1 << bits) - 1)
        if float(np.sqrt(np.mean((book[codes] - values) ** 2))) <= budget:
            return bits
    return 8


def value_bits(values: Union[str, int], nz: np.ndarray, std: Optional[np.ndarray], tolerance: float) -> int:
    """Bits per stored value of one weight.

    Args:
        values: ``save``'s ``values`` argument (already checked).
        nz: The weight's non-zero values.
        std: Their posterior standard deviations, or None (the layer has no posterior).
        tolerance: See :func:`auto_bits`.

    Returns:
        The float width for float encodings, ``values`` for a fixed codebook width, and for ``"auto"``
        :func:`auto_bits` (8 without a posterior).
    """
    if values in VALUE_DTYPES:
        return torch.finfo(VALUE_DTYPES[values]).bits
    if values in WEIGHT_DTYPES:  # a stored dtype (float64 for lossless float64 weights)
        return torch.finfo(WEIGHT_DTYPES[values]).bits
    if values == "auto":
        return 8 if std is None else auto_bits(nz, std, tolerance)
    return int(values)


def check_finite(key: str, t: Tensor, allow_nonfinite: bool) -> None:
    """Refuse NaN and infinite values in a floating-point tensor to be saved.

    Args:
        key: Its state-dict key (for the message).
        t: The tensor.
        allow_nonfinite: ``save``'s option: store them anyway.

    Raises:
        ValueError: ``t`` holds NaN or inf and ``allow_nonfinite`` is False.
    """
    if allow_nonfinite or not t.is_floating_point():
        return
    if t.element_size() == 1:  # float8: isfinite wants a wider float
        t = t.float()
    if bool(torch.isfinite(t).all()):
        return
    bad = int((~torch.isfinite(t)).sum())
    raise ValueError(f"{key!r} holds {bad} non-finite value(s) (NaN or inf) of {t.numel()}: the model is broken (a "
                     "diverged training run?); fix it, or pass allow_nonfinite=True to store them as they are "
                     "(float value encodings only)")


def _check_narrowed(key: str, before: Tensor, after: Tensor, allow_nonfinite: bool) -> None:
    """Refuse finite values that a narrower dtype turns into inf."""
    if allow_nonfinite or after.dtype == before.dtype or bool(torch.isfinite(after).all()):
        return
    if bool((torch.isfinite(before) & ~torch.isfinite(after)).any()):
        raise ValueError(f"{key!r} holds values beyond the range of {str(after.dtype)[6:]} (largest "
                         f"{torch.finfo(after.dtype).max:g}); save it with values='bfloat16' or 'float32'")


def encode_plain(key: str, t: Tensor, values: Union[str, int], allow_nonfinite: bool = False) -> Encoded:
    """A tensor stored as it is (biases, norms); lossy modes store float32 ones in half precision.

    Args:
        key: Its state-dict key.
        t: The tensor (CPU, contiguous).
        values: ``save``'s ``values`` argument: anything but ``"float32"`` halves float32 tensors (bfloat16
            for ``"bfloat16"``, else float16) and records that they load as float32.
        allow_nonfinite: Store values that halving turns into inf.

    Returns:
        The encoded entry.

    Raises:
        ValueError: halving would turn finite values into inf.
    """
    entry: dict[str, Any] = {"kind": "plain"}
    if values != "float32" and t.dtype == torch.float32:
        entry["dtype"] = "float32"
        half = t.to(VALUE_DTYPES.get(values, torch.float16))
        _check_narrowed(key, t, half, allow_nonfinite)
        t = half
    return Encoded(entry, {key: t}, {"bytes": t.numel() * t.element_size(), "encoding": f"plain {str(t.dtype)[6:]}"})


def encode_weight(key: str, t: Tensor, values: Union[str, int], std: Optional[Tensor], tolerance: float,
                  effort: str = "best", allow_nonfinite: bool = False) -> Encoded:
    """A weight stored sparse, in the cheapest encoding for its mask and values.

    The index encoding with the fewest bits before compression competes (unless it is a bitmask) with
    byte-aligned relative indices of 8 bits, which the general-purpose codecs compress best; the candidate
    with the fewest stored bytes wins (the first on a tie). Float values are stored in the weight's own
    dtype (``"float32"``, lossless: float64 weights as float64) or in the lossy 16-bit dtype asked for; a
    value that rounds to zero there is no non-zero (it loads as zero either way).

    Args:
        key: Its state-dict key.
        t: The weight (CPU, contiguous).
        values: ``save``'s ``values`` argument (already checked).
        std: The layer's posterior standard deviation (same shape as ``t``, any device), or None.
        tolerance: See :func:`auto_bits`.
        effort: How hard the codecs try, ``"best"`` or ``"fast"`` (see ``_codecs.compress``).
        allow_nonfinite: Store NaN/inf weights (float value encodings only) and values a 16-bit dtype
            turns into inf.

    Returns:
        The encoded entry; its tensors are named ``key::index``, ``key::values`` (and ``key::codebook``).

    Raises:
        ValueError: non-finite weights (without ``allow_nonfinite``; always with a codebook), or (without
            ``allow_nonfinite``) values that the lossy dtype turns into inf.
    """
    flat = t.reshape(-1)
    positions = torch.nonzero(flat).reshape(-1).numpy()
    kept = flat[torch.from_numpy(positions)]
    check_finite(key, kept, allow_nonfinite)  # (zeros are finite: the non-zeros are all there is to check)
    if values in VALUE_DTYPES:
        stored = _sparse.stored_value_dtype(t.dtype, values)
        nz_t = kept.to(WEIGHT_DTYPES[stored])
        _check_narrowed(key, kept, nz_t, allow_nonfinite)
        nonzero = nz_t != 0
        if not bool(nonzero.all()):  # rounded to zero in the stored dtype: loads as zero either way
            positions, nz_t = positions[nonzero.numpy()], nz_t[nonzero]
        nz = nz_t.float().numpy()
    else:
        if not bool(torch.isfinite(kept).all()):
            raise ValueError(f"{key!r} holds non-finite values, which a codebook cannot represent; save it with a "
                             "float value encoding (values='float32', 'float16' or 'bfloat16')")
        stored, nz = values, kept.float().numpy() if positions.size else np.zeros(0, np.float32)
        nz_t = torch.from_numpy(nz)
    kept_std = None
    if values == "auto" and std is not None:
        kept_std = std.detach().cpu().reshape(-1)[positions].numpy()
    bits_v = value_bits(stored, nz, kept_std, tolerance)
    book, codes_v = (None, None) if values in VALUE_DTYPES else _bits.kmeans_codebook(nz, (1 << bits_v) - 1)
    kind, bits_i, _ = _bits.choose_index_encoding(positions, flat.numel(), bits_v)
    candidates = [(kind, bits_i, bits_v)]
    if kind != "bitmask":  # byte-aligned streams, which the general-purpose codecs compress best
        candidates.append(("relative", 8, 8 if book is not None else bits_v))
    best = None
    for cand in candidates:
        entry, streams = _sparse.encode(t, positions, nz_t, stored, book, codes_v, *cand, effort=effort)
        size = _nbytes(streams)
        if best is None or size < best[2]:
            best = (entry, streams, size)
    entry, streams, size = best
    encoding = (f"{entry['index']}{entry['index_bits']} + "
                + (stored if values in VALUE_DTYPES else f"{bits_v}-bit codebook")
                + "".join(f", {k} {c['codec']}" for k, c in entry.get("codecs", {}).items()))
    return Encoded(entry, {f"{key}::{suffix}": s for suffix, s in streams.items()},
                   {"bytes": size, "encoding": encoding, "nnz": int(positions.size), "numel": int(flat.numel())})


def _nbytes(tensors: dict[str, Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in tensors.values())
