"""Every method on every device this machine has: layers, both training paths, threshold_, to_dense, save/load,
the compiled model, and (on CUDA) no host synchronization inside ``forward``.

The ``device`` fixture (``tests/conftest.py``) is ``cpu`` everywhere and adds ``cuda`` where a GPU is present;
the CUDA cases are skipped otherwise, so on a CPU-only machine this file checks the CPU path.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayes_sparse as bs
from bayes_sparse import _fusedkernel

METHODS = ["vd", "l0", "ltp", "l1", "magnitude"]
N = 256


def small_cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def data(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 1, 8, 8, generator=g)
    y = (x.flatten(1)[:, :10].argmax(1)).long()
    return x.to(device), y.to(device)


def sparse_model(method: str, device) -> nn.Module:
    return bs.sparsify(small_cnn(), method).to(device)


def plain_steps(net: nn.Module, x, y, steps: int = 4) -> None:
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for i in range(steps):
        xb, yb = x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32]
        loss = F.cross_entropy(net(xb), yb) + bs.regularizer(net) / N
        opt.zero_grad()
        loss.backward()
        opt.step()
        bs.after_step(net, 1e-2, N)


@pytest.mark.parametrize("method", METHODS)
def test_layers_train_and_evaluate_on_the_device(method, device):
    net = sparse_model(method, device)
    x, y = data(device)
    for p in net.parameters():
        assert p.device.type == device.type
    bs.on_epoch_start(net, 0, 2)
    plain_steps(net, x, y)
    for p in net.parameters():
        assert p.device.type == device.type and torch.isfinite(p).all()
    reg = bs.regularizer(net)
    assert reg.device.type == device.type
    net.eval()
    with torch.no_grad():
        out = net(x[:8])
    assert out.device.type == device.type and out.shape == (8, 10)


@pytest.mark.parametrize("method", METHODS)
def test_svi_trains_thresholds_exports_and_round_trips_on_the_device(method, device, tmp_path):
    net = sparse_model(method, device)
    x, y = data(device)
    model = bs.SVIModel(net, num_data=N)
    history = bs.fit_svi(model, lambda: [(x[i:i + 64], y[i:i + 64]) for i in range(0, N, 64)], epochs=2,
                         progress=False)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    bs.threshold_(net)
    net.eval()
    with torch.no_grad():
        expected = net(x[:16])
    dense = bs.to_dense(net)
    assert all(p.device.type == device.type for p in dense.parameters())
    with torch.no_grad():
        torch.testing.assert_close(dense(x[:16]), expected)
    path = tmp_path / "model.safetensors"
    bs.export.save(net, path)
    loaded = bs.export.load(path, small_cnn()).to(device)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x[:16]), expected)


@pytest.mark.parametrize("method", METHODS)
def test_compiled_model_matches_eager_on_the_device(method, device):
    torch._dynamo.reset()
    net = sparse_model(method, device)
    x, _ = data(device)
    net.eval()
    compiled = torch.compile(copy.deepcopy(net), backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x[:8]), net(x[:8]))
    net.train()
    compiled.train()
    torch.manual_seed(3)
    with _fusedkernel.disabled():  # compiled graphs draw L0's noise with rand_like, not the C++ kernel's hash
        eager_out = net(x[:8])
    torch.manual_seed(3)
    compiled_out = compiled(x[:8])
    torch.testing.assert_close(compiled_out, eager_out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_forward_never_synchronizes_with_the_host(method):
    """``torch.cuda.set_sync_debug_mode("error")`` raises on any host synchronization in train and eval forwards
    (and in the regularizer the loss adds)."""
    device = torch.device("cuda")
    net = sparse_model(method, device)
    x, y = data(device)
    plain_steps(net, x, y, steps=1)  # one step outside the check: lazy initialisation may synchronize once
    for mode in ("train", "eval"):
        getattr(net, mode)()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = net(x[:32])
            loss = F.cross_entropy(out, y[:32]) + bs.regularizer(net) / N
        finally:
            torch.cuda.set_sync_debug_mode("default")
        loss.backward()
    bs.threshold_(net)
    net.eval()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        net(x[:32])
    finally:
        torch.cuda.set_sync_debug_mode("default")
