"""The ``bayes-sparse`` command: ``bench`` (run a config), ``measure`` (time its saved models afterwards),
``report`` (aggregate results), ``inspect`` (a saved file).

    bayes-sparse bench benchmarks/configs/smoke.toml --out runs/smoke --jobs 2
    bayes-sparse measure runs/smoke/results.jsonl
    bayes-sparse report runs/smoke/results.jsonl
    bayes-sparse inspect runs/smoke/models/<run>.safetensors

The logic lives in :mod:`bayes_sparse.bench` and :mod:`bayes_sparse.export`; this module only parses
arguments and turns the library's errors into one-line messages (exit status 2).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bayes-sparse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="run a benchmark config (one process per training)")
    b.add_argument("config", type=Path, help="TOML config (see benchmarks/configs/)")
    b.add_argument("--jobs", "-j", type=int, default=1,
                   help="trainings in parallel (each on one torch thread when > 1)")
    b.add_argument("--resume", action="store_true",
                   help="run only the runs missing from OUT/results.jsonl (a training with some of its values "
                        "missing is redone for those only)")
    b.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<config name>)")
    b.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to train")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.add_argument("--only", type=_names, default=None, metavar="METHOD[,METHOD]",
                   help="run only these methods of the config (the config and its hash are unchanged: run the "
                        "parts of a sweep one after another into the same --out; --resume only to continue a part)")
    b.add_argument("--seeds", type=_ints, default=None, metavar="SEED[,SEED]",
                   help="run only these seeds of the config (same rules as --only)")
    r = sub.add_parser("report", help="aggregate a results.jsonl: summary.md, summary.json, PNG plots")
    r.add_argument("results", type=Path)
    r.add_argument("--out", type=Path, default=None, help="output folder (default: beside the results)")
    r.add_argument("--readme", type=Path, default=None,
                   help="also put the table and the error-vs-compression plot into this README, between the lines "
                        "<!-- bench:NAME:start --> and <!-- bench:NAME:end --> (NAME: the config's name)")
    m = sub.add_parser("measure", help="time the saved models of a finished sweep (alone on the machine), into "
                                       "latency.jsonl beside the results; report merges it")
    m.add_argument("results", type=Path)
    m.add_argument("--rounds", type=int, default=7, help="interleaved rounds per measurement (median)")
    m.add_argument("--force", action="store_true", help="time the runs already in latency.jsonl again")
    m.add_argument("--no-shrunk", action="store_true", help="do not time the shrunk models")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    i = sub.add_parser("inspect", help="per-tensor table of a file written by bayes_sparse.export.save")
    i.add_argument("model", type=Path)
    return p


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the main thread while the body runs (so a sweep ends its workers)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _bench(args: argparse.Namespace) -> int:
    from .bench import load_config, run_bench

    config = load_config(args.config)
    out = args.out or Path("runs") / config.name
    start = time.perf_counter()
    with _sigterm_as_interrupt():  # `kill` stops the workers too, as Ctrl-C does
        result = run_bench(config, out, jobs=args.jobs, resume=args.resume, device=args.device,
                           progress=not args.no_progress, only=args.only, seeds=args.seeds)
    print(f"{len(result.ran)} run(s) done ({len(result.trainings)} training(s)), {len(result.skipped)} already in "
          f"{result.results} "
          f"({time.perf_counter() - start:.0f} s); next: bayes-sparse report {result.results}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .bench.report import write_report

    written = write_report(args.results, args.out)
    print(f"wrote {written['summary']}, {written['json']}" + "".join(f", {p}" for p in written["plots"]))
    if args.readme is not None:
        from .bench.report import update_readme

        print(f"updated {update_readme(args.readme, written)}")
    return 0


def _measure(args: argparse.Namespace) -> int:
    from .bench.measure import measure

    start = time.perf_counter()
    result = measure(args.results, rounds=args.rounds, force=args.force, progress=not args.no_progress,
                     shrunk=not args.no_shrunk)
    print(f"timed {len(result.measured)} run(s), {len(result.skipped)} already in {result.path} "
          f"({time.perf_counter() - start:.0f} s); next: bayes-sparse report {args.results}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .export import describe_file

    print(describe_file(args.model))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``bayes-sparse`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    try:
        return {"bench": _bench, "report": _report, "measure": _measure,
                "inspect": _inspect}[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:  # bad input: one clear line, no traceback
        print(f"bayes-sparse {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM during bench (the workers are already stopped)
        print(f"bayes-sparse {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
