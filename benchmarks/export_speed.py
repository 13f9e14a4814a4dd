"""Export speed on real model sizes: ``bs.export.save`` against ``torch.save``, and ``compile(kernel="auto")``.

Each torchvision model (random weights) is sparsified by magnitude and thresholded at ``--sparsity``. Save:
``bs.export.save(net, path)`` (default: lossless float32, ``effort="auto"``) is timed against
``torch.save`` of the dense twin's state_dict, both as given (``torch_save_s``) and including making it
(``bs.to_dense(net).state_dict()``, ``to_dense_torch_save_s``), interleaved in one process, medians of
``--rounds``; the file is loaded back and checked to hold exactly the dense twin's numbers, and one save
with ``effort="best"`` gives the smallest file for comparison. Compile:
``bs.export.compile(net, kernel="auto", example_input=torch.randn(batch, 3, S, S))`` is timed (once per
``--compile-rounds``, each from scratch; the C++ kernel is built or loaded before, and that is timed
apart), its kernels counted, its output compared with the dense model's, and both forwards timed,
interleaved. Run with one thread (``OMP_NUM_THREADS=1``, ``--threads 1``); timings on a shared
machine are noisy, so compare the ratios. Writes ``results/export_speed.json``.

    OMP_NUM_THREADS=1 python benchmarks/export_speed.py                  # densenet121 save; compile of 3 models
    OMP_NUM_THREADS=1 python benchmarks/export_speed.py --models densenet121 --input-size 64 --rounds 3
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

import bayes_sparse as bs

RESULTS = Path(__file__).parent / "results"


def sparse_model(name: str, sparsity: float) -> torch.nn.Module:
    torch.manual_seed(0)
    net = bs.sparsify(getattr(torchvision.models, name)(weights=None), method="magnitude")
    bs.threshold_(net, sparsity=sparsity)
    return net.eval()


def clock(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def machine() -> dict:
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu or platform.processor(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def bench_save(name: str, net: torch.nn.Module, rounds: int, best: bool) -> dict:
    dense_sd = bs.to_dense(net).state_dict()
    times = collections.defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        ours, ref = Path(tmp) / "m.safetensors", Path(tmp) / "m.pt"
        report = None
        for _ in range(rounds):  # interleaved, so that a burst of load on the machine hits all of them
            times["torch_save_s"].append(clock(lambda: torch.save(dense_sd, ref)))
            times["to_dense_torch_save_s"].append(clock(lambda: torch.save(bs.to_dense(net).state_dict(), ref)))
            t = time.perf_counter()
            report = bs.export.save(net, ours)
            times["save_s"].append(time.perf_counter() - t)
            times["load_state_dict_s"].append(clock(lambda: bs.export.load_state_dict(ours)))
        back = bs.export.load_state_dict(ours)
        exact = sorted(back) == sorted(dense_sd) and all(torch.equal(back[k], v) for k, v in dense_sd.items())
        row = {k: statistics.median(v) for k, v in times.items()}
        row.update({"model": name, "rounds": rounds, "all_s": dict(times),
                    "ratio_save_to_torch_save": row["save_s"] / row["torch_save_s"],
                    "ratio_save_to_to_dense_torch_save": row["save_s"] / row["to_dense_torch_save_s"],
                    "file_bytes": report.total_bytes, "torch_save_bytes": ref.stat().st_size,
                    "loads_exactly": exact,
                    "encodings": dict(collections.Counter(v["encoding"] for v in report.layers.values())),
                    "nonzero_weights": sum(v.get("nnz", 0) for v in report.layers.values())})
        if best and "effort" in inspect.signature(bs.export.save).parameters:
            t = time.perf_counter()
            rep = bs.export.save(net, ours, effort="best")
            row["effort_best"] = {"save_s": time.perf_counter() - t, "file_bytes": rep.total_bytes}
    print(f"{name}: save {row['save_s']:.3f} s, torch.save {row['torch_save_s']:.3f} s "
          f"(x{row['ratio_save_to_torch_save']:.2f}; with to_dense {row['to_dense_torch_save_s']:.3f} s, "
          f"x{row['ratio_save_to_to_dense_torch_save']:.2f}), load {row['load_state_dict_s']:.3f} s, "
          f"{row['file_bytes']:,} bytes vs {row['torch_save_bytes']:,}, exact={exact}", flush=True)
    return row


def forward_s(models: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int = 11) -> dict[str, float]:
    """Median seconds per forward of each model, interleaved (a burst of load hits them all alike)."""
    times = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(x)
        for _ in range(rounds):
            for k, m in models.items():
                times[k].append(clock(lambda: m(x)))
    return {k: statistics.median(v) for k, v in times.items()}


def bench_compile(name: str, net: torch.nn.Module, size: int, batch: int, threads: int, rounds: int) -> dict:
    x = torch.randn(batch, 3, size, size)
    seconds, fast = [], None
    for _ in range(rounds):
        t = time.perf_counter()
        fast = bs.export.compile(net, kernel="auto", batch_size=batch, threads=threads, example_input=x)
        seconds.append(time.perf_counter() - t)
    report = bs.export.kernel_report(fast)
    dense = bs.to_dense(net).eval()
    with torch.no_grad():
        err = float((fast(x) - dense(x)).abs().max())
    counts = collections.Counter(f"{r['type']} {r['kernel']}" for r in report)
    row = {"model": name, "input": [batch, 3, size, size], "threads": threads, "compile_s": statistics.median(seconds),
           "all_compile_s": seconds, "layers": len(report), "kernel_counts": dict(sorted(counts.items())),
           "timed_layers": sum(1 for r in report if r["timings"] and not r.get("cached", False)),
           "cached_layers": sum(1 for r in report if r.get("cached", False)),
           "max_abs_error": err}
    fwd = forward_s({"dense": dense, "compiled": fast}, x)
    row.update({"dense_forward_s": fwd["dense"], "compiled_forward_s": fwd["compiled"]})
    row["speedup"] = row["dense_forward_s"] / row["compiled_forward_s"]
    print(f"{name} @{size}: compile {row['compile_s']:.1f} s, {dict(counts)}, timed {row['timed_layers']} cached "
          f"{row['cached_layers']}, forward {row['dense_forward_s'] * 1e3:.1f} -> {row['compiled_forward_s'] * 1e3:.1f} ms, "
          f"max |diff| {err:.2e}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--save-models", nargs="*", default=["densenet121"], help="torchvision models for save timing")
    p.add_argument("--models", nargs="*", default=["densenet121", "regnet_y_400mf", "efficientnet_b0"],
                   help="torchvision models for compile timing")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the save timings")
    p.add_argument("--compile-rounds", type=int, default=1)
    p.add_argument("--input-size", type=int, default=224, help="height and width of compile's example input")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-best", action="store_true", help="skip the one save with effort='best'")
    p.add_argument("--out", type=Path, default=RESULTS / "export_speed.json")
    p.add_argument("--baseline", type=Path, help="an earlier output of this script to embed for comparison")
    p.add_argument("--baseline-note", default="", help="what the baseline ran (e.g. the commit)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
           "machine": machine(), "sparsity": args.sparsity, "save": [], "compile": []}
    start = time.perf_counter()
    from bayes_sparse.export import _csrkernel
    t = time.perf_counter()  # build or load the C++ kernel once, outside the compile timings
    out["cpp_kernel"] = {"available": _csrkernel.available(), "load_s": time.perf_counter() - t}
    for name in args.save_models:
        out["save"].append(bench_save(name, sparse_model(name, args.sparsity), args.rounds, not args.no_best))
    for name in args.models:
        out["compile"].append(bench_compile(name, sparse_model(name, args.sparsity), args.input_size,
                                            args.batch_size, args.threads, args.compile_rounds))
    out["seconds"] = time.perf_counter() - start
    if args.baseline is not None:
        base = json.loads(args.baseline.read_text())
        out["baseline"] = {"note": args.baseline_note, **{k: base.get(k) for k in ("command", "machine", "save", "compile")}}
    out["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
