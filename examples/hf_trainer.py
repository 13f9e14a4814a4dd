"""Sparsify LeNet-300-100 on MNIST with the Hugging Face ``Trainer``: ``SparseTrainer``.

    model = bs.sparsify(Classifier(), method="vd", warmup=(0, 0.5))   # forward returns {"loss", "logits"}
    trainer = SparseTrainer(model=model, args=TrainingArguments(...), train_dataset=train)
    trainer.train()                     # loss + regularizer / len(train), schedules, threshold_ at the end
    Classifier().load_state_dict(bs.to_dense(model).state_dict())

    python examples/hf_trainer.py                              # 2 epochs on 60k images, under a minute
    python examples/hf_trainer.py --epochs 1 --train-subset 10000 --warmup 0 0    # a smoke run

Needs ``pip install transformers accelerate`` (in the ``dev`` extra) and MNIST (``bs.data.load_mnist``).
Schedules move once per epoch, so with one epoch use ``--warmup 0 0``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

import bayes_sparse as bs
from bayes_sparse.integrations.hf import SparseTrainer

from transformers import TrainingArguments  # noqa: E402  (after bayes_sparse: its import error names the install)


class Classifier(nn.Module):
    """LeNet-300-100 in the Hugging Face style: ``forward(x, labels)`` returns ``{"loss", "logits"}``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)  # a mean over the batch, as Hugging Face models do
        return out


class MNISTDicts(torch.utils.data.Dataset):
    """The tensors of ``bs.data.load_mnist`` as the dicts a ``Trainer`` feeds to ``forward``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


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

    mnist = bs.data.load_mnist()
    n = args.train_subset or len(mnist.y_train)
    train = MNISTDicts(mnist.x_train[:n], mnist.y_train[:n])
    model = bs.sparsify(Classifier(), method=args.method, warmup=tuple(args.warmup))

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, num_train_epochs=args.epochs, learning_rate=args.lr,
                                  per_device_train_batch_size=args.batch_size, lr_scheduler_type="constant",
                                  weight_decay=0.0, save_strategy="no", logging_steps=200, report_to=[],
                                  use_cpu=True, remove_unused_columns=False, disable_tqdm=True, seed=0)
        trainer = SparseTrainer(model=model, args=targs, train_dataset=train)  # num_data = len(train)
        start = time.perf_counter()
        trainer.train()  # logged losses include the regularizer / N
        seconds = time.perf_counter() - start

    dense = Classifier()
    dense.load_state_dict(bs.to_dense(model).state_dict())  # the original architecture, masked weights
    print(bs.report(dense))
    print(f"method {args.method}, {args.epochs} epoch(s) on {n} images, {seconds:.0f} s: test error "
          f"{100 * bs.error_rate(dense.net, mnist.x_test, mnist.y_test):.2f}%, "
          f"compression {bs.report(dense).compression:.1f}x")


if __name__ == "__main__":
    main()
