"""Every sparsification method on one network, with the plain PyTorch loop (no Pyro), one shared recipe.

The method is picked by name; training, thresholding, export and the report stay the same:

    net = bs.sparsify(lenet(), method=name, warmup=(0, 0.5), **options)
    for epoch in range(epochs):
        bs.on_epoch_start(net, epoch, epochs)      # each method's schedule: warm-up, temperature, pruning rounds
        for x, y in batches:
            loss = F.cross_entropy(net(x), y) + bs.regularizer(net) / N             # KL or penalty
            opt.zero_grad(); loss.backward(); opt.step()
            bs.after_step(net, lr, N)              # e.g. the proximal L1 step
    bs.threshold_(net)                                                          # the method's own criterion
    original.load_state_dict(bs.to_dense(net).state_dict())

    python examples/compare_methods.py --net lenet300 --epochs 3
    python examples/compare_methods.py --net lenet5 --epochs 2 --methods vd l0

For the Pyro SVI path and longer runs use ``benchmarks/mnist_methods.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import bayes_sparse as bs

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from mnist_methods import DEFAULTS, NETS, build  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--net", choices=sorted(NETS), default="lenet300")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=["vd", "l0", "ltp", "l1", "magnitude"], choices=bs.methods())
    args = p.parse_args(argv)
    mnist = bs.data.load_mnist()
    n = mnist.x_train.shape[0]
    rows = []
    lr = 1e-3
    for method in args.methods:
        torch.manual_seed(0)
        options = dict(DEFAULTS[method], warmup=(0.0, 0.5))  # the regularizer ramps in over the first half
        net = build(args.net, method, options)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        start = time.perf_counter()
        for epoch in tqdm(range(args.epochs), desc=method, unit="epoch"):
            bs.on_epoch_start(net, epoch, args.epochs)
            net.train()
            perm = torch.randperm(n)
            for i in range(0, n, 100):
                idx = perm[i:i + 100]
                loss = F.cross_entropy(net(mnist.x_train[idx]), mnist.y_train[idx]) + bs.regularizer(net) / n
                opt.zero_grad()
                loss.backward()
                opt.step()
                bs.after_step(net, lr, n)
        bs.threshold_(net)  # each method's own criterion (magnitude: its target_sparsity)
        original = NETS[args.net]()
        original.load_state_dict(bs.to_dense(net).state_dict())
        rep = bs.report(original)
        rows.append((method, 100 * bs.error_rate(original, mnist.x_test, mnist.y_test), rep.compression,
                     time.perf_counter() - start))
    print(f"\n{args.net}, {args.epochs} epochs, plain PyTorch loop")
    print(f"{'method':10s} {'test error':>10s} {'compression':>12s} {'seconds':>8s}")
    for method, err, comp, secs in rows:
        print(f"{method:10s} {err:9.2f}% {comp:11.1f}x {secs:8.0f}")


if __name__ == "__main__":
    main()
