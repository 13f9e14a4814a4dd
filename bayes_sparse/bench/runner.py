"""Run a benchmark config: one process per training, up to ``jobs`` at a time, each finished run appended to a JSONL file.

A training (:class:`~bayes_sparse.bench.config.Training`) is one model trained with the recipe; it yields one
run per strength value. A strength that is a method option (``penalty``, ``target_sparsity``...) is set
before training, so each value is its own training. A post-hoc strength (``"threshold"``, ``"sparsity"``)
only acts after training, so one training per (net, method, seed) serves all its values: for each value the
trained model is deep-copied, thresholded, fine-tuned if the recipe says so, exported, measured and saved,
each starting from the random state right after training (its record does not depend on the other values).

The results file (``results.jsonl``) holds one JSON object per finished run, each carrying the config's hash,
the run's key and the key of the training that produced it (``"training"``; its ``train_seconds`` is the
shared training's). The runs of a training are appended by the parent process as soon as its process returns,
each in one write followed by ``fsync``, so a kill loses at most the runs of the trainings still going.
``resume=True`` runs only the keys missing from the file: a training all of whose runs are in the file is
skipped; one with some of its values missing is trained again (same seed, same recipe) for those values only.
A last line that does not parse (the process was killed while writing it) is ignored with a warning and cut
off before the next append; the lines before it are never touched. Each run carries the hash of what decides its
result (:meth:`~bayes_sparse.bench.config.Config.run_hash`: the recipe and its method's options), so a config may
grow (more values, seeds, methods) or change a method's values and still resume into the same file; a file of
another recipe, or with runs of a method whose options have changed, is refused. ``only``/``seeds`` select methods
and seeds without changing the config or its hash, so a
sweep can be run in parts, one after another, into the same file; a lock file refuses a second sweep writing
to the same folder at the same time.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import multiprocessing
import os
import platform
import threading
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing.managers import SyncManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import pyro
import pyro.util
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import export
from ..convert import sparsify
from ..infer import SVIModel, error_rate, fit_svi, flat_then_linear_decay
from ..layers.base import sparse_layers
from ..report import report
from ..threshold import threshold_
from .config import Config, Run, Training
from .metrics import latency, log_alpha_histogram, macs, units_kept
from .nets import NETS, load_data

__all__ = ["BenchResult", "ResultsFile", "execute", "run_bench"]

logger = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda")


class ResultsFile:
    """The append-only JSONL file of finished runs of one recipe.

    Args:
        path: The file (created on the first append).
        config_hash: The hash every line must carry in ``field``, or with ``config``: the config whose runs the
            file may hold. A line with a ``run_hash`` must then share the config's recipe (``recipe_hash``), and,
            when its method is in the config, that method's :meth:`~Config.run_hash` (same options and threshold
            choice; other values, seeds or methods are fine: the grid may grow). A line without one (written
            before runs carried it) must carry the config's whole hash.
        field: The line's field compared with ``config_hash`` (when no ``config`` is given).
    """

    def __init__(self, path: Union[str, Path], config_hash: Union[str, Config], field: str = "config_hash") -> None:
        self.path = Path(path)
        self.config = config_hash if isinstance(config_hash, Config) else None
        self.config_hash = self.config.hash if self.config is not None else config_hash
        self.field = field
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
                self._check(row, i + 1)
                rows.append(row)
                if i == len(lines) - 1:  # a complete record without its newline
                    self._needs_newline = True
            offset = end
        return rows

    def _check(self, row: dict[str, Any], line: int) -> None:
        where = f"{self.path}, line {line} ({row.get('key')!r})"
        fix = "Write to another folder (--out DIR) or move that file (or those lines) away"
        if self.config is None or "run_hash" not in row:
            if row.get(self.field) != self.config_hash:
                raise ValueError(f"{where} holds results of another config ({self.field} {row.get(self.field)!r}, "
                                 f"config {row.get('config_name')!r}); this config's is {self.config_hash!r}. {fix}")
            return
        if row.get("recipe_hash") != self.config.recipe_hash:
            raise ValueError(f"{where} was trained with another recipe (recipe hash {row.get('recipe_hash')!r}, this "
                             f"config's is {self.config.recipe_hash!r}: {row.get('recipe')}). {fix}")
        method = row.get("method")
        if method in self.config.methods and row["run_hash"] != self.config.run_hash(method):
            raise ValueError(f"{where} is a run of method {method!r} with other options or threshold choice "
                             f"({row.get('options')}) than this config's {method!r} entry; a method's options "
                             f"decide its results, so its runs cannot be mixed. {fix}")

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
    """What :func:`run_bench` did: the run keys it ran, the run keys it skipped (already in the file), the file,
    and the keys of the trainings it ran (one process each; a post-hoc strength's values share one)."""

    ran: list[str]
    skipped: list[str]
    results: Path
    trainings: list[str] = field(default_factory=list)


# ----- one training and its runs, in its own process--------------------------------------------------------------
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


def execute(config: Config, training: Training, out_dir: Union[str, Path], device: str = "cpu", slots: Any = None,
            single_thread: bool = False, progress: bool = False) -> list[dict[str, Any]]:
    """Train once, then threshold, export and measure each run of ``training``; returns their result records
    (the JSONL lines), in the order of ``training.values``. A value whose post-hoc part raised gives
    ``{"key": ..., "failed": "Error: message"}`` instead of a record, and the other values still run.

    Meant to run in a fresh process (:func:`run_bench` starts one per training); ``slots`` is a queue of tqdm
    bar positions shared by the workers.
    """
    wall = time.perf_counter()
    if single_thread:
        torch.set_num_threads(1)
    position = slots.get() if slots is not None else 1
    try:
        return _execute(config, training, Path(out_dir), torch.device(device), position, progress, wall)
    finally:
        if slots is not None:
            slots.put(position)


def _end_with_parent(period: float = 2.0) -> None:
    """In a worker or the manager (the pool's and the manager's initializer): end this process when the sweep's
    process is gone (killed with SIGKILL, say), since no result of this training could be recorded any more;
    otherwise it would train on, unseen, to the end. Does nothing in a process multiprocessing did not start.

    The parent is the one multiprocessing recorded at spawn, not ``os.getppid()`` read here: a sweep killed
    while this process was still starting up (importing torch) has already left it to another parent.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def orphaned() -> bool:
        return os.getppid() != parent.pid

    if orphaned():
        os._exit(1)

    def watch() -> None:
        while not orphaned():
            time.sleep(period)
        os._exit(1)

    threading.Thread(target=watch, name="bayes-sparse-parent-watch", daemon=True).start()


def _terminate_workers(pool: ProcessPoolExecutor) -> int:
    """Stop the pool's worker processes now (their trainings are lost; the finished runs are in the file);
    returns how many were running."""
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    procs = list((getattr(pool, "_processes", None) or {}).values())
    alive = sum(p.is_alive() for p in procs)
    if terminate is not None:
        terminate()
    else:
        for p in procs:
            if p.is_alive():
                p.terminate()
    return alive


def _rng_state() -> dict[str, Any]:
    state = {"pyro": pyro.util.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    pyro.util.set_rng_state(state["pyro"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _execute(config: Config, training: Training, out_dir: Path, device: torch.device, position: int,
             progress: bool, wall: float) -> list[dict[str, Any]]:
    recipe = config.recipe
    torch.manual_seed(training.seed)
    pyro.set_rng_seed(training.seed)
    pyro.clear_param_store()
    data = load_data(training.net, recipe.val_size)
    x_train, y_train, x_val, y_val, x_test, y_test = (t.to(device) for t in data)
    n = x_train.shape[0]
    dense = NETS[training.net].build().to(device)
    bar = tqdm(total=recipe.pretrain_epochs + recipe.epochs + recipe.finetune_epochs * len(training.values),
               position=position, desc=training.key, leave=False, disable=not progress, unit="epoch")
    start = time.perf_counter()
    if recipe.pretrain_epochs:
        _pretrain(dense, x_train, y_train, recipe.pretrain_epochs, recipe.lr, recipe.batch_size)
        bar.update(recipe.pretrain_epochs)
    pretrain_seconds = time.perf_counter() - start
    options = config.method_options(training)
    net = sparsify(dense, training.method, **options)
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
    shared = {"training": training.key, "options": options, "log_alpha_hist": log_alpha_histogram(net),
              "pretrain_seconds": pretrain_seconds, "train_seconds": time.perf_counter() - start}
    # Every value starts from the trained model and the random state right after training, so its record does
    # not depend on which other values this process computes (a resume that redoes one value redoes it alone).
    trained_state = _rng_state()
    records = []
    for run in training.runs():
        _set_rng_state(trained_state)
        try:
            records.append(_evaluate(config, run, copy.deepcopy(model), batches, (x_val, y_val, x_test, y_test),
                                     out_dir, device, bar, shared, wall))
        except Exception as e:  # one failed value does not lose the training's other values
            logger.error("run %s failed: %s: %s", run.key, type(e).__name__, e)
            records.append({"key": run.key, "failed": f"{type(e).__name__}: {e}"})
    bar.close()
    return records


def _evaluate(config: Config, run: Run, model: SVIModel, batches: Any, data: tuple, out_dir: Path,
              device: torch.device, bar: Any, shared: dict[str, Any], wall: float) -> dict[str, Any]:
    """Threshold (and fine-tune) a copy of the trained model at ``run.value``, export, measure, save."""
    recipe, grid, net = config.recipe, config.methods[run.method], model.net
    x_val, y_val, x_test, y_test = data
    posthoc_start = time.perf_counter()
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
    caught = [str(x.message) for x in w]

    start = time.perf_counter()
    if recipe.finetune_epochs:
        for _, layer in sparse_layers(net):
            layer.set_options_(warmup=(0.0, 0.0))  # the regularizer is fully on: no second warm-up
        fit_svi(model, batches, epochs=recipe.finetune_epochs, lr=recipe.lr * recipe.finetune_lr_factor,
                lr_lambda=lambda e: 1.0, progress=False, on_epoch_end=lambda epoch, stats: bar.update(1))
    finetune_seconds = time.perf_counter() - start

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
        "config_hash": config.hash, "recipe_hash": config.recipe_hash, "run_hash": config.run_hash(run.method),
        "config_name": config.name, "recipe": asdict(recipe),
        "key": run.key, "net": run.net,
        "method": run.method, "strength": run.strength, "value": run.value, "seed": run.seed,
        "training": shared["training"], "options": shared["options"], "threshold": threshold,
        "val_error": val_error, "test_error": test_error,
        "compression": _finite(rep.compression), "weights": rep.weights, "nonzero": rep.nonzero,
        "layers": [{"name": r.name, "shape": list(r.shape), "weights": r.weights, "nonzero": r.nonzero,
                    "density": r.density, "units": u["units"], "units_kept": u["kept"]}
                   for r, u in zip(rep.layers, units)],
        "units_kept": [u["kept"] for u in units], "macs": flops, "flop_reduction": _finite(flops["reduction"]),
        "latency": speed,
        "speedup_batch1": speed["batch1"]["speedup"] if speed else None,
        "speedup_batch64": speed["batch64"]["speedup"] if speed else None,
        "log_alpha_hist": shared["log_alpha_hist"],
        "pretrain_seconds": shared["pretrain_seconds"], "train_seconds": shared["train_seconds"],
        "finetune_seconds": finetune_seconds, "posthoc_seconds": time.perf_counter() - posthoc_start,
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
              progress: bool = True, only: Optional[Sequence[str]] = None,
              seeds: Optional[Sequence[int]] = None) -> BenchResult:
    """Run every run of ``config`` that ``out/results.jsonl`` lacks, one process per training, ``jobs`` at a time.

    A training with a post-hoc strength (``"threshold"``, ``"sparsity"``) produces the runs of every value
    (see :class:`~bayes_sparse.bench.config.Training`); if only some of them are in the file, it is trained
    again (same seed and recipe) for the missing values only.

    Args:
        config: The checked config (:func:`~bayes_sparse.bench.config.load_config`).
        out: Output folder: ``results.jsonl``, ``config.json``, ``models/*.safetensors``.
        jobs: Trainings in parallel; with more than one, each process uses one torch thread.
        resume: Continue a results file of this config (only missing runs are run); without it a file that
            already holds runs of the selection is refused.
        device: ``"cpu"`` or ``"cuda"`` (training; latency is always measured on the CPU).
        progress: tqdm bars: one overall (runs), one per running training.
        only: Run only these methods of the config (``None``: all).
        seeds: Run only these seeds of the config (``None``: all). Neither filter changes the config's hash, so
            the parts of a sweep can be run one after another into the same folder.

    Returns:
        A :class:`BenchResult`.

    Raises:
        ValueError: bad ``jobs``, a method or seed not in the config, a results file of another config or with
            a corrupt line before its last, finished runs of the selection in the file without ``resume``,
            or another ``bench`` running into the same folder.
        RuntimeError: ``device="cuda"`` without a GPU; some trainings failed (after the others finished and were
            recorded; the message names them and their errors).
        KeyboardInterrupt: Ctrl-C (or SIGTERM through the ``bayes-sparse`` command): the trainings in progress
            are ended at once, the finished runs stay in the file, and ``resume`` goes on from there. Workers
            (and the multiprocessing manager) whose sweep process was killed outright end themselves within
            seconds.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    check_device(device)
    trainings = config.trainings(only, seeds)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with _lock(out):
        return _run_bench(config, out, trainings, jobs, resume, device, progress, bool(only or seeds))


@contextlib.contextmanager
def _lock(out: Path, busy: Optional[str] = None) -> Iterator[None]:
    """Hold ``out/.bench.lock`` (an exclusive ``flock``, released when the process ends) while a sweep writes to
    ``out``: two sweeps appending to one results file would cut each other's lines when repairing a tail."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out / ".bench.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(busy or f"another bayes-sparse bench is writing to {out}; run the parts of a sweep one "
                             "after another into one folder (--resume), or wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_bench(config: Config, out: Path, trainings: list[Training], jobs: int, resume: bool, device: str,
               progress: bool, filtered: bool) -> BenchResult:
    results = ResultsFile(out / "results.jsonl", config)
    rows = results.read()
    done = {r["key"] for r in rows}
    runs = [r for t in trainings for r in t.runs()]
    skipped = [r.key for r in runs if r.key in done]
    if skipped and not resume:
        which = "of the selected methods/seeds" if filtered else "of this config"
        raise ValueError(f"{results.path} already holds {len(skipped)} finished run(s) {which}; pass --resume to "
                         "run only the missing ones, or write to another folder (--out DIR)")
    (out / "config.json").write_text(json.dumps({"hash": config.hash, **config.to_dict()}, indent=2,
                                                default=_jsonable))
    todo = []
    for t in trainings:
        missing = tuple(r.value for r in t.runs() if r.key not in done)
        if missing:
            todo.append(t.only(missing))
    ran: list[str] = []
    trained: list[str] = []
    failed: list[str] = []
    if not todo:
        return BenchResult(ran, skipped, results.path, trained)
    ctx = multiprocessing.get_context("spawn")
    overall = tqdm(total=len(runs), initial=len(skipped), position=0, desc=config.name, unit="run",
                   disable=not progress)
    manager = SyncManager(ctx=ctx)
    manager.start(_end_with_parent)  # its server process, too, ends if this process is killed
    with manager:
        slots = manager.Queue()
        for i in range(1, jobs + 1):
            slots.put(i)
        # each worker watches for the sweep's end from its start, before it has a training to run
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, max_tasks_per_child=1,
                                 initializer=_end_with_parent) as pool:
            pending: dict = {}
            try:  # the submissions too: a worker starts on submit, and Ctrl-C/SIGTERM can land between two
                for t in todo:
                    pending[pool.submit(execute, config, t, str(out), device, slots, jobs > 1, progress)] = t
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        t = pending.pop(fut)
                        try:
                            records = fut.result()
                        except Exception as e:  # one failed training does not stop the others
                            logger.error("training %s failed: %s: %s", t.key, type(e).__name__, e)
                            failed.append(f"{t.key}: {type(e).__name__}: {e}")
                        else:
                            for row in records:
                                if "failed" in row:  # a value whose threshold/export/measurement raised
                                    failed.append(f"{row['key']}: {row['failed']}")
                                    continue
                                results.append(row)
                                ran.append(row["key"])
                            trained.append(t.key)
                        overall.update(len(t.values))
            except BaseException:  # Ctrl-C, SIGTERM (the CLI turns it into KeyboardInterrupt), or an error here
                for fut in pending:
                    fut.cancel()
                stopped = _terminate_workers(pool)
                overall.close()
                logger.warning("sweep stopped: %d training(s) in progress were ended; the %d finished run(s) are "
                               "in %s; rerun with --resume to go on", stopped, len(ran), results.path)
                raise
    overall.close()
    if failed:
        raise RuntimeError(f"{len(failed)} training(s) or run(s) failed (the {len(ran)} finished runs are in "
                           f"{results.path}; rerun with --resume to retry the others):\n  " + "\n  ".join(failed))
    return BenchResult(ran, skipped, results.path, trained)
