"""``summary.md`` and plots from a results file: one table over (net, method, strength), Pareto fronts per method."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Union

from .aggregate import Group, Stat, aggregate, pareto_front

__all__ = ["readme_block", "read_results", "summary_markdown", "update_readme", "write_report"]

logger = logging.getLogger(__name__)


def read_results(path: Union[str, Path], merge_latency: bool = True) -> list[dict[str, Any]]:
    """The run records of a ``results.jsonl`` (a truncated last line is skipped with a warning), with the
    latencies timed afterwards by ``bayes-sparse measure`` (``latency.jsonl`` beside it) merged in unless
    ``merge_latency`` is False.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a corrupt line before the last, lines of more than one recipe, runs of one method with
            different options, or no finished run.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such results file (bayes-sparse bench writes DIR/results.jsonl)")
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if any(rest.strip() for rest in lines[i + 1:]):
                raise ValueError(f"{path}, line {i + 1} is corrupt and is not the last line; fix or remove it") from None
            warnings.warn(f"{path}, line {i + 1} is truncated or corrupt (a run killed while writing?); skipped",
                          UserWarning, stacklevel=2)
    hashes = sorted({str(r.get("recipe_hash", r.get("config_hash"))) for r in rows})
    if len(hashes) > 1:
        raise ValueError(f"{path} mixes results of {len(hashes)} recipes (hashes {', '.join(hashes)}); report one "
                         "config's file at a time")
    by_method: dict[str, set] = {}
    for r in rows:
        by_method.setdefault(r.get("method"), set()).add(r.get("run_hash", r.get("config_hash")))
    mixed = sorted(m for m, h in by_method.items() if len(h) > 1)
    if mixed:
        raise ValueError(f"{path} mixes runs of method(s) {mixed} made with different options; report one "
                         "config's file at a time")
    if not rows:
        raise ValueError(f"{path} holds no finished run")
    if merge_latency:
        from .measure import merge_latency as merge

        rows = merge(rows, path)
    return rows


def _fmt(s: Optional[Stat], scale: float = 1.0, digits: int = 2, suffix: str = "", seeds: int = 0) -> str:
    """``mean ± half-width``; ``(n=k)`` when only k of the group's ``seeds`` runs have the metric."""
    if s is None:
        return "-"
    text = f"{scale * s.mean:.{digits}f}{suffix}"
    if s.half_width is not None:
        text += f" ± {scale * s.half_width:.{digits}f}"
    if s.n < seeds:
        text += f" (n={s.n})"
    return text


def _units(mean: float) -> str:
    """A per-layer unit count averaged over seeds: whole when it is, else one decimal (287, 96.3)."""
    return f"{mean:.0f}" if float(mean).is_integer() else f"{mean:.1f}"


def _grid_values(results: Path) -> Optional[dict[str, set[float]]]:
    """The strength values of each method in the config the sweep last ran (``config.json`` beside the results,
    written by ``bayes-sparse bench``), or None when there is none (results from elsewhere)."""
    path = results.parent / "config.json"
    if not path.is_file():
        return None
    try:
        methods = json.loads(path.read_text(encoding="utf-8")).get("methods", {})
        return {name: {float(v) for v in m.get("values", ())} for name, m in methods.items()}
    except (ValueError, AttributeError, TypeError) as e:
        warnings.warn(f"{path} is unreadable ({e}); every row is reported as part of the grid", UserWarning,
                      stacklevel=3)
        return None


def _off_grid(g: Group, grid: Optional[dict[str, set[float]]]) -> bool:
    return grid is not None and float(g.value) not in grid.get(g.method, set())


def summary_markdown(groups: list[Group], title: str = "Benchmark",
                     grid: Optional[dict[str, set[float]]] = None) -> str:
    """The summary: one table (mean ± 95% CI over seeds) and the Pareto front of each (net, method).

    ``grid`` (method -> strength values of the config as it stands) marks with † the rows whose strength the
    config no longer sweeps: runs of an older grid stay in the results file (a run's hash covers its method's
    options, not the grid's values) and are reported, but flagged, since they may have fewer seeds.
    """
    lines = [f"# {title}", "",
             "Mean ± half-width of the 95% Student-t confidence interval over seeds (n = seeds; no interval for "
             "n = 1). Errors in %; compression = total / non-zero weights; FLOP reduction = dense / kept MACs; "
             "speedups = dense / compiled (`kernel=\"auto\"`) CPU latency, one thread; shrunk = dense / physically "
             "shrunk model (`export.shrink`, plain torch), for runs that removed whole units.", "",
             "| net | method | strength | seeds | test error % | val error % | compression | FLOP reduction | "
             "speedup b=1 | speedup b=64 | shrunk b=1 | shrunk b=64 | units kept | kept per layer |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in groups:
        s, n = g.stats, len(g.seeds)
        mark = " †" if _off_grid(g, grid) else ""
        lines.append(f"| {g.net} | {g.method} | {g.strength}={g.value:g}{mark} | {len(g.seeds)} | "
                     f"{_fmt(s.get('test_error'), 100)} | {_fmt(s.get('val_error'), 100)} | "
                     f"{_fmt(s.get('compression'), digits=1, suffix='x')} | "
                     f"{_fmt(s.get('flop_reduction'), digits=1, suffix='x')} | "
                     f"{_fmt(s.get('speedup_batch1'), suffix='x', seeds=n)} | "
                     f"{_fmt(s.get('speedup_batch64'), suffix='x', seeds=n)} | "
                     f"{_fmt(s.get('speedup_shrunk_batch1'), suffix='x', seeds=n)} | "
                     f"{_fmt(s.get('speedup_shrunk_batch64'), suffix='x', seeds=n)} | "
                     f"{_fmt(s.get('units_kept_total'), digits=0)} | {'-'.join(_units(u) for u in g.units_kept)} |")
    if any(_off_grid(g, grid) for g in groups):
        lines += ["", "† a strength the config no longer sweeps: runs of an earlier grid, kept in the results file."]
    lines += ["", "## Pareto fronts (test error vs compression, means over seeds)", ""]
    for (net, method), gs in _by_net_method(groups).items():
        pts = [(g.stats["test_error"].mean, g.stats["compression"].mean) for g in gs
               if "test_error" in g.stats and "compression" in g.stats]
        kept = [g for g in gs if "test_error" in g.stats and "compression" in g.stats]
        front = pareto_front(pts)
        text = ", ".join(f"{kept[i].strength}={kept[i].value:g}: {100 * pts[i][0]:.2f}% at {pts[i][1]:.1f}x"
                         for i in front)
        lines.append(f"- **{net} / {method}**: {text or '-'}")
    return "\n".join(lines) + "\n"


def _by_net_method(groups: list[Group]) -> dict[tuple[str, str], list[Group]]:
    out: dict[tuple[str, str], list[Group]] = {}
    for g in groups:
        out.setdefault((g.net, g.method), []).append(g)
    return out


def write_report(results: Union[str, Path], out: Optional[Union[str, Path]] = None) -> dict[str, Any]:
    """Aggregate ``results`` and write ``summary.md``, ``summary.json`` and PNG plots to ``out``.

    Args:
        results: A ``results.jsonl``.
        out: Output folder (default: the results file's folder).

    Returns:
        ``{"summary": path, "json": path, "plots": [paths], "rows": the results' records}`` (no plots without
        matplotlib, with a warning).
    """
    results = Path(results)
    out = Path(out) if out is not None else results.parent
    out.mkdir(parents=True, exist_ok=True)
    rows = read_results(results)
    groups = aggregate(rows)
    recipe = rows[0].get("recipe_hash", rows[0].get("config_hash"))
    title = f"Benchmark {rows[0].get('config_name', '')} (recipe {recipe})"
    summary = out / "summary.md"
    summary.write_text(summary_markdown(groups, title, grid=_grid_values(results)))
    as_json = out / "summary.json"
    as_json.write_text(json.dumps([{"net": g.net, "method": g.method, "strength": g.strength, "value": g.value,
                                    "seeds": list(g.seeds), **{k: v.to_dict() for k, v in g.stats.items()},
                                    "layer_density": g.layer_density, "units_kept": g.units_kept}
                                   for g in groups], indent=2))
    try:
        from .plots import plot_all
    except ImportError as e:  # matplotlib is optional (the "plots" extra)
        warnings.warn(f"no plots: {e}; pip install matplotlib", UserWarning, stacklevel=2)
        plots: list[Path] = []
    else:
        plots = plot_all(groups, out)
    return {"summary": summary, "json": as_json, "plots": plots, "rows": rows}


def readme_block(rows: list[dict[str, Any]], summary: str, plot: Optional[Path], base: Path) -> str:
    """The README's results block: the budget and the number of seeds, the summary's table, one plot."""
    recipe = rows[0].get("recipe") or {}
    seeds = sorted({r["seed"] for r in rows})
    nets = sorted({r["net"] for r in rows})
    budget = (f"{recipe.get('epochs', '?')} epochs, batch {recipe.get('batch_size', '?')}, Adam lr "
              f"{recipe.get('lr', '?')} ({recipe.get('lr_schedule', '?')}), regularizer warm-up "
              f"{recipe.get('warmup', '?')}, {recipe.get('pretrain_epochs', 0)} dense pre-training and "
              f"{recipe.get('finetune_epochs', 0)} fine-tuning epochs") if recipe else "recipe not recorded"
    table = [line for line in summary.splitlines() if line.startswith("|")]
    notes = [line for line in summary.splitlines() if line.startswith("†")]
    per_row = sorted({len(g.seeds) for g in aggregate(rows)})  # seeds per grid point, as the table counts them
    fewer = (f"; rows with fewer seeds ({', '.join(map(str, per_row[:-1]))}) say so in the seeds column"
             if len(per_row) > 1 else "")
    lines = [f"Generated by `bayes-sparse report` from {len(rows)} runs of config `{rows[0].get('config_name')}` "
             f"({', '.join(nets)}; {len(seeds)} seed{'s' if len(seeds) != 1 else ''}: "
             f"{', '.join(map(str, seeds))}{fewer}). Budget, identical for every method: {budget}. "
             "Mean ± 95% CI over seeds.", "", *table, *([""] + notes if notes else [])]
    if plot is not None:
        lines += ["", f"![error vs compression]({Path(os.path.relpath(plot, base)).as_posix()})"]
    return "\n".join(lines)


def update_readme(readme: Union[str, Path], written: dict[str, Any]) -> Path:
    """Put the table and the tradeoff plot of a written report (:func:`write_report`'s return value) into
    ``readme`` between the lines ``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->`` (NAME: the
    config's name).

    Raises:
        ValueError: the markers are missing or out of order (the message shows the lines to add).
    """
    readme = Path(readme)
    rows = written["rows"]
    name = rows[0].get("config_name")
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    text = readme.read_text()
    i, j = text.find(start), text.find(end)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"{readme} has no block for config {name!r}: add the two lines {start!r} and {end!r} "
                         "where the results should go")
    tradeoff = next((p for p in written["plots"] if p.name.endswith("_tradeoff.png")), None)
    block = readme_block(rows, Path(written["summary"]).read_text(), tradeoff, readme.parent)
    readme.write_text(text[:i + len(start)] + "\n" + block + "\n" + text[j:])
    return readme
