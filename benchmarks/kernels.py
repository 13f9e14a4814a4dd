"""Sparse kernels vs dense, measured side by side in one run (CPU).

For Linear layers 300x784, 1024x1024, 4096x4096 and a Conv2d (64->64, 3x3, 32x32 input), densities
10/5/2/1%, batch 1/64/256 and 1/2 threads, every kernel of ``bayes_sparse.export`` (plus scipy's CSR on
Linear layers at batch 1, 1 thread, as an outside reference) is timed with ``torch.utils.benchmark``
against dense ``F.linear`` / ``F.conv2d`` on the same input. Masks are random, except the 300x784 layer
also gets the mask of the trained LeNet-300-100 Sparse VD model when ``results/lenet300_vd_model.safetensors``
exists. Writes ``results/kernels.json`` and ``results/kernels.png``.

Memory-bandwidth ceiling at batch 1: dense fp32 reads 4 bytes per weight, a CSR kernel reads
(value + index) bytes per non-zero, so speedup <= 4 / (bytes_per_nnz x density); reported as
``ceiling`` and ``fraction_of_ceiling`` (the weights of a very sparse layer fit in cache, so a kernel
can beat this bound).

    python benchmarks/kernels.py            # about 5 minutes on 2 cores
    python benchmarks/kernels.py --quick    # fewer configurations
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils import benchmark

from bayes_sparse.export import KERNELS, SparseKernel, _csrkernel

RESULTS = Path(__file__).parent / "results"
BYTES_PER_NNZ = {"csr": 4 + 8, "bsr": 4 + 8 / 16, "fast_csr": 4 + 2, "scipy_csr": 4 + 4, "dense": None}


def timeit(fn, threads: int, min_run_time: float) -> float:
    return benchmark.Timer("f()", globals={"f": fn}, num_threads=threads).blocked_autorange(
        min_run_time=min_run_time).median


def real_mask() -> torch.Tensor | None:
    path = RESULTS / "lenet300_vd_model.safetensors"
    if not path.exists():
        return None
    from safetensors.torch import load_file
    return load_file(str(path))["0.weight_mask"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--min-run-time", type=float, default=0.2)
    args = p.parse_args()
    torch.manual_seed(0)
    densities = [0.10, 0.05, 0.02, 0.01]
    batches, threads_list = ([1, 64], [1]) if args.quick else ([1, 64, 256], [1, 2])
    shapes = [("linear", (300, 784)), ("linear", (1024, 1024)), ("linear", (4096, 4096)), ("conv2d", (64, 64))]
    cases = [(kind, shape, d, "random") for kind, shape in shapes for d in densities]
    mask = real_mask()
    if mask is not None:
        cases.insert(0, ("linear", (300, 784), float(mask.float().mean()), "LeNet-300-100 Sparse VD layer 1"))
    kernels = [k for k in KERNELS if k != "dense" and (k != "fast_csr" or _csrkernel.available())]
    rows = []
    started = time.time()
    for kind, shape, density, source in cases:
        if kind == "linear":
            layer = nn.Linear(shape[1], shape[0])
            m = mask if source != "random" else torch.rand(shape) < density
        else:
            layer = nn.Conv2d(shape[1], shape[0], 3, padding=1)
            m = torch.rand(layer.weight.shape) < density
        with torch.no_grad():
            layer.weight.mul_(m.float())
        layer.eval()
        built = {k: SparseKernel(layer, k) for k in kernels}
        for batch in batches:
            x = torch.randn(batch, shape[1]) if kind == "linear" else torch.randn(batch, shape[1], 32, 32)
            if kind == "conv2d" and batch > 64:
                continue  # im2col at batch 256 on 32x32 takes long on 2 cores and adds nothing
            with torch.no_grad():
                ref = layer(x)
            for threads in threads_list:
                with torch.no_grad():
                    t_dense = timeit(lambda: layer(x), threads, args.min_run_time)
                    for k, mod in built.items():
                        err = float((mod(x) - ref).abs().max())
                        t = timeit(lambda: mod(x), threads, args.min_run_time)
                        ceiling = 4 / (BYTES_PER_NNZ[k] * density)
                        rows.append({"layer": kind, "shape": list(shape), "density": density, "mask": source,
                                     "batch": batch, "threads": threads, "kernel": k, "dense_s": t_dense,
                                     "kernel_s": t, "speedup": t_dense / t, "max_abs_error": err,
                                     "ceiling": ceiling, "fraction_of_ceiling": (t_dense / t) / ceiling})
                    if kind == "linear" and batch == 1 and threads == 1:
                        try:
                            import scipy.sparse as sp
                            w = sp.csr_matrix(layer.weight.detach().numpy())
                            xv = x[0].numpy()
                            t = timeit(lambda: w @ xv, 1, args.min_run_time)
                            rows.append({"layer": kind, "shape": list(shape), "density": density, "mask": source,
                                         "batch": 1, "threads": 1, "kernel": "scipy_csr", "dense_s": t_dense,
                                         "kernel_s": t, "speedup": t_dense / t, "max_abs_error": None,
                                         "ceiling": 4 / (8 * density),
                                         "fraction_of_ceiling": (t_dense / t) / (4 / (8 * density))})
                        except ImportError:
                            pass
            best = max((r for r in rows if r["shape"] == list(shape) and r["density"] == density
                        and r["batch"] == batch and r["mask"] == source), key=lambda r: r["speedup"])
            print(f"{kind} {shape} d={density:.3f} ({source}) batch {batch}: best {best['kernel']} "
                  f"{best['speedup']:.1f}x (threads {best['threads']})", flush=True)
    models = model_level(args.min_run_time)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"rows": rows, "models": models, "seconds": time.time() - started, "torch": torch.__version__,
           "machine": platform.machine(), "processor": platform.processor(), "cpus": torch.get_num_threads(),
           "command": "python benchmarks/kernels.py" + (" --quick" if args.quick else "")}
    (RESULTS / "kernels.json").write_text(json.dumps(out, indent=2))
    _plot(rows)
    goal = [r for r in rows if r["shape"] == [4096, 4096] and r["density"] == 0.01 and r["batch"] == 1
            and r["threads"] == 1]
    for r in sorted(goal, key=lambda r: -r["speedup"]):
        print(f"4096x4096, 99% sparse, batch 1, 1 thread: {r['kernel']:10s} {r['speedup']:6.1f}x "
              f"({1e6 * r['kernel_s']:.0f} us vs dense {1e6 * r['dense_s']:.0f} us)")
    print(f"wrote {RESULTS / 'kernels.json'}")


def model_level(min_run_time: float) -> list[dict]:
    """The trained LeNet-300-100 Sparse VD model, compiled with kernel="auto", vs its dense export."""
    path = RESULTS / "lenet300_vd_model.safetensors"
    if not path.exists():
        return []
    import sys

    from safetensors.torch import load_file

    import bayes_sparse as bs
    sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
    from lenet300_mnist import lenet300
    net = lenet300()
    try:  # written by bs.export.save_checkpoint (the example's --save-model)
        bs.export.load_checkpoint(net, path)
    except ValueError:  # an older file: a plain safetensors state_dict
        net.load_state_dict(load_file(str(path)))
    dense = bs.to_dense(net).eval()
    out = []
    for batch in (1, 64):
        for threads in (1, 2):
            x = torch.rand(batch, 784)
            fast = bs.export.compile(net, kernel="auto", batch_size=batch, threads=threads)
            with torch.no_grad():
                err = float((fast(x) - dense(x)).abs().max())
                t_dense = timeit(lambda: dense(x), threads, min_run_time)
                t_fast = timeit(lambda: fast(x), threads, min_run_time)
            row = {"model": "LeNet-300-100 Sparse VD", "batch": batch, "threads": threads, "dense_s": t_dense,
                   "compiled_s": t_fast, "speedup": t_dense / t_fast, "max_abs_error": err,
                   "kernels": [r["kernel"] for r in bs.export.kernel_report(fast)]}
            out.append(row)
            print(f"model LeNet-300-100 VD batch {batch} threads {threads}: compiled {row['speedup']:.2f}x "
                  f"faster than dense, kernels {row['kernels']}", flush=True)
    return out


def _plot(rows: list[dict]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 4, figsize=(16, 4), sharey=True)
    for ax, shape in zip(axes, ([300, 784], [1024, 1024], [4096, 4096], [64, 64])):
        for k in sorted({r["kernel"] for r in rows}):
            pts = sorted((r["density"], r["speedup"]) for r in rows if r["shape"] == shape and r["kernel"] == k
                         and r["batch"] == 1 and r["threads"] == 1 and r["mask"] == "random")
            if pts:
                ax.plot([100 * (1 - d) for d, _ in pts], [s for _, s in pts], marker="o", label=k)
        ax.axhline(1, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(("conv2d 64x64x3x3" if shape == [64, 64] else f"linear {shape[0]}x{shape[1]}")
                     + ", batch 1, 1 thread")
        ax.set_xlabel("sparsity (%)")
    axes[0].set_ylabel("speedup over dense (x)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "kernels.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
