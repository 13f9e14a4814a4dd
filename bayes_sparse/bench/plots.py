"""PNG plots of aggregated benchmark groups (needs matplotlib, the ``plots`` extra)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .aggregate import Group  # noqa: E402

__all__ = ["plot_all", "plot_density", "plot_histograms", "plot_tradeoff"]


def _nets(groups: list[Group]) -> list[str]:
    return sorted({g.net for g in groups})


def plot_tradeoff(groups: list[Group], net: str, path: Path) -> Path:
    """Test error vs compression (log x), 95% CI error bars both ways, one curve per method."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in sorted({g.method for g in groups if g.net == net}):
        gs = sorted((g for g in groups if g.net == net and g.method == method
                     and "compression" in g.stats and "test_error" in g.stats),
                    key=lambda g: g.stats["compression"].mean)
        if not gs:
            continue
        x = [g.stats["compression"].mean for g in gs]
        y = [100 * g.stats["test_error"].mean for g in gs]
        xerr = [g.stats["compression"].half_width or 0.0 for g in gs]
        yerr = [100 * (g.stats["test_error"].half_width or 0.0) for g in gs]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ax.set_xlabel("compression (total / non-zero weights, log scale)")
    ax.set_ylabel("test error (%)")
    ax.set_title(f"{net}: error vs compression (mean ± 95% CI over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    """Lay out, write (120 dpi) and close a figure; returns its path."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_density(groups: list[Group], net: str, path: Path) -> Path:
    """Per-layer density (log y) of every (method, strength), mean over seeds."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names: list[str] = []
    for g in groups:
        if g.net == net and g.layer_density:
            names = [n for n, _ in g.layer_density]
            ax.plot(range(len(names)), [max(d, 1e-5) for _, d in g.layer_density], marker="o", label=g.label)
    ax.set_xticks(range(len(names)), names or [])
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("density (kept / total weights)")
    ax.set_title(f"{net}: per-layer density")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_histograms(groups: list[Group], net: str, path: Path) -> Path:
    """Histograms of log alpha (Sparse VD) or gate log alpha (L0), summed over seeds, one curve per strength."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g in groups:
        if g.net == net and g.log_alpha_hist:
            edges, counts = g.log_alpha_hist["edges"], g.log_alpha_hist["counts"]
            total = sum(counts) or 1
            ax.stairs([c / total for c in counts], edges, label=g.label)
    ax.set_xlabel("log alpha (VD) / gate log alpha (L0); end bins hold the tails")
    ax.set_ylabel("fraction of weights")
    ax.set_title(f"{net}: log alpha before thresholding")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_all(groups: list[Group], out: Path) -> list[Path]:
    """Every plot, per net: ``<net>_tradeoff.png``, ``<net>_density.png``, ``<net>_log_alpha.png`` (when a method
    has log alpha)."""
    paths = []
    for net in _nets(groups):
        paths.append(plot_tradeoff(groups, net, out / f"{net}_tradeoff.png"))
        paths.append(plot_density(groups, net, out / f"{net}_density.png"))
        if any(g.net == net and g.log_alpha_hist for g in groups):
            paths.append(plot_histograms(groups, net, out / f"{net}_log_alpha.png"))
    return paths
