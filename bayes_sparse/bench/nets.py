"""The benchmark's nets and their data: LeNet-300-100 and LeNet-5-Caffe on MNIST, a tiny MLP on synthetic data."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from ..data import MNIST, MNISTSplit, load_mnist, train_val_test

__all__ = ["NETS", "Net", "lenet300", "lenet5", "load_data", "mlp_tiny", "synthetic"]


def lenet300() -> nn.Sequential:
    """LeNet-300-100: 784-300-100-10, ReLU."""
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def lenet5() -> nn.Sequential:
    """LeNet-5-Caffe: conv20(5x5)-pool-conv50(5x5)-pool-fc500-fc10, on flattened 784-pixel inputs."""
    return nn.Sequential(nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(800, 500),
                         nn.ReLU(), nn.Linear(500, 10))


def mlp_tiny() -> nn.Sequential:
    """A 16-32-3 MLP for the synthetic task (tests and smoke runs)."""
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))


def synthetic(n_train: int = 600, n_test: int = 200) -> MNIST:
    """A fixed 3-class task (the same tensors on every call): 16 Gaussian features, labels from a random teacher."""
    g = torch.Generator().manual_seed(1234)
    teacher = torch.randn(16, 3, generator=g)
    x = torch.randn(n_train + n_test, 16, generator=g)
    y = (x @ teacher + 0.3 * torch.randn(n_train + n_test, 3, generator=g)).argmax(1)
    return MNIST(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


class Net(NamedTuple):
    """A benchmark net: its dense builder and the name of its data set."""

    build: Callable[[], nn.Module]
    data: str


NETS: dict[str, Net] = {"lenet300": Net(lenet300, "mnist"), "lenet5": Net(lenet5, "mnist"),
                        "mlp_tiny": Net(mlp_tiny, "synthetic")}


def load_data(net: str, val_size: int) -> MNISTSplit:
    """The train/validation/test split for ``net``: MNIST's last ``val_size`` training images (10k: 50k/10k/10k),
    or for the synthetic data the last ``min(val_size, 200)`` of its 600 training examples."""
    if NETS[net].data == "mnist":
        return train_val_test(load_mnist(), val_size)
    return train_val_test(synthetic(), min(val_size, 200))
