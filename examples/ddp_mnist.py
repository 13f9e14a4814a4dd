"""LeNet-300-100 on MNIST with DistributedDataParallel: the single-process examples' recipe on several ranks.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/ddp_mnist.py --epochs 1
    torchrun --nproc_per_node 2 examples/ddp_mnist.py --epochs 200 --out benchmarks/results/lenet300_vd_ddp.json
    torchrun --nproc_per_node 4 examples/ddp_mnist.py --method l0 --epochs 30

Each rank trains ``SVIModel(DistributedDataParallel(net))`` with ``bs.fit_svi`` on its share of the same
global batches of ``--batch-size`` examples a single process would take (``bs.distributed.rank_batches``),
so the averaged gradient is the single-process gradient: the likelihood is scaled by N / (local batch)
on each rank and the KL enters every rank once, which the average over the ranks keeps once (see
``bayes_sparse.distributed``). Sparse VD (the default) follows ``examples/lenet300_mnist.py`` (KL warm-up,
log alpha >= 3 pruned); the other methods follow ``benchmarks/mnist_methods.py`` (its options, each
method's own threshold). After training every rank fixes the same masks (``threshold_`` reads parameters
that DDP keeps identical, checked with ``bs.distributed.check_replicas``), and rank 0 prints the report and
the test error and writes the JSON (and, for VD, the plot) as the single-process example does.
Without ``torchrun`` it runs as one rank.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

import pyro
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import bayes_sparse as bs

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from lenet300_mnist import PAPER as VD_PAPER  # noqa: E402
from lenet300_mnist import _plot, default_warmup, export_and_report, lenet300  # noqa: E402
from mnist_methods import DEFAULTS, PAPER, WARMUP, build  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--method", choices=bs.methods(), default="vd")
    p.add_argument("--batch-size", type=int, default=100, help="the global batch, split evenly over the ranks")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threshold", type=float, default=3.0, help="vd: prune weights with log alpha >= this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", default="auto", choices=bs.data.SOURCES, help="where MNIST comes from")
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"], help="nccl needs one GPU per rank")
    p.add_argument("--out", type=Path, default=None, help="write the results JSON (rank 0)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def init_distributed(backend: str) -> tuple[int, int]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_*), or form a group of one."""
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rank, world = init_distributed(args.backend)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.backend == "nccl" else None
    if device is not None:
        torch.cuda.set_device(device)
    try:
        return train(args, rank, world, device)
    finally:
        dist.destroy_process_group()


def train(args: argparse.Namespace, rank: int, world: int, device: torch.device | None) -> dict | None:
    lead = rank == 0
    torch.manual_seed(args.seed)  # the same network on every rank (DDP also broadcasts rank 0's)
    pyro.clear_param_store()
    mnist = bs.data.load_mnist(args.source, device=device)
    n = mnist.x_train.shape[0]
    if args.method == "vd":
        net, options = lenet300(), {}
        warmup = default_warmup(args.epochs)  # the single-process example's model-wide KL ramp
    else:
        options = dict(DEFAULTS[args.method], warmup=WARMUP)  # each method's own ramp
        net, warmup = build("lenet300", args.method, options), None
    net = net.to(device) if device is not None else net
    ddp = DistributedDataParallel(net, device_ids=[device.index] if device is not None else None)
    model = bs.SVIModel(ddp, num_data=n, likelihood="categorical")
    pyro.set_rng_seed(args.seed + rank)  # independent training noise on each rank
    epoch_counter = iter(range(args.epochs))

    def batches():
        for idx in bs.distributed.rank_batches(n, args.batch_size, epoch=next(epoch_counter), seed=args.seed):
            idx = idx.to(mnist.x_train.device)
            yield mnist.x_train[idx], mnist.y_train[idx]

    curve = []

    def on_epoch_end(epoch: int, stats: dict) -> None:
        loss = torch.tensor([stats["loss"]], dtype=torch.float64, device=device)
        dist.all_reduce(loss)  # every rank's estimate, from its share of the data: their mean
        stats["loss"] = float(loss) / world
        if not lead:
            return
        stats["test_error"] = bs.error_rate(net, mnist.x_test, mnist.y_test)  # the inner net: no collective
        stats["compression"] = bs.report(net).compression
        curve.append(stats)
        if args.no_progress:
            print(f"epoch {epoch + 1}/{args.epochs}: loss {stats['loss']:.4f}, test error "
                  f"{100 * stats['test_error']:.2f}%, compression {stats['compression']:.1f}x", flush=True)

    if lead:
        print(f"LeNet-300-100 {args.method} on MNIST ({n} train / {mnist.x_test.shape[0]} test), {args.epochs} epochs, "
              f"{world} ranks ({args.backend}), global batch {args.batch_size} ({args.batch_size // world} per rank), "
              f"lr {args.lr}, KL warm-up {warmup}", flush=True)
    start = time.perf_counter()
    bs.fit_svi(model, batches, epochs=args.epochs, lr=args.lr, kl_warmup=warmup,
               progress=lead and not args.no_progress, on_epoch_end=on_epoch_end)
    seconds = time.perf_counter() - start

    if args.method == "vd":
        bs.threshold_(net, log_alpha=args.threshold)
    else:
        bs.threshold_(net)  # each method's own criterion
    bs.distributed.check_replicas(ddp)  # every rank holds the same parameters and masks, or this raises
    if not lead:
        return None

    rep, err_dense = export_and_report(net, mnist, args.epochs, seconds)
    print(f"test error {100 * err_dense:.2f}%, compression {rep.compression:.1f}x, {world} ranks, "
          f"{seconds:.0f} s; the parameters and masks are identical on every rank")

    result = {
        "net": "LeNet-300-100", "method": f"{args.method} (Pyro SVI, Trace_ELBO, DistributedDataParallel)",
        "dataset": "MNIST 60k/10k", "test_error_percent": 100 * err_dense, "compression": rep.compression,
        "sparsity_per_layer_percent": [100 * (1 - r.density) for r in rep.layers],
        "report": rep.to_dict(), "epochs": args.epochs, "batch_size": args.batch_size, "world_size": world,
        "local_batch_size": args.batch_size // world, "backend": args.backend, "lr": args.lr,
        "kl_warmup": list(warmup) if warmup else None, "method_options": options,
        "log_alpha_threshold": args.threshold if args.method == "vd" else None, "seed": args.seed,
        "train_seconds": seconds, "seconds_per_epoch": seconds / args.epochs,
        "paper": VD_PAPER if args.method == "vd" else PAPER.get(("lenet300", args.method)),
        "curve": curve, "torch": torch.__version__, "pyro": pyro.__version__, "python": platform.python_version(),
        "command": f"torchrun --nproc_per_node {world} " + " ".join(sys.argv),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        if args.method == "vd":
            _plot(curve, args.out.with_suffix(".png"))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
    # Leave without the interpreter's finalization: with torch 2.14 and gloo, a process that has run DDP
    # aborts there now and then ("terminate called without an active exception"), which torchrun would
    # report as a failed rank after all the work is done and written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
