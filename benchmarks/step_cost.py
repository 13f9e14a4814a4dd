"""Cost of one training step: every method's sparse step against the dense step, SVI against the plain loop.

Measured side by side in one process: the variants of one (net, threads) setting run in interleaved
rounds (each round times ``--steps`` steps of every variant in turn) and the median over ``--rounds``
rounds is reported, so machine noise hits every variant alike. Batch 100 of synthetic MNIST-shaped data
(timing does not depend on the values).

    python benchmarks/step_cost.py                      # writes benchmarks/results/step_cost.json
    python benchmarks/step_cost.py --nets lenet300 --threads 1 --compile

Variants per method: ``plain`` (loss = CE + regularizer / N, fused Adam, the schedule hook after the step),
``guarded`` (the same with :func:`bayes_sparse.check_finite_` between backward and the step, as the documented
plain loop has it: the like-for-like reference of the guarded SVI step),
``svi`` (:class:`bayes_sparse.SVIStep` on :class:`bayes_sparse.SVIModel`: the step :func:`bayes_sparse.fit_svi`
takes, ``Trace_ELBO``, its finiteness guard and fused Adam, then the schedule hook), and with ``--compile``
``compiled`` (the plain step's loss under ``torch.compile``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import pyro
import torch
import torch.nn.functional as F

import bayes_sparse as bs

sys.path.insert(0, str(Path(__file__).parent))
from mnist_methods import NETS  # noqa: E402

RESULTS = Path(__file__).parent / "results"
N = 60_000


def _plain_step(net, opt, x, y, sparse: bool, loss_fn=None, guarded: bool = False) -> Callable[[], None]:
    def loss_of():
        loss = F.cross_entropy(net(x), y)
        return loss + bs.regularizer(net) / N if sparse else loss

    compute = loss_fn or loss_of

    def step():
        loss = compute()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if guarded:  # the documented plain loop's finiteness guard, as SVIStep has its own
            bs.check_finite_(net, loss)
        opt.step()
        if sparse:
            bs.after_step(net, 1e-3, N)
    return step


def _svi_step(net, x, y) -> Callable[[], None]:
    step = bs.SVIStep(bs.SVIModel(net, num_data=N), lr=1e-3)  # the step fit_svi takes, guard included

    def run():
        step(x, y)
        bs.after_step(net, 1e-3, N)
    return run


def _adam(net) -> torch.optim.Adam:
    return torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)  # as fit_svi's


def variants(net_name: str, methods: list[str], compiled: bool,
             device: torch.device = torch.device("cpu")) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    x = torch.rand(100, 784, device=device)
    y = torch.randint(0, 10, (100,), device=device)
    out = {}
    dense = NETS[net_name]().to(device).train()
    out["dense"] = _plain_step(dense, _adam(dense), x, y, sparse=False)
    for method in methods:
        net = bs.sparsify(NETS[net_name](), method=method).to(device).train()
        out[f"{method}/plain"] = _plain_step(net, _adam(net), x, y, sparse=True)
        guarded = bs.sparsify(NETS[net_name](), method=method).to(device).train()
        out[f"{method}/guarded"] = _plain_step(guarded, _adam(guarded), x, y, sparse=True, guarded=True)
        svi_net = bs.sparsify(NETS[net_name](), method=method).to(device).train()
        out[f"{method}/svi"] = _svi_step(svi_net, x, y)
        if compiled:
            cnet = bs.sparsify(NETS[net_name](), method=method).to(device).train()
            fn = torch.compile(lambda c=cnet: F.cross_entropy(c(x), y) + bs.regularizer(c) / N)
            out[f"{method}/compiled"] = _plain_step(cnet, _adam(cnet), x, y,
                                                    sparse=True, loss_fn=fn)
    return out


def measure(steps: dict[str, Callable[[], None]], rounds: int, per_round: int,
            device: torch.device = torch.device("cpu")) -> dict[str, float]:
    # on CUDA a timed block starts and ends on a synchronized device, so it counts the kernels it queued
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in steps.values():  # warm-up (and compilation)
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            sync()
            start = time.perf_counter()
            for _ in range(per_round):
                fn()
            sync()
            times[name].append((time.perf_counter() - start) / per_round)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", nargs="+", default=["lenet300", "lenet5"], choices=sorted(NETS))
    p.add_argument("--methods", nargs="+", default=["vd", "l0", "ltp", "l1", "magnitude"])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    p.add_argument("--compile", action="store_true", help="also time the plain step's loss under torch.compile")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the steps run (cuda: each timed block is bracketed by torch.cuda.synchronize)")
    p.add_argument("--out", type=Path, default=None,
                   help="default: benchmarks/results/step_cost.json (step_cost_cuda.json with --device cuda)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here; run with --device cpu")
    if args.out is None:
        args.out = RESULTS / ("step_cost.json" if device.type == "cpu" else f"step_cost_{device.type}.json")
    warnings.simplefilter("ignore")
    # one compiled loss per (method, net, threads) from the same lambda: room for all of them in dynamo's cache
    torch._dynamo.config.recompile_limit = 256
    results = []
    for net_name in args.nets:
        for threads in args.threads:
            torch.set_num_threads(threads)
            pyro.clear_param_store()
            ms = measure(variants(net_name, args.methods, args.compile, device), args.rounds, args.steps, device)
            dense = ms["dense"]
            row = {"net": net_name, "threads": threads, "dense_ms": 1e3 * dense, "methods": {}}
            for method in args.methods:
                entry = {"plain_ms": 1e3 * ms[f"{method}/plain"], "sparse_over_dense": ms[f"{method}/plain"] / dense,
                         "svi_ms": 1e3 * ms[f"{method}/svi"], "svi_over_plain": ms[f"{method}/svi"] / ms[f"{method}/plain"],
                         "guarded_ms": 1e3 * ms[f"{method}/guarded"],
                         "svi_over_guarded_plain": ms[f"{method}/svi"] / ms[f"{method}/guarded"]}
                if args.compile:
                    entry["compiled_ms"] = 1e3 * ms[f"{method}/compiled"]
                    entry["compiled_over_dense"] = ms[f"{method}/compiled"] / dense
                row["methods"][method] = entry
                print(f"{net_name} {threads}T {method:9s} dense {1e3 * dense:6.2f} ms  sparse/dense "
                      f"{entry['sparse_over_dense']:5.2f}x  svi/plain {entry['svi_over_plain']:5.2f}x"
                      f" (/guarded {entry['svi_over_guarded_plain']:5.2f}x)"
                      + (f"  compiled/dense {entry['compiled_over_dense']:5.2f}x" if args.compile else ""), flush=True)
            results.append(row)
    out = {"results": results, "device": args.device,
           "device_name": torch.cuda.get_device_name() if device.type == "cuda" else None,
           "batch_size": 100, "rounds": args.rounds, "steps_per_round": args.steps,
           "torch": torch.__version__, "pyro": pyro.__version__, "python": platform.python_version(),
           "machine": platform.processor() or platform.machine(), "command": "python " + " ".join(sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
