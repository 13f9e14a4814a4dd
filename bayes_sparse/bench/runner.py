"""Run a benchmark config: one process per run, up to ``jobs`` at a time, each finished run appended to a JSONL file.

The results file (``results.jsonl``) holds one JSON object per finished run, each carrying the config's hash
and the run's key. A run is appended by the parent process as soon as its process returns, in one write
followed by ``fsync``, so a kill loses at most the runs still training. ``resume=True`` runs only the keys
missing from the file. A last line that does not parse (the process was killed while writing it) is ignored
with a warning and cut off before the next append; the lines before it are never touched. A file written
for another config (another hash) is refused.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import multiprocessing
import os
import platform
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import pyro
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import export
from ..convert import sparsify
from ..infer import SVIModel, error_rate, fit_svi, flat_then_linear_decay
from ..layers.base import sparse_layers
from ..report import report
from ..threshold import threshold_
from .config import Config, Run
from .metrics import latency, log_alpha_histogram, macs, units_kept
from .nets import NETS, load_data

__all__ = ["BenchResult", "ResultsFile", "execute", "run_bench"]

logger = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda")


class ResultsFile:
    """The append-only JSONL file of finished runs of one config.

    Args:
        path: The file (created on the first append).
        config_hash: The hash every line must carry.
    """

    def __init__(self, path: Union[str, Path], config_hash: str) -> None:
        self.path = Path(path)
        self.config_hash = config_hash
        self._good_end: Optional[int] = None  # byte offset after the last good line, when the tail needs cutting
        self._needs_newline = False

    def read(self) -> list[dict[str, Any]]:
        """The finished runs in the file (empty when there is none).

        Warns:
            UserWarning: the last line is truncated or not JSON (ignored; cut off at the next append).

        Raises:
            ValueError: a line other than the last is corrupt, or a line belongs to another config.
        """
        self._good_end, self._needs_newline = None, False
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        rows: list[dict[str, Any]] = []
        lines = data.split(b"\n")
        offset = 0
        for i, line in enumerate(lines):
            end = offset + len(line) + (1 if i < len(lines) - 1 else 0)
            if line.strip():
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict) or "key" not in row:
                        raise ValueError("not a run record")
                except ValueError:
                    if any(rest.strip() for rest in lines[i + 1:]):
                        raise ValueError(f"{self.path}, line {i + 1} is corrupt and is not the last line, so it is "
                                         "not a run killed while writing; fix or remove that line by hand") from None
                    warnings.warn(f"{self.path}, line {i + 1} is truncated or corrupt (a run killed while its result "
                                  f"was written?); ignored: that run counts as not finished and the line is removed "
                                  f"before the next result is appended ({len(rows)} earlier lines kept)",
                                  UserWarning, stacklevel=2)
                    self._good_end = offset
                    break
                if row.get("config_hash") != self.config_hash:
                    raise ValueError(
                        f"{self.path} holds results of another config (line {i + 1}: config hash "
                        f"{row.get('config_hash')!r}, config {row.get('config_name')!r}); this config hashes to "
                        f"{self.config_hash!r}. Write to another folder (--out DIR) or move that file away")
                rows.append(row)
                if i == len(lines) - 1:  # a complete record without its newline
                    self._needs_newline = True
            offset = end
        return rows

    def append(self, row: dict[str, Any]) -> None:
        """Append one finished run (first cutting off a corrupt tail found by :meth:`read`), then ``fsync``."""
        if self._good_end is not None:
            with open(self.path, "r+b") as f:
                f.truncate(self._good_end)
            self._good_end = None
        line = json.dumps(row, allow_nan=False, default=_jsonable) + "\n"
        if self._needs_newline:
            line = "\n" + line
            self._needs_newline = False
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def _jsonable(x: Any) -> Any:
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def _finite(x: Optional[float]) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else x


@dataclass(frozen=True)
class BenchResult:
    """What :func:`run_bench` did: the keys it ran, the keys it skipped (already in the file), the file."""

    ran: list[str]
    skipped: list[str]
    results: Path


# ----- one run, in its own process -----------------------------------------------------------------
def _pretrain(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch: int) -> None:
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], device=x.device)
        for i in range(0, x.shape[0], batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def _choose_threshold(net: torch.nn.Module, grid: Any, x_val: torch.Tensor, y_val: torch.Tensor) -> dict[str, Any]:
    """Threshold ``net`` at the validation-chosen candidate: the most compressing one whose validation error is
    within ``threshold_tolerance`` of the best candidate's."""
    tried = []
    for c in grid.threshold_candidates:
        trial = copy.deepcopy(net)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            threshold_(trial, threshold=c)
        tried.append({"threshold": c, "val_error": error_rate(trial, x_val, y_val),
                      "compression": _finite(report(trial).compression)})
    best = min(t["val_error"] for t in tried)
    ok = [t for t in tried if t["val_error"] <= best + grid.threshold_tolerance]
    chosen = max(ok, key=lambda t: (t["compression"] or math.inf, -t["val_error"]))
    threshold_(net, threshold=chosen["threshold"])
    return {"chosen": chosen["threshold"], "candidates": tried, "tolerance": grid.threshold_tolerance}


def execute(config: Config, run: Run, out_dir: Union[str, Path], device: str = "cpu", slots: Any = None,
            single_thread: bool = False, progress: bool = False) -> dict[str, Any]:
    """Train, threshold, export and measure one run; returns its result record (the JSONL line).

    Meant to run in a fresh process (:func:`run_bench` starts one per run); ``slots`` is a queue of tqdm bar
    positions shared by the workers.
    """
    wall = time.perf_counter()
    if single_thread:
        torch.set_num_threads(1)
    position = slots.get() if slots is not None else 1
    try:
        return _execute(config, run, Path(out_dir), torch.device(device), position, progress, wall)
    finally:
        if slots is not None:
            slots.put(position)


def _execute(config: Config, run: Run, out_dir: Path, device: torch.device, position: int, progress: bool,
             wall: float) -> dict[str, Any]:
    recipe, grid = config.recipe, config.methods[run.method]
    torch.manual_seed(run.seed)
    pyro.set_rng_seed(run.seed)
    pyro.clear_param_store()
    data = load_data(run.net, recipe.val_size)
    x_train, y_train, x_val, y_val, x_test, y_test = (t.to(device) for t in data)
    n = x_train.shape[0]
    dense = NETS[run.net].build().to(device)
    caught: list[str] = []
    bar = tqdm(total=recipe.pretrain_epochs + recipe.epochs + recipe.finetune_epochs, position=position,
               desc=run.key, leave=False, disable=not progress, unit="epoch")
    start = time.perf_counter()
    if recipe.pretrain_epochs:
        _pretrain(dense, x_train, y_train, recipe.pretrain_epochs, recipe.lr, recipe.batch_size)
        bar.update(recipe.pretrain_epochs)
    pretrain_seconds = time.perf_counter() - start
    options = config.method_options(run)
    net = sparsify(dense, run.method, **options)
    model = SVIModel(net, num_data=n)

    def batches():
        perm = torch.randperm(n, device=device)
        for i in range(0, n, recipe.batch_size):
            idx = perm[i:i + recipe.batch_size]
            yield x_train[idx], y_train[idx]

    lr_lambda = flat_then_linear_decay(recipe.epochs) if recipe.lr_schedule == "flat_then_linear" else (lambda e: 1.0)
    start = time.perf_counter()
    fit_svi(model, batches, epochs=recipe.epochs, lr=recipe.lr, lr_lambda=lr_lambda, progress=False,
            on_epoch_end=lambda epoch, stats: bar.update(1))
    train_seconds = time.perf_counter() - start
    histogram = log_alpha_histogram(net)

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        threshold: dict[str, Any]
        if grid.strength == "sparsity":
            threshold_(net, sparsity=run.value)
            threshold = {"sparsity": run.value}
        elif grid.strength == "threshold":
            threshold_(net, threshold=run.value)
            threshold = {"chosen": run.value}
        elif grid.threshold_candidates:
            threshold = _choose_threshold(net, grid, x_val, y_val)
        else:
            threshold_(net)
            threshold = {"chosen": "default"}
    caught += [str(x.message) for x in w]

    start = time.perf_counter()
    if recipe.finetune_epochs:
        for _, layer in sparse_layers(net):
            layer.set_options_(warmup=(0.0, 0.0))  # the regularizer is fully on: no second warm-up
        fit_svi(model, batches, epochs=recipe.finetune_epochs, lr=recipe.lr * recipe.finetune_lr_factor,
                lr_lambda=lambda e: 1.0, progress=False, on_epoch_end=lambda epoch, stats: bar.update(1))
    finetune_seconds = time.perf_counter() - start
    bar.close()

    net = net.cpu()
    exported = NETS[run.net].build()
    exported.load_state_dict(export.to_dense(net).state_dict())
    exported.eval()
    x_val, y_val, x_test, y_test = x_val.cpu(), y_val.cpu(), x_test.cpu(), y_test.cpu()
    val_error = error_rate(exported, x_val, y_val)
    test_error = error_rate(exported, x_test, y_test)  # the test set, once, at the end
    rep = report(exported)
    units = units_kept(exported)
    flops = macs(exported, x_test)
    models = out_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    model_path = models / (run.key.replace("/", "__").replace("=", "-") + ".safetensors")
    saved = export.save(net, model_path)
    speed = latency(exported, x_test, rounds=recipe.latency_rounds) if recipe.latency_rounds else None
    return {
        "config_hash": config.hash, "config_name": config.name, "key": run.key, "net": run.net,
        "method": run.method, "strength": run.strength, "value": run.value, "seed": run.seed,
        "options": options, "threshold": threshold,
        "val_error": val_error, "test_error": test_error,
        "compression": _finite(rep.compression), "weights": rep.weights, "nonzero": rep.nonzero,
        "layers": [{"name": r.name, "shape": list(r.shape), "weights": r.weights, "nonzero": r.nonzero,
                    "density": r.density, "units": u["units"], "units_kept": u["kept"]}
                   for r, u in zip(rep.layers, units)],
        "units_kept": [u["kept"] for u in units], "macs": flops, "flop_reduction": _finite(flops["reduction"]),
        "latency": speed,
        "speedup_batch1": speed["batch1"]["speedup"] if speed else None,
        "speedup_batch64": speed["batch64"]["speedup"] if speed else None,
        "log_alpha_hist": histogram,
        "pretrain_seconds": pretrain_seconds, "train_seconds": train_seconds, "finetune_seconds": finetune_seconds,
        "wall_seconds": time.perf_counter() - wall,
        "model_path": str(model_path), "model_bytes": saved.total_bytes,
        "device": str(device), "threads": torch.get_num_threads(), "warnings": caught,
        "torch": torch.__version__, "pyro": pyro.__version__, "python": platform.python_version(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ----- the sweep -------------------------------------------------------------------------------------
def check_device(device: str) -> None:
    """Refuse an unknown device, or ``"cuda"`` on a machine without one, with the fix."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False; "
                           f"torch {torch.__version__}, CUDA build {torch.version.cuda}); run with --device cpu "
                           "or on a machine with a GPU")


def run_bench(config: Config, out: Union[str, Path], jobs: int = 1, resume: bool = False, device: str = "cpu",
              progress: bool = True) -> BenchResult:
    """Run every run of ``config`` that ``out/results.jsonl`` lacks, one process each, ``jobs`` at a time.

    Args:
        config: The checked config (:func:`~bayes_sparse.bench.config.load_config`).
        out: Output folder: ``results.jsonl``, ``config.json``, ``models/*.safetensors``.
        jobs: Runs in parallel; with more than one, each process uses one torch thread.
        resume: Continue a results file of this config (only missing runs are run); without it an existing
            file with finished runs is refused.
        device: ``"cpu"`` or ``"cuda"`` (training; latency is always measured on the CPU).
        progress: tqdm bars: one overall, one per running run.

    Returns:
        A :class:`BenchResult`.

    Raises:
        ValueError: bad ``jobs``, a results file of another config or with a corrupt line before its last, or
            finished runs in the file without ``resume``.
        RuntimeError: ``device="cuda"`` without a GPU; some runs failed (after the others finished and were
            recorded; the message names them and their errors).
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    check_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = ResultsFile(out / "results.jsonl", config.hash)
    rows = results.read()
    if rows and not resume:
        raise ValueError(f"{results.path} already holds {len(rows)} finished run(s) of this config; pass --resume to "
                         "run only the missing ones, or write to another folder (--out DIR)")
    (out / "config.json").write_text(json.dumps({"hash": config.hash, **config.to_dict()}, indent=2,
                                                default=_jsonable))
    done = {r["key"] for r in rows}
    runs = config.runs()
    todo = [r for r in runs if r.key not in done]
    skipped = [r.key for r in runs if r.key in done]
    ran: list[str] = []
    failed: list[str] = []
    if not todo:
        return BenchResult(ran, skipped, results.path)
    ctx = multiprocessing.get_context("spawn")
    overall = tqdm(total=len(runs), initial=len(skipped), position=0, desc=config.name, unit="run",
                   disable=not progress)
    with ctx.Manager() as manager:
        slots = manager.Queue()
        for i in range(1, jobs + 1):
            slots.put(i)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
            pending = {pool.submit(execute, config, run, str(out), device, slots, jobs > 1, progress): run
                       for run in todo}
            try:
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        run = pending.pop(fut)
                        try:
                            row = fut.result()
                        except Exception as e:  # one failed run does not stop the others
                            logger.error("run %s failed: %s: %s", run.key, type(e).__name__, e)
                            failed.append(f"{run.key}: {type(e).__name__}: {e}")
                        else:
                            results.append(row)
                            ran.append(run.key)
                        overall.update(1)
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
    overall.close()
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(todo)} run(s) failed (the {len(ran)} others are in "
                           f"{results.path}; rerun with --resume to retry):\n  " + "\n  ".join(failed))
    return BenchResult(ran, skipped, results.path)
