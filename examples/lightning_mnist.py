"""Sparsify LeNet-300-100 on MNIST with PyTorch Lightning: ``SparsifyCallback`` + ``add_regularizer``.

    net = bs.sparsify(lenet300(), method="vd")
    # in training_step:  return add_regularizer(F.cross_entropy(net(x), y), net, N)
    trainer = L.Trainer(max_epochs=epochs, callbacks=[SparsifyCallback(num_data=N)])
    trainer.fit(module, loader)                       # schedules each epoch/step, threshold_ at the end
    lenet300().load_state_dict(bs.to_dense(net).state_dict())

    python examples/lightning_mnist.py                        # 2 epochs on 60k images, about 20 s on one core
    python examples/lightning_mnist.py --epochs 1 --train-subset 10000 --warmup 0 0   # a smoke run
    python examples/lightning_mnist.py --epochs 20 --method l0

The regularizer ramps in over the first half of the epochs by default (``--warmup 0 0.5``); schedules move
once per epoch, so with one epoch use ``--warmup 0 0`` (a ramp would keep the weight at 0).

Needs ``pip install lightning`` (in the ``dev`` extra) and MNIST (``bs.data.load_mnist``).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import bayes_sparse as bs
from bayes_sparse.integrations.lightning import SparsifyCallback, add_regularizer

import lightning.pytorch as pl  # noqa: E402  (after bayes_sparse: its import error names the install)


def lenet300() -> nn.Sequential:
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


class LitClassifier(pl.LightningModule):
    """A plain classifier module; the one sparse-specific line is ``add_regularizer`` in ``training_step``."""

    def __init__(self, net: nn.Module, num_data: int, lr: float) -> None:
        super().__init__()
        self.net, self.num_data, self.lr = net, num_data, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return add_regularizer(F.cross_entropy(self.net(x), y), self.net, self.num_data)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="vd", choices=bs.methods())
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-subset", type=int, default=0, help="train on the first N images (0: all 60k)")
    p.add_argument("--warmup", type=float, nargs=2, default=(0.0, 0.5), metavar=("START", "END"),
                   help="regularizer ramp, fractions of the epochs (0 0: none)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=100)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    mnist = bs.data.load_mnist()
    n = args.train_subset or len(mnist.y_train)
    train = torch.utils.data.TensorDataset(mnist.x_train[:n], mnist.y_train[:n])
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True)

    net = bs.sparsify(lenet300(), method=args.method, warmup=tuple(args.warmup))
    callback = SparsifyCallback(num_data=n)  # threshold=True: each method's own criterion at the end
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", callbacks=[callback], logger=False,
                         enable_checkpointing=False, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(LitClassifier(net, n, args.lr), loader)
    seconds = time.perf_counter() - start

    dense = lenet300()
    dense.load_state_dict(bs.to_dense(net).state_dict())  # the original architecture, masked weights
    print(bs.report(dense))
    print(f"method {args.method}, {args.epochs} epoch(s) on {n} images, {seconds:.0f} s: test error "
          f"{100 * bs.error_rate(dense, mnist.x_test, mnist.y_test):.2f}%, "
          f"compression {bs.report(dense).compression:.1f}x")


if __name__ == "__main__":
    main()
