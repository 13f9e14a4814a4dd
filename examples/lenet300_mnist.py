"""Sparse Variational Dropout on LeNet-300-100 / MNIST with Pyro SVI (the SparseVD paper's recipe).

Recipe (Molchanov et al. 2017, official code): Adam lr 1e-3, batch 100, KL weight 0 for epochs 0-4 then a
linear ramp to 1 at epoch 20, learning rate flat for the first half then linear to 0, 200 epochs,
weights with log alpha >= 3 pruned at the end.

    python examples/lenet300_mnist.py --epochs 200 --out benchmarks/results/lenet300_vd.json  # full run
    python examples/lenet300_mnist.py --epochs 12                                              # `make demo`

Short runs squeeze the KL warm-up into the same fraction of the run unless --warmup is given.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import pyro
import torch
from torch import nn

import bayes_sparse as bs

PAPER = {"test_error_percent": 1.92, "compression": 68.0, "sparsity_per_layer_percent": [98.9, 97.2, 62.0],
         "source": "Molchanov et al. 2017, Table 1 (see shared/ANCHORS.md)"}


def lenet300(layer: type[nn.Linear] = bs.VDLinear) -> nn.Sequential:
    """LeNet-300-100 built from ``layer`` (``nn.Linear`` for the dense original)."""
    return nn.Sequential(layer(784, 300), nn.ReLU(), layer(300, 100), nn.ReLU(), layer(100, 10))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, nargs=2, metavar=("START", "END"), default=None,
                   help="KL ramp epochs (default 5 20 for 200 epochs, scaled down for shorter runs)")
    p.add_argument("--threshold", type=float, default=3.0, help="prune weights with log alpha >= this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", default="auto", choices=bs.data.SOURCES, help="where MNIST comes from")
    p.add_argument("--out", type=Path, default=None, help="write the results JSON (and a PNG plot beside it)")
    p.add_argument("--save-model", type=Path, default=None,
                   help="write the thresholded sparse model's state_dict (safetensors) for later export benchmarks")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def default_warmup(epochs: int) -> tuple[int, int]:
    """The paper's (5, 20) ramp for 200 epochs, kept at the same fraction (2.5%-10%) of shorter runs."""
    if epochs >= 200:
        return 5, 20
    return round(epochs * 0.025), max(1, round(epochs * 0.1))


def export_and_report(net: nn.Module, mnist: bs.data.MNIST, epochs: int, seconds: float
                      ) -> tuple[bs.SparsityReport, float]:
    """Load the thresholded ``net``'s dense export into an unmodified LeNet-300-100, print its report; returns the
    report and the export's test error (warning on stderr if the sparse model's error differs)."""
    original = lenet300(nn.Linear)
    original.load_state_dict(bs.to_dense(net).state_dict())  # the export loads into the unmodified architecture
    err_sparse = bs.error_rate(net, mnist.x_test, mnist.y_test)
    err_dense = bs.error_rate(original, mnist.x_test, mnist.y_test)
    rep = bs.report(original, test_error_percent=round(100 * err_dense, 3), epochs=epochs,
                    train_seconds=round(seconds, 1))
    print(rep)
    if err_sparse != err_dense:  # pragma: no cover - would be a bug in the export
        print(f"WARNING: sparse model error {err_sparse} != exported model error {err_dense}", file=sys.stderr)
    return rep, err_dense


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    mnist = bs.data.load_mnist(args.source)
    n = mnist.x_train.shape[0]
    net = lenet300()
    model = bs.SVIModel(net, num_data=n, likelihood="categorical")
    warmup = tuple(args.warmup) if args.warmup else default_warmup(args.epochs)

    def batches():
        perm = torch.randperm(n)
        for i in range(0, n, args.batch_size):
            idx = perm[i:i + args.batch_size]
            yield mnist.x_train[idx], mnist.y_train[idx]

    curve = []

    def on_epoch_end(epoch: int, stats: dict) -> None:
        stats["test_error"] = bs.error_rate(net, mnist.x_test, mnist.y_test)
        stats["compression"] = bs.report(net).compression  # by the default log alpha < 3 criterion
        curve.append(stats)
        if args.no_progress:  # one line per epoch instead of a bar (logs, CI)
            print(f"epoch {epoch + 1}/{args.epochs}: loss {stats['loss']:.4f}, test error "
                  f"{100 * stats['test_error']:.2f}%, compression {stats['compression']:.1f}x", flush=True)

    print(f"LeNet-300-100 Sparse VD on MNIST ({n} train / {mnist.x_test.shape[0]} test), {args.epochs} epochs, "
          f"batch {args.batch_size}, lr {args.lr}, KL warm-up {warmup}", flush=True)
    start = time.perf_counter()
    bs.fit_svi(model, batches, epochs=args.epochs, lr=args.lr, kl_warmup=warmup, progress=not args.no_progress,
               on_epoch_end=on_epoch_end)
    seconds = time.perf_counter() - start

    bs.threshold_(net, log_alpha=args.threshold)
    rep, err_dense = export_and_report(net, mnist, args.epochs, seconds)

    result = {
        "net": "LeNet-300-100", "method": "Sparse VD (Pyro SVI, Trace_ELBO)", "dataset": "MNIST 60k/10k",
        "test_error_percent": 100 * err_dense, "compression": rep.compression,
        "sparsity_per_layer_percent": [100 * (1 - r.density) for r in rep.layers],
        "report": rep.to_dict(), "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "kl_warmup": list(warmup), "log_alpha_threshold": args.threshold, "seed": args.seed,
        "train_seconds": seconds, "seconds_per_epoch": seconds / args.epochs, "paper": PAPER,
        "curve": curve, "torch": torch.__version__, "pyro": pyro.__version__, "python": platform.python_version(),
        "command": "python " + " ".join(sys.argv),
    }
    if args.save_model:
        args.save_model.parent.mkdir(parents=True, exist_ok=True)
        bs.export.save_checkpoint(net, args.save_model)  # the sparse model, log sigma^2 included; no pickle
        print(f"wrote {args.save_model}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        _plot(curve, args.out.with_suffix(".png"))
        print(f"wrote {args.out}")
    return result


def _plot(curve: list[dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional
        return
    epochs = [c["epoch"] + 1 for c in curve]
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot(epochs, [100 * c["test_error"] for c in curve], color="tab:red", label="test error (%)")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("test error (%)", color="tab:red")
    ax1.set_ylim(0, max(5.0, min(10.0, 100 * max(c["test_error"] for c in curve))))
    ax2 = ax1.twinx()
    ax2.semilogy(epochs, [c["compression"] for c in curve], color="tab:blue", label="compression")
    ax2.axhline(PAPER["compression"], color="tab:blue", ls=":", label="paper 68x")
    ax2.set_ylabel("compression (x, log alpha < 3)", color="tab:blue")
    ax1.axhline(PAPER["test_error_percent"], color="tab:red", ls=":")
    ax1.set_title("LeNet-300-100 Sparse VD on MNIST (dotted: paper)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
