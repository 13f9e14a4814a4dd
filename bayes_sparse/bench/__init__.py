"""Benchmark sweeps: one recipe for every method over a grid of nets, strengths and seeds, then a report.

``bayes-sparse bench CONFIG.toml`` runs a config (:mod:`.config`) with :func:`run_bench` (:mod:`.runner`),
one process per training (the values of a post-hoc strength share one), one record per run appended to
``results.jsonl``; ``bayes-sparse report`` aggregates them over seeds (:mod:`.aggregate`) and writes
``summary.md`` and plots (:mod:`.plots`).
"""

from .config import Config, MethodGrid, Recipe, Run, Training, load_config, parse_config
from .runner import BenchResult, ResultsFile, run_bench

__all__ = ["BenchResult", "Config", "MethodGrid", "Recipe", "ResultsFile", "Run", "Training", "load_config",
           "parse_config", "run_bench"]
