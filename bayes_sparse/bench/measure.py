"""Time the saved models of a sweep afterwards, alone on the machine: ``bayes-sparse measure RESULTS.jsonl``.

A sweep runs trainings side by side, so a latency timed inside it is timed on a busy machine. A config with
``latency_rounds = 0`` leaves it out, and this step times every run's saved model (the file written by
:func:`bayes_sparse.export.save`, loaded into the unmodified architecture) once the sweep is over, one thread:

* the compiled sparse model (``export.compile(kernel="auto")``) against the dense model, batch 1 and 64, as
  the runner would (:func:`bayes_sparse.bench.metrics.latency`);
* where the run removed whole units, the physically shrunk model (:func:`bayes_sparse.export.shrink`)
  against the dense model, plain torch, interleaved the same way.

Each measured run is appended to ``latency.jsonl`` beside the results (one JSON line per run, ``fsync``-ed, the
config's hash and the run record's :func:`fingerprint` on every line), so a killed ``measure`` resumes where it
stopped; :func:`read_results` merges the lines into the run records they were measured for (they replace a
latency measured during the sweep; a run redone since is timed again). The load average is recorded
with each line, and a busy machine is warned about; the sweep's lock is held, so ``measure`` refuses to time
while a sweep writes to the same folder.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from tqdm.auto import tqdm

from .. import export
from .metrics import _time_pair, latency
from .nets import NETS, load_data

__all__ = ["LATENCY_FILE", "MeasureResult", "fingerprint", "measure", "merge_latency", "model_file"]

logger = logging.getLogger(__name__)

#: The file beside ``results.jsonl`` that ``measure`` appends to.
LATENCY_FILE = "latency.jsonl"

#: Load average (1 minute) beyond this process's own 1.0 above which the machine counts as busy.
BUSY_LOAD = 0.5


@dataclass(frozen=True)
class MeasureResult:
    """What :func:`measure` did: the run keys it timed, the keys already in the file, the file."""

    measured: list[str]
    skipped: list[str]
    path: Path


def model_file(row: dict[str, Any], results: Path) -> Path:
    """The saved model of a run record: its ``model_path`` as written, else the same name under the results'
    ``models/`` folder (the sweep ran from another working directory, or the folder was moved).

    Raises:
        FileNotFoundError: neither exists.
    """
    recorded = Path(row["model_path"])
    for p in (recorded, results.parent / "models" / recorded.name):
        if p.is_file():
            return p
    raise FileNotFoundError(f"run {row['key']!r}: its model file {recorded} is missing (also not in "
                            f"{results.parent / 'models'}); rerun that run with bayes-sparse bench --resume after "
                            "removing its line, or restore the file")


def _removes_units(row: dict[str, Any]) -> bool:
    return any(layer["units_kept"] < layer["units"] for layer in row.get("layers", [])[:-1])


def _time_shrunk(dense: torch.nn.Module, x: torch.Tensor, rounds: int) -> dict[str, Any]:
    small = export.shrink(dense, x[:8])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out: dict[str, Any] = {"parameters": sum(p.numel() for p in small.parameters()),
                               "parameters_dense": sum(p.numel() for p in dense.parameters())}
        for b in (1, 64):
            xb = x[:1].expand(b, *x.shape[1:]).contiguous()
            out[f"batch{b}"] = _time_pair(dense, small, xb, rounds)
        return out
    finally:
        torch.set_num_threads(threads)


def measure(results: Union[str, Path], rounds: int = 7, force: bool = False, progress: bool = True,
            shrunk: bool = True) -> MeasureResult:
    """Time every run's saved model of ``results`` not yet in ``latency.jsonl`` beside it.

    Args:
        results: A ``results.jsonl`` written by ``bayes-sparse bench``.
        rounds: Interleaved rounds per measurement (median), >= 1.
        force: Time every run again (lines are appended; the last line of a key wins).
        progress: Show a progress bar.
        shrunk: Also time the shrunk model of runs that removed whole units.

    Returns:
        A :class:`MeasureResult`.

    Raises:
        FileNotFoundError: no results file, or a run's model file is missing.
        ValueError: ``rounds`` < 1, a results or latency file of another config, or a sweep writing to the
            same folder.
    """
    from .report import read_results
    from .runner import ResultsFile, _lock

    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    results = Path(results)
    rows = read_results(results, merge_latency=False)
    field = "recipe_hash" if "recipe_hash" in rows[0] else "config_hash"  # runs written before recipe_hash
    config_hash = rows[0][field]
    out = ResultsFile(results.parent / LATENCY_FILE, config_hash, field=field)
    busy = (f"a bayes-sparse bench or measure is using {results.parent}; time its models after it has finished "
            "(timings beside a training are off)")
    with _lock(results.parent, busy):
        done = {(r["key"], r.get("run_fingerprint")) for r in out.read()}
        todo = [r for r in rows if force or (r["key"], fingerprint(r)) not in done]
        skipped = [r["key"] for r in rows if r not in todo]
        for r in todo:  # every file checked before anything is timed: raises, naming the first missing run
            model_file(r, results)
        examples: dict[str, torch.Tensor] = {}
        measured: list[str] = []
        warned = False
        for row in tqdm(todo, desc=f"measure {results.parent.name}", unit="run", disable=not progress):
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            if load is not None and load > 1.0 + BUSY_LOAD and not warned:  # this process counts about 1
                warnings.warn(f"the machine is busy (load average {load:.2f}) while timing {row['key']}: the "
                              "figures may be off; time with nothing else running (each line records the load)",
                              UserWarning, stacklevel=2)
                warned = True
            net = row["net"]
            if net not in examples:
                examples[net] = load_data(net, row["recipe"]["val_size"])[4][:64].cpu()
            x = examples[net]
            dense = export.load(model_file(row, results), NETS[net].build()).eval()
            speed = latency(dense, x, rounds=rounds)
            line: dict[str, Any] = {
                field: config_hash, "key": row["key"], "run_fingerprint": fingerprint(row), "latency": speed,
                "speedup_batch1": speed["batch1"]["speedup"], "speedup_batch64": speed["batch64"]["speedup"],
                "measure": {"loadavg": load, "torch": torch.__version__, "machine": platform.machine(),
                            "processor": platform.processor() or None, "rounds": rounds},
            }
            if shrunk and _removes_units(row):
                try:
                    s = _time_shrunk(copy.deepcopy(dense), x, rounds)
                except ValueError as e:  # shrink refused this model: recorded, the other runs go on
                    logger.warning("run %s: no shrunk timing: %s", row["key"], e)
                    line["shrunk_error"] = str(e)
                else:
                    line.update({"latency_shrunk": s, "speedup_shrunk_batch1": s["batch1"]["speedup"],
                                 "speedup_shrunk_batch64": s["batch64"]["speedup"]})
            out.append(line)
            measured.append(row["key"])
    return MeasureResult(measured, skipped, out.path)


def fingerprint(row: dict[str, Any]) -> str:
    """A hash of a run record as ``bench`` wrote it: a line of ``latency.jsonl`` belongs to the record with the same
    key and fingerprint (a run redone later is timed again, and never gets the old model's timing)."""
    clean = {k: v for k, v in row.items() if k != "latency_measured"}
    return hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest()[:16]


def merge_latency(rows: list[dict[str, Any]], results: Path) -> list[dict[str, Any]]:
    """``rows`` with the lines of ``latency.jsonl`` beside ``results`` merged in (the last line of a key wins);
    ``rows`` unchanged when there is no such file."""
    from .runner import ResultsFile

    path = results.parent / LATENCY_FILE
    if not path.exists() or not rows:
        return rows
    field = "recipe_hash" if "recipe_hash" in rows[0] else "config_hash"
    lines = {(r["key"], r.get("run_fingerprint")): r for r in ResultsFile(path, rows[0].get(field), field=field).read()}
    merged = []
    for row in rows:
        extra = lines.pop((row["key"], fingerprint(row)), None)
        if extra is not None:
            row = {**row, **{k: v for k, v in extra.items() if k not in ("config_hash", "recipe_hash", "key", "run_fingerprint")},
                   "latency_measured": "afterwards"}
        merged.append(row)
    if lines:
        logger.info("%s: %d line(s) belong to no run of the results (runs redone since): ignored", path, len(lines))
    return merged
