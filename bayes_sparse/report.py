"""Per-layer sparsity report: what was kept, layer by layer, and the resulting compression."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ._validation import check_module
from .layers.base import SUPPORTED_DENSE_TYPES, ParameterHolder, SparseLayer
from .layers.parameter import held_parameters

__all__ = ["LayerStats", "SparsityReport", "report"]


class _Ratios:
    """Density and compression from ``weights`` and ``nonzero``."""

    weights: int
    nonzero: int

    @property
    def density(self) -> float:
        return self.nonzero / self.weights if self.weights else 0.0

    @property
    def compression(self) -> float:
        return self.weights / self.nonzero if self.nonzero else float("inf")


@dataclass(frozen=True)
class LayerStats(_Ratios):
    """One row of a :class:`SparsityReport`."""

    name: str
    type: str
    shape: tuple[int, ...]
    weights: int
    nonzero: int
    #: Output units (rows of the weight: neurons, output channels) and those kept: with a non-zero weight
    #: or a non-zero bias (a unit whose row and bias are all zero outputs 0 and can be removed).
    units: int = 0
    units_kept: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["density"] = self.density
        d["compression"] = _json_float(self.compression)
        return d


def _json_float(x: float) -> float | None:
    return None if x == float("inf") else x


@dataclass(frozen=True)
class SparsityReport(_Ratios):
    """Per-layer table and totals. ``print(report)`` shows a table; :meth:`to_dict`/:meth:`to_json` serialize.

    Compression is total weights / non-zero weights over the weight matrices and kernels (Linear and Conv
    layers, and any other parameter with 2+ dimensions: attention projections, RNN weights, embeddings;
    biases and norms excluded), the convention of the SparseVD and Deep Compression papers.
    """

    layers: tuple[LayerStats, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def weights(self) -> int:
        return sum(r.weights for r in self.layers)

    @property
    def nonzero(self) -> int:
        return sum(r.nonzero for r in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [r.to_dict() for r in self.layers],
            "total": {"weights": self.weights, "nonzero": self.nonzero, "density": self.density,
                      "compression": _json_float(self.compression)},
            **self.extra,
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        head = ("layer", "type", "shape", "weights", "non-zero", "density", "compression", "units kept")
        rows = [(r.name or "(root)", r.type, "x".join(map(str, r.shape)), f"{r.weights:,}", f"{r.nonzero:,}",
                 f"{100 * r.density:.2f}%", f"{r.compression:.1f}x", f"{r.units_kept:,}/{r.units:,}")
                for r in self.layers]
        rows.append(("total", "", "", f"{self.weights:,}", f"{self.nonzero:,}", f"{100 * self.density:.2f}%",
                     f"{self.compression:.1f}x", f"{sum(r.units_kept for r in self.layers):,}/"
                     f"{sum(r.units for r in self.layers):,}"))
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        fmt = lambda row: "  ".join(  # noqa: E731
            str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        lines = [fmt(head), "-" * (sum(widths) + 2 * (len(widths) - 1))]
        lines += [fmt(r) for r in rows[:-1]] + [lines[1], fmt(rows[-1])]
        lines += [f"{k}: {v}" for k, v in self.extra.items()]
        return "\n".join(lines)


def report(model: nn.Module, **extra: Any) -> SparsityReport:
    """Count weights and non-zeros in every weight matrix of ``model`` (Linear/Conv layers and any other
    parameter with 2+ dimensions; a tied weight once).

    Each row also counts the layer's output units (weight rows: neurons, output channels) and those kept,
    a unit being kept when its (masked) weight row or its bias is not all zero; this is what
    :func:`bayes_sparse.export.shrink` can remove, for every method (structured ones remove whole units).

    Sparse layers count the weights their hard mask keeps (fixed by ``threshold_``, else the default
    criterion); plain layers count their non-zero entries, so a model exported with ``to_dense`` reports
    the same figures as the sparse model it came from.

    Args:
        model: Any module.
        **extra: Extra entries (e.g. ``test_error=0.018``) carried into the report and its dict.

    Returns:
        A :class:`SparsityReport`.

    Example:
        >>> import bayes_sparse as bs
        >>> bs.report(torch.nn.Linear(3, 2)).weights
        6
    """
    check_module(model)
    rows = []
    seen: set[int] = set()  # a tied weight is counted once

    def add(row_name: str, kind: str, w: torch.Tensor, nnz_of, kept_of=None) -> None:
        if id(w) not in seen:
            seen.add(id(w))
            units = w.shape[0] if w.dim() else 0
            kept = kept_of() if kept_of is not None else _units_kept(w != 0, None)
            rows.append(LayerStats(row_name, kind, tuple(w.shape), w.numel(), int(nnz_of()), units, int(kept)))

    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, SparseLayer):
                if m.dense_type is not ParameterHolder:  # held parameters are listed under their owner
                    add(name, type(m).__name__, m.raw_weight, lambda m=m: (m.hard_mask() & (m.raw_weight != 0)).sum(),
                        lambda m=m: _units_kept(m.hard_mask() & (m.masked_weight() != 0), m.masked_bias()))
                continue
            prefix = f"{name}." if name else ""
            held = held_parameters(m)
            for pname, holder in held.items():
                add(prefix + pname, f"{type(m)._sparse_owner_base.__name__} ({type(holder).__name__})",
                    holder.raw_weight, lambda h=holder: (h.hard_mask() & (h.raw_weight != 0)).sum())
            if isinstance(m, SUPPORTED_DENSE_TYPES) and not held:
                add(name, type(m).__name__, m.weight, lambda m=m: (m.weight != 0).sum(),
                    lambda m=m: _units_kept(m.weight != 0, m.bias))
                continue
            for pname, p in m._parameters.items():  # other weight matrices: attention, RNN, embeddings, ...
                if p is not None and p.dim() >= 2:
                    add(prefix + pname, type(m).__name__, p, lambda p=p: (p != 0).sum())
    return SparsityReport(tuple(rows), dict(extra))


def _units_kept(nonzero: torch.Tensor, bias: torch.Tensor | None) -> int:
    """Rows (dimension 0) of a weight with a non-zero entry, or a non-zero bias."""
    alive = nonzero.reshape(nonzero.shape[0], -1).any(dim=1)
    if bias is not None:
        alive = alive | (bias.detach() != 0)
    return int(alive.sum())
