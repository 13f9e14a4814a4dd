"""Sparsify a trained network: train it dense on MNIST, convert with ``bs.sparsify``, fine-tune with Pyro SVI,
threshold, export to the original classes, and compare accuracy and size before and after.

    python examples/finetune_torchvision.py                              # LeNet-5-Caffe, a few minutes on CPU
    python examples/finetune_torchvision.py --arch resnet18 --train-subset 5000 --pretrain-epochs 1 --epochs 2

``--arch resnet18`` takes torchvision's ResNet-18 and adapts it to MNIST (1 input channel, a 3x3 stem
without max-pooling, 10 classes); its first conv and classifier stay dense (``exclude=["conv1", "fc"]``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from tqdm.auto import tqdm

import bayes_sparse as bs


def lenet5() -> nn.Sequential:
    """LeNet-5-Caffe: conv20-conv50-fc500-fc10 (the SparseVD paper's convnet)."""
    return nn.Sequential(nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))


def resnet18_mnist() -> nn.Module:
    """torchvision's ResNet-18 with its inputs adapted to 1x28x28 MNIST digits."""
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    net.conv1 = nn.Conv2d(1, 64, 3, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


ARCHS = {"lenet5": (lenet5, {}), "resnet18": (resnet18_mnist, {"exclude": ["conv1", "fc"]})}


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int):
    perm = torch.randperm(x.shape[0])
    for i in range(0, x.shape[0], batch_size):
        idx = perm[i:i + batch_size]
        yield x[idx], y[idx]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), default="lenet5")
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=5, help="SVI fine-tuning epochs")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()

    m = bs.data.load_mnist()
    x_train, y_train = m.x_train.view(-1, 1, 28, 28), m.y_train
    if args.train_subset:
        x_train, y_train = x_train[:args.train_subset], y_train[:args.train_subset]
    x_test, y_test = m.x_test.view(-1, 1, 28, 28), m.y_test
    build, sparsify_kw = ARCHS[args.arch]

    # 1. an ordinary dense network, trained briefly
    dense = build()
    opt = torch.optim.Adam(dense.parameters(), lr=1e-3)
    dense.train()
    for _ in tqdm(range(args.pretrain_epochs), desc="dense pre-training", unit="epoch"):
        for x, y in batches(x_train, y_train, args.batch_size):
            loss = F.cross_entropy(dense(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    err_before = bs.error_rate(dense, x_test, y_test)
    print(f"dense {args.arch}: test error {100 * err_before:.2f}%")

    # 2. convert: every supported layer but the excluded ones becomes a Sparse VD layer, weights copied
    sparse = bs.sparsify(dense, method="vd", **sparsify_kw)
    print(bs.conversion_report(sparse))
    err_converted = bs.error_rate(sparse, x_test, y_test)
    print(f"right after conversion: test error {100 * err_converted:.2f}% (dense: {100 * err_before:.2f}%)")

    # 3. fine-tune with Pyro SVI (the ELBO with N/B minibatch scaling), short KL warm-up
    model = bs.SVIModel(sparse, num_data=x_train.shape[0])
    start = time.perf_counter()
    bs.fit_svi(model, lambda: batches(x_train, y_train, args.batch_size), epochs=args.epochs, lr=1e-3,
               kl_warmup=(0, max(1, args.epochs // 3)))
    seconds = time.perf_counter() - start

    # 4. threshold, export to the original classes, load into an unmodified network
    bs.threshold_(sparse)
    restored = build()
    restored.load_state_dict(bs.to_dense(sparse).state_dict())
    err_after = bs.error_rate(restored, x_test, y_test)
    rep = bs.report(restored, test_error_before_percent=round(100 * err_before, 2),
                    test_error_converted_percent=round(100 * err_converted, 2),
                    test_error_after_percent=round(100 * err_after, 2), finetune_seconds=round(seconds, 1))
    print(rep)
    result = {"arch": args.arch, "pretrain_epochs": args.pretrain_epochs, "epochs": args.epochs,
              "train_size": int(x_train.shape[0]), **rep.to_dict()}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
