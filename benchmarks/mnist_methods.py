"""One recipe, every method: LeNet-300-100 or LeNet-5-Caffe on MNIST, trained with Pyro SVI.

Same for every method: Adam, lr 1e-3 (flat for the first half, then linear to 0), batch 100, the
regularizer (KL or penalty) ramped in over the first 2.5%-10% of the epochs (the method option
``warmup``), one seed, Pyro SVI with ``Trace_ELBO`` (``bs.fit_svi``, which runs every method's schedule
hooks), then ``threshold_`` by the method's own criterion. Magnitude pruning trains dense for the first
half and prunes iteratively (cubic schedule, 4 rounds) to ``--sparsity`` during the second half, inside
the same epoch budget (its options ``target_sparsity``, ``rounds``, ``prune_start``).

    python benchmarks/mnist_methods.py --net lenet300 --method l0 --epochs 30
    python benchmarks/mnist_methods.py --net lenet5 --method vd --epochs 10

Writes ``benchmarks/results/<net>_<method>_<epochs>epochs.json`` (test error, per-layer sparsity,
compression, epochs, seconds, hyperparameters, the curve) unless ``--out`` says otherwise.
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
from bayes_sparse.bench.nets import lenet5, lenet300

RESULTS = Path(__file__).parent / "results"

PAPER = {
    ("lenet300", "vd"): {"test_error_percent": 1.92, "compression": 68, "source": "Molchanov et al. 2017, Table 1"},
    ("lenet5", "vd"): {"test_error_percent": 0.75, "compression": 280, "source": "Molchanov et al. 2017, Table 1"},
    ("lenet300", "magnitude"): {"test_error_percent": 1.59, "compression": 12, "source": "Han et al. 2015"},
    ("lenet5", "magnitude"): {"test_error_percent": 0.77, "compression": 12, "source": "Han et al. 2015"},
    ("lenet300", "l0"): {"test_error_percent": 1.6, "neurons_kept": "266-88-33",
                         "source": "Louizos et al. 2018 (neuron gates, not per-weight)"},
    ("lenet5", "l0"): {"test_error_percent": 0.9, "kept": "20-25-45-462",
                       "source": "Louizos et al. 2018 (channel/neuron gates, lambda=0.1/N)"},
}

# Method options used for MNIST (penalties in units of 1/N); override with --penalty.
DEFAULTS = {
    "vd": {},
    "l0": {"penalty": 0.1},
    "ltp": {"penalty": 1.0, "temperature": 0.25},
    "l1": {"penalty": 2.0},
    "magnitude": {"target_sparsity": 0.95},
}
#: Fractions of the epochs over which every method's regularizer ramps in (the official SparseVD recipe:
#: epochs 5 to 20 of 200).
WARMUP = (0.025, 0.1)


NETS = {"lenet300": lenet300, "lenet5": lenet5}


def build(net: str, method: str, options: dict) -> nn.Module:
    dense = NETS[net]()
    if method == "l0" and net == "lenet300":  # Louizos et al.: initial drop rate 0.2 on an MLP's input layer
        first = bs.sparsify(dense, method, include=["0"], droprate_init=0.2, **options)
        return bs.sparsify(first, method, exclude=["0"], inplace=True, **options)
    return bs.sparsify(dense, method, **options)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--net", choices=sorted(NETS), required=True)
    p.add_argument("--method", choices=bs.methods(), required=True)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--penalty", type=float, default=None, help="penalty strength (units of 1/N) for l0/ltp/l1")
    p.add_argument("--sparsity", type=float, default=0.95, help="magnitude pruning's final sparsity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    mnist = bs.data.load_mnist()
    x_train, y_train = mnist.x_train, mnist.y_train
    if args.train_subset:
        x_train, y_train = x_train[:args.train_subset], y_train[:args.train_subset]
    n = x_train.shape[0]
    options = dict(DEFAULTS[args.method], warmup=WARMUP)
    if args.penalty is not None:
        options["penalty"] = args.penalty
    if "target_sparsity" in options:
        options["target_sparsity"] = args.sparsity
    net = build(args.net, args.method, options)
    model = bs.SVIModel(net, num_data=n)

    def batches():
        perm = torch.randperm(n)
        for i in range(0, n, args.batch_size):
            idx = perm[i:i + args.batch_size]
            yield x_train[idx], y_train[idx]

    def compression_now() -> float:
        """Compression if thresholded now by each layer's own criterion (fixed masks where there are some)."""
        total = kept = 0
        with torch.no_grad():
            for _, layer in bs.sparse_layers(net):
                mask = layer.hard_mask() if layer.mask_fixed else layer.criterion_mask()
                total, kept = total + mask.numel(), kept + int(mask.sum())
        return total / max(kept, 1)

    curve = []

    def on_epoch_end(epoch: int, stats: dict) -> None:
        stats["test_error"] = bs.error_rate(net, mnist.x_test, mnist.y_test)
        stats["compression"] = compression_now()
        curve.append(stats)
        if args.no_progress:
            print(f"epoch {epoch + 1}/{args.epochs}: loss {stats['loss']:.4f}, test error "
                  f"{100 * stats['test_error']:.2f}%, compression {stats['compression']:.1f}x", flush=True)

    start = time.perf_counter()
    bs.fit_svi(model, batches, epochs=args.epochs, lr=args.lr, progress=not args.no_progress,
               on_epoch_end=on_epoch_end)
    seconds = time.perf_counter() - start
    bs.threshold_(net)  # each method's own criterion (magnitude: its target sparsity)
    original = NETS[args.net]()
    original.load_state_dict(bs.to_dense(net).state_dict())
    err = bs.error_rate(original, mnist.x_test, mnist.y_test)
    rep = bs.report(original)
    print(f"{args.net} {args.method}: test error {100 * err:.2f}%, compression {rep.compression:.1f}x, "
          f"{seconds:.0f} s")
    print(rep)
    result = {
        "net": args.net, "method": args.method, "test_error_percent": 100 * err, "compression": rep.compression,
        "sparsity_per_layer_percent": [100 * (1 - r.density) for r in rep.layers], "report": rep.to_dict(),
        "epochs": args.epochs, "seconds": seconds, "seconds_per_epoch": seconds / args.epochs,
        "train_size": n, "batch_size": args.batch_size, "lr": args.lr, "warmup": list(WARMUP),
        "method_options": options,
        "seed": args.seed, "paper": PAPER.get((args.net, args.method)), "curve": curve,
        "torch": torch.__version__, "pyro": pyro.__version__, "python": platform.python_version(),
        "command": "python " + " ".join(sys.argv),
    }
    out = args.out or RESULTS / f"{args.net}_{args.method}_{args.epochs}epochs.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
