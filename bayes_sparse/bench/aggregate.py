"""Aggregate finished runs over seeds: mean and Student-t 95% confidence intervals, Pareto fronts."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from scipy import stats

__all__ = ["METRICS", "Group", "Stat", "aggregate", "mean_ci", "pareto_front"]

#: Metrics aggregated over seeds: record key -> label.
METRICS = {"test_error": "test error", "val_error": "val error", "compression": "compression",
           "flop_reduction": "FLOP reduction", "speedup_batch1": "speedup b=1", "speedup_batch64": "speedup b=64",
           "speedup_shrunk_batch1": "shrunk b=1", "speedup_shrunk_batch64": "shrunk b=64",
           "units_kept_total": "units kept", "train_seconds": "train s"}


@dataclass(frozen=True)
class Stat:
    """Mean of ``n`` values and the half-width of its confidence interval (None for a single value)."""

    mean: float
    half_width: Optional[float]
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "ci95": self.half_width, "n": self.n}


def mean_ci(values: Sequence[float], level: float = 0.95) -> Stat:
    """Mean and the half-width of its two-sided Student-t confidence interval: ``t_{(1+level)/2, n-1} s / sqrt(n)``
    with ``s`` the sample standard deviation (n - 1 in the denominator).

    Example:
        >>> s = mean_ci([1.0, 2.0, 3.0])
        >>> round(s.mean, 6), round(s.half_width, 4)
        (2.0, 2.4841)

    Raises:
        ValueError: no values, or ``level`` outside (0, 1).
    """
    if not values:
        raise ValueError("mean_ci needs at least one value")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return Stat(mean, None, n)
    t = float(stats.t.ppf((1 + level) / 2, n - 1))
    return Stat(mean, t * statistics.stdev(values) / math.sqrt(n), n)


@dataclass(frozen=True)
class Group:
    """The runs of one (net, method, strength) point, over seeds."""

    net: str
    method: str
    strength: str
    value: float
    seeds: tuple[int, ...]
    stats: dict[str, Stat]
    layer_density: list[tuple[str, float]] = field(default_factory=list)  # mean over seeds
    units_kept: list[float] = field(default_factory=list)
    log_alpha_hist: Optional[dict[str, Any]] = None  # counts summed over seeds

    @property
    def label(self) -> str:
        return f"{self.method} {self.strength}={self.value:g}"


def _units_total(row: dict[str, Any]) -> float:
    return float(sum(row.get("units_kept") or []))


def aggregate(rows: Iterable[dict[str, Any]]) -> list[Group]:
    """Group run records by (net, method, strength, value) and aggregate every metric of :data:`METRICS` over
    the runs that have it (None values, e.g. skipped latency, are left out; each :class:`Stat` says its n)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["net"], r["method"], r["strength"], r["value"]), []).append(r)
    out = []
    for (net, method, strength, value), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3])):
        rs = sorted(rs, key=lambda r: r["seed"])
        st = {}
        for key in METRICS:
            vals = [_units_total(r) if key == "units_kept_total" else r.get(key) for r in rs]
            vals = [v for v in vals if v is not None]
            if vals:
                st[key] = mean_ci(vals)
        names = [layer["name"] for layer in rs[0].get("layers", [])]
        density = [(name, statistics.fmean(r["layers"][i]["density"] for r in rs)) for i, name in enumerate(names)]
        units = [statistics.fmean(r["units_kept"][i] for r in rs) for i in range(len(rs[0].get("units_kept", [])))]
        hists = [r["log_alpha_hist"] for r in rs if r.get("log_alpha_hist")]
        hist = None
        if hists:
            hist = {"edges": hists[0]["edges"], "counts": [sum(c) for c in zip(*(h["counts"] for h in hists))]}
        out.append(Group(net, method, strength, value, tuple(r["seed"] for r in rs), st, density, units, hist))
    return out


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (error, compression) that no other point dominates (lower or equal error and higher
    or equal compression, one of them strictly), sorted by compression; ties (equal points) are all kept.

    Example:
        >>> pareto_front([(0.02, 10.0), (0.03, 5.0), (0.01, 2.0)])
        [2, 0]
    """
    order = sorted(range(len(points)), key=lambda i: (-points[i][1], points[i][0]))  # most compressing first
    front, best, last = [], math.inf, None
    for i in order:  # a point is on the front when it beats the error of every more compressing point
        if points[i][0] < best or tuple(points[i]) == last:  # equal points dominate nothing
            front.append(i)
            best, last = points[i][0], tuple(points[i])
    return sorted(front, key=lambda i: (points[i][1], -points[i][0]))
