"""PNG plots of aggregated benchmark groups (needs matplotlib, the ``plots`` extra)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Optional

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .aggregate import Group  # noqa: E402

__all__ = ["off_scale_ceiling", "plot_all", "plot_density", "plot_histograms", "plot_speedup", "plot_tradeoff"]


def _nets(groups: list[Group]) -> list[str]:
    return sorted({g.net for g in groups})


#: Errors above this multiple of the median point's error are drawn off-scale (a collapsed run at 60% would
#: otherwise squeeze every useful point of the plot into its bottom tenth).
OFF_SCALE_FACTOR = 4.0


def off_scale_ceiling(errors: list[float], factor: float = OFF_SCALE_FACTOR) -> Optional[float]:
    """The top of the error axis when some points are far above the rest: ``factor`` x the median error, or
    None when every error is below that (no point is drawn off-scale)."""
    finite = sorted(e for e in errors if math.isfinite(e) and e > 0)
    if not finite:
        return None
    ceiling = factor * statistics.median(finite)
    return ceiling if finite[-1] > ceiling else None


def plot_tradeoff(groups: list[Group], net: str, path: Path) -> Path:
    """Test error vs compression (log x), 95% CI error bars both ways, one curve per method.

    A point far above the others (a collapsed run, see :func:`off_scale_ceiling`) is drawn as a triangle at
    the top edge labelled with its error, so the axis stays on the errors that matter.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves = []
    for method in sorted({g.method for g in groups if g.net == net}):
        gs = sorted((g for g in groups if g.net == net and g.method == method
                     and "compression" in g.stats and "test_error" in g.stats),
                    key=lambda g: g.stats["compression"].mean)
        if gs:
            curves.append((method, gs))
    ceiling = off_scale_ceiling([100 * g.stats["test_error"].mean for _, gs in curves for g in gs])
    for method, gs in curves:
        x = [g.stats["compression"].mean for g in gs]
        y = [100 * g.stats["test_error"].mean for g in gs]
        xerr = [g.stats["compression"].half_width or 0.0 for g in gs]
        yerr = [100 * (g.stats["test_error"].half_width or 0.0) for g in gs]
        off = [ceiling is not None and v > ceiling for v in y]
        shown = [ceiling if o else v for v, o in zip(y, off)]
        line = ax.errorbar(x, shown, xerr=xerr, yerr=[0.0 if o else e for e, o in zip(yerr, off)], marker="o",
                           capsize=3, label=method)
        color = line[0].get_color()
        for xi, v, o in zip(x, y, off):
            if o:
                ax.plot([xi], [ceiling], marker="^", markersize=9, color=color, clip_on=False)
                ax.annotate(f"{v:.0f}%", (xi, ceiling), textcoords="offset points", xytext=(6, -10),
                            fontsize=8, color=color)
    ax.set_xscale("log")
    ax.set_yscale("log")
    if ceiling is not None:
        ax.set_ylim(top=ceiling)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("compression (total / non-zero weights, log scale)")
    ax.set_ylabel("test error (%, log scale)" + ("; ▲ off-scale, labelled" if ceiling is not None else ""))
    ax.set_title(f"{net}: error vs compression (mean ± 95% CI over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    """Lay out, write (120 dpi) and close a figure; returns its path."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _methods(groups: list[Group], net: str) -> list[str]:
    return sorted({g.method for g in groups if g.net == net})


def plot_density(groups: list[Group], net: str, path: Path) -> Path:
    """Per-layer density (log y), mean over seeds: one panel per method, one line per strength."""
    methods = [m for m in _methods(groups, net) if any(g.layer_density for g in groups
                                                        if g.net == net and g.method == m)]
    cols = min(4, max(1, len(methods)))
    rows = -(-max(1, len(methods)) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False, sharey=True)
    for ax, method in zip(axes.flat, methods):
        names: list[str] = []
        for g in groups:
            if g.net == net and g.method == method and g.layer_density:
                names = [n for n, _ in g.layer_density]
                ax.plot(range(len(names)), [max(d, 1e-5) for _, d in g.layer_density], marker="o",
                        label=f"{g.strength}={g.value:g}")
        ax.set_xticks(range(len(names)), names)
        ax.set_yscale("log")
        ax.set_title(method)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="x-small")
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("density (kept / total)")
    fig.suptitle(f"{net}: per-layer density (mean over seeds)")
    return _save(fig, path)


def plot_histograms(groups: list[Group], net: str, path: Path) -> Path:
    """Histograms of log alpha (Sparse VD) or gate log alpha (L0), summed over seeds, one curve per training
    (the values of a post-hoc threshold share one training, hence one histogram)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seen: dict[tuple, list[str]] = {}
    for g in groups:
        if g.net == net and g.log_alpha_hist:
            key = (g.method, tuple(g.log_alpha_hist["counts"]))
            seen.setdefault(key, []).append(f"{g.value:g}")
    for (method, counts), values in seen.items():
        g = next(x for x in groups if x.net == net and x.method == method and x.log_alpha_hist)
        total = sum(counts) or 1
        label = f"{method} ({g.strength} {', '.join(values)})"
        ax.stairs([c / total for c in counts], g.log_alpha_hist["edges"], label=label)
    ax.set_xlabel("log alpha (VD) / gate log alpha (L0); end bins hold the tails")
    ax.set_ylabel("fraction of weights")
    ax.set_title(f"{net}: log alpha before thresholding")
    ax.legend(fontsize="x-small")
    return _save(fig, path)


def plot_speedup(groups: list[Group], net: str, path: Path) -> Path:
    """Measured CPU speedup against the theoretical one (FLOP reduction), batch 1 and batch 64, log-log, with
    95% CI bars: compiled sparse models (circles) and physically shrunk ones (squares); the diagonal is where
    measured speed would equal the FLOP count."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    lo, hi = 1.0, 1.0
    for ax, b in zip(axes, (1, 64)):
        for i, method in enumerate(_methods(groups, net)):
            color = f"C{i}"
            for key, marker, suffix in ((f"speedup_batch{b}", "o", "compiled"),
                                        (f"speedup_shrunk_batch{b}", "s", "shrunk")):
                gs = [g for g in groups if g.net == net and g.method == method and key in g.stats
                      and "flop_reduction" in g.stats]
                if not gs:
                    continue
                x = [g.stats["flop_reduction"].mean for g in gs]
                y = [g.stats[key].mean for g in gs]
                ax.errorbar(x, y, yerr=[g.stats[key].half_width or 0.0 for g in gs], fmt=marker, color=color,
                            capsize=2, label=f"{method} {suffix}", mfc="none" if suffix == "shrunk" else color)
                lo, hi = min(lo, *x, *y), max(hi, *x, *y)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("theoretical speedup (dense / kept MACs)")
        ax.set_title(f"batch {b}, one thread")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes:
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="measured = theoretical")
    axes[0].set_ylabel("measured speedup (dense / sparse latency)")
    axes[1].legend(fontsize="x-small", ncol=2)
    fig.suptitle(f"{net}: measured vs theoretical speedup (mean ± 95% CI over seeds)")
    return _save(fig, path)


def plot_all(groups: list[Group], out: Path) -> list[Path]:
    """Every plot, per net: ``<net>_tradeoff.png``, ``<net>_density.png``, ``<net>_log_alpha.png`` (when a method
    has log alpha), ``<net>_speedup.png`` (when latencies were measured)."""
    paths = []
    for net in _nets(groups):
        paths.append(plot_tradeoff(groups, net, out / f"{net}_tradeoff.png"))
        paths.append(plot_density(groups, net, out / f"{net}_density.png"))
        if any(g.net == net and g.log_alpha_hist for g in groups):
            paths.append(plot_histograms(groups, net, out / f"{net}_log_alpha.png"))
        if any(g.net == net and "speedup_batch1" in g.stats for g in groups):
            paths.append(plot_speedup(groups, net, out / f"{net}_speedup.png"))
    return paths
