"""DistributedDataParallel: 2 gloo processes train sparse models and match a single process on the same global batches.

One spawn of two ranks runs every scenario (the plain loop for each method, ``SVIModel`` with ``fit_svi``,
the non-finite guard, ``check_replicas``) and saves what it saw; the single-process references run here,
with the same code, seeds and global batches. Training noise is made comparable as follows:

* L1, magnitude and LTP train deterministically;
* L0 draws one gate sample per forward pass, shaped like the weight: every rank is seeded like the single
  process, so each rank draws the very gates the single process draws for the whole batch;
* Sparse VD draws noise per example (local reparameterization): here the layers take their noise from a
  fixed table indexed by the example's position in the training set, so the union of the ranks' draws is
  exactly the single process's draws (the noise stays visible: log sigma^2 starts in [-4, 0]).
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import pyro
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from filelock import FileLock  # a dependency of torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import bayes_sparse as bs
import bayes_sparse.functional as BF
from bayes_sparse.distributed import check_replicas, rank_batches
from bayes_sparse.infer import check_finite_

N, B, EPOCHS, LR = 64, 16, 2, 1e-2  # 4 global batches of 16 per epoch: 8 examples per rank
WORLD = 2
PLAIN_METHODS = ("l1", "magnitude", "ltp", "l0", "vd")
SVI_METHODS = ("vd", "l0")
OPTIONS = {"l1": {"penalty": 20.0, "proximal": True, "prune_below": 0.05}, "l0": {"penalty": 0.1},
           "ltp": {"penalty": 1.0}, "magnitude": {"target_sparsity": 0.5, "rounds": 2}}
TIMEOUT_S = 120

_BATCH: dict[str, torch.Tensor] = {}  # the global indices of the examples in the current forward pass


class _IndexedVD(bs.VDLinear):
    """Sparse VD whose local reparameterization noise for an example is fixed by the example's index."""

    def __init__(self, in_features, out_features, tag):
        super().__init__(in_features, out_features)
        self.noise = torch.randn(N, out_features, generator=torch.Generator().manual_seed(1000 + tag))
        with torch.no_grad():
            self.log_sigma2.uniform_(-4, 0, generator=torch.Generator().manual_seed(2000 + tag))

    def _forward_train(self, x):
        eps = self.noise[_BATCH["idx"]]
        return BF.local_reparam(x, self._train_weight(), self.log_alpha, self.bias, self._affine, eps=eps)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 6, generator=g), torch.randint(0, 3, (N,), generator=g)


def _net(method):
    torch.manual_seed(42)
    if method == "vd":
        return nn.Sequential(_IndexedVD(6, 8, 0), nn.ReLU(), _IndexedVD(8, 3, 1))
    net = bs.sparsify(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), method=method,
                      **OPTIONS.get(method, {}))
    if method == "l0":  # every other gate starts closed, so the criterion prunes after a few steps
        with torch.no_grad():
            for _, layer in bs.sparse_layers(net):
                layer.log_alpha.view(-1)[::2] = -6.0
    return net


def _state(net):
    return {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in net.state_dict().items()}


def _masks(net):
    return {name: (layer.weight_mask.clone(), layer.mask_fixed) for name, layer in bs.sparse_layers(net)}


def _wrap(net, world):
    return DDP(net) if world > 1 else net


def _train_plain(method, rank, world):
    """The plain loop (as in bayes_sparse.schedule) on this rank's share of the global batches."""
    x, y = _data()
    net = _net(method)
    model = _wrap(net, world)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    torch.manual_seed(7)  # the same on every rank: L0's gates are the single process's gates
    first_grads = None
    for epoch in range(EPOCHS):
        bs.on_epoch_start(net, epoch, EPOCHS)
        for step, idx in enumerate(rank_batches(N, B, epoch=epoch, seed=3, rank=rank, world_size=world)):
            _BATCH["idx"] = idx
            loss = F.cross_entropy(model(x[idx]), y[idx]) + bs.regularizer(net) / N
            opt.zero_grad()
            loss.backward()
            check_finite_(model, loss, step, epoch=epoch)
            if first_grads is None:
                first_grads = {n: p.grad.clone() for n, p in net.named_parameters()}
            opt.step()
            bs.after_step(net, LR, N)
    trained = _state(net)
    bs.threshold_(net)
    return {"grads": first_grads, "trained": trained, "masks": _masks(net), "thresholded": _state(net)}


def _svi_batches(x, y, rank, world):
    epochs = iter(range(EPOCHS))

    def batches():
        for idx in rank_batches(N, B, epoch=next(epochs), seed=3, rank=rank, world_size=world):
            _BATCH["idx"] = idx
            yield x[idx], y[idx]

    return batches


def _train_svi(method, rank, world):
    """SVIModel around the DDP wrapper, trained by fit_svi (Trace_ELBO, Pyro's Adam)."""
    pyro.clear_param_store()
    x, y = _data()
    net = _net(method)
    model = bs.SVIModel(_wrap(net, world), num_data=N)
    torch.manual_seed(8)
    idx = next(rank_batches(N, B, epoch=0, seed=3, rank=rank, world_size=world))
    _BATCH["idx"] = idx
    pyro.infer.Trace_ELBO().loss_and_grads(model, model.guide, x[idx], y[idx])  # one gradient, no step
    first_grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(9)
    history = bs.fit_svi(model, _svi_batches(x, y, rank, world), epochs=EPOCHS, lr=LR, lr_lambda=lambda e: 1.0,
                         progress=False)
    trained = _state(net)
    bs.threshold_(net)
    return {"grads": first_grads, "trained": trained, "masks": _masks(net), "thresholded": _state(net),
            "loss": [h["loss"] for h in history]}


def _nonfinite(rank, world, kind):
    """A non-finite batch (NaN in x) or loss (inf) on rank 1 only, at epoch 0, step 2: every rank must stop."""
    pyro.clear_param_store()
    x, y = _data()
    if kind == "batch":
        net = _net("l1")
        model = bs.SVIModel(DDP(net), num_data=N)
        if rank == 1:  # rank 1's share of global batch 2 holds a NaN
            x = x.clone()
            x[list(rank_batches(N, B, epoch=0, seed=3, rank=1, world_size=world))[2][3], 0] = float("nan")
    else:
        net = nn.Sequential(bs.L1Linear(6, 1))
        model = bs.SVIModel(DDP(net), num_data=N, likelihood="gaussian", obs_scale=1.0)
        y = torch.randn(N, 1, generator=torch.Generator().manual_seed(5))
        if rank == 1:
            idx2 = list(rank_batches(N, B, epoch=0, seed=3, rank=1, world_size=world))[2]
            y[idx2[0]] = 1e30  # (y - mean)^2 overflows: an infinite loss on rank 1, finite gradients
    states = []
    try:
        bs.fit_svi(model, _svi_batches(x, y, rank, world), epochs=1, lr=LR, progress=False,
                   on_step_end=lambda lr: states.append(_state(net)))
    except FloatingPointError as e:
        return {"error": str(e), "steps": len(states), "kept": states[-1], "now": _state(net)}
    return {"error": None}


def _replicas(rank):
    net = _net("ltp")
    ddp = DDP(net)
    ok = check_replicas(ddp) is None
    if rank == 1:
        with torch.no_grad():
            net[2].raw_weight[0, 0] += 1e-3
    try:
        check_replicas(net)
    except RuntimeError as e:
        return {"ok": ok, "error": str(e)}
    return {"ok": ok, "error": None}


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        results = {"plain": {m: _train_plain(m, rank, world) for m in PLAIN_METHODS},
                   "svi": {m: _train_svi(m, rank, world) for m in SVI_METHODS},
                   "nonfinite": {k: _nonfinite(rank, world, k) for k in ("batch", "loss")},
                   "replicas": _replicas(rank)}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Skip the interpreter's finalization: with torch 2.14 and gloo, a process that has run DDP aborts there
    # now and then ("terminate called without an active exception", SIGABRT, about 1 exit in 10 here, also
    # for a bare DDP script), after every result is saved.
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(out):
    os.environ["OMP_NUM_THREADS"] = "1"
    ctx = mp.start_processes(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} DDP workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the 2 ranks saw: one spawn per test session, shared by pytest-xdist workers."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this PyTorch build")
    if not dist.is_gloo_available():
        pytest.skip("the gloo backend of torch.distributed is not available")
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers' temp dirs share this parent
        root = root.parent
    out = root / "ddp_ranks"
    files = [out / f"rank{r}.pt" for r in range(WORLD)]
    with FileLock(str(root / "ddp_ranks.lock")):
        if not all(f.exists() for f in files):
            out.mkdir(exist_ok=True)
            _spawn(out)
    return [torch.load(f, weights_only=False) for f in files]


def _assert_identical(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), f"{what}: {k}"
        elif isinstance(a[k], tuple):
            assert torch.equal(a[k][0], b[k][0]) and a[k][1] == b[k][1], f"{what}: {k}"
        else:
            assert a[k] == b[k], f"{what}: {k}"


def _assert_close(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        if isinstance(a[k], torch.Tensor) and a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {k}: {m}")
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), f"{what}: {k}"
        elif isinstance(a[k], tuple):
            assert torch.equal(a[k][0], b[k][0]) and a[k][1] == b[k][1], f"{what}: {k} (mask)"
        else:
            assert a[k] == b[k], f"{what}: {k}"


@pytest.mark.parametrize("method", PLAIN_METHODS)
def test_plain_loop_under_ddp_matches_one_process(ranks, method):
    r0, r1 = (r["plain"][method] for r in ranks)
    for key in ("trained", "masks", "thresholded"):
        _assert_identical(r0[key], r1[key], f"rank 0 vs rank 1, {key}")
    single = _train_plain(method, 0, 1)
    _assert_close(r0["grads"], single["grads"], "averaged gradient of step 0 vs one process")
    for key in ("trained", "masks", "thresholded"):
        _assert_close(r0[key], single[key], f"DDP vs one process, {key}")
    assert any(not m.all() for m, fixed in single["masks"].values())  # threshold_ pruned something
    assert not torch.equal(single["trained"]["2.bias"], _net(method)[2].bias)  # and training moved the parameters
    if method == "magnitude":  # the pruning round ran during training (a fixed mask under DDP)
        assert single["trained"]["0._extra_state"]["mask_fixed"]


@pytest.mark.parametrize("method", SVI_METHODS)
def test_svimodel_under_ddp_matches_one_process(ranks, method):
    r0, r1 = (r["svi"][method] for r in ranks)
    for key in ("grads", "trained", "masks", "thresholded"):
        _assert_identical(r0[key], r1[key], f"rank 0 vs rank 1, {key}")
    single = _train_svi(method, 0, 1)
    # N/(B/2) * NLL_rank + KL, averaged over the ranks, is N/B * NLL + KL: the KL is counted once
    _assert_close(r0["grads"], single["grads"], "averaged ELBO gradient vs one process")
    for key in ("trained", "masks", "thresholded"):
        _assert_close(r0[key], single[key], f"DDP vs one process, {key}")
    # each rank's loss estimates the same negative ELBO per example from its half of the data
    for l0, l1, ls in zip(r0["loss"], r1["loss"], single["loss"]):
        assert (l0 + l1) / 2 == pytest.approx(ls, rel=1e-4)


@pytest.mark.parametrize("kind", ["batch", "loss"])
def test_nonfinite_on_one_rank_stops_every_rank_with_the_last_good_parameters(ranks, kind):
    r0, r1 = (r["nonfinite"][kind] for r in ranks)
    for r in (r0, r1):
        assert r["error"] is not None and r["steps"] == 2
        _assert_identical(r["now"], r["kept"], "parameters after the error vs after step 1")
    _assert_identical(r0["now"], r1["now"], "rank 0 vs rank 1")
    if kind == "batch":
        assert r1["error"].startswith("the minibatch at epoch 0, step 2 holds NaN/inf: x has 1 non-finite entries")
        assert r0["error"].startswith("rank(s) [1] found NaN/inf in their minibatch at epoch 0, step 2")
    else:
        assert r1["error"].startswith("the loss became inf at epoch 0, step 2; lower the learning rate")
        assert r0["error"].startswith("rank(s) [1] found a non-finite loss or gradient at epoch 0, step 2")


def test_check_replicas_names_what_differs(ranks):
    for r in ranks:
        assert r["replicas"]["ok"]
        assert r["replicas"]["error"].startswith("the replicas differ from rank 0 in 1 state_dict entries: "
                                                 "'2.weight' (ranks [1])")


def test_rank_batches_splits_the_single_process_batches():
    single = list(rank_batches(10, 4, epoch=1, seed=2, rank=0, world_size=1))
    parts = [list(rank_batches(10, 4, epoch=1, seed=2, rank=r, world_size=2)) for r in range(2)]
    assert [len(p) for p in parts] == [3, 3]
    for b, (a, c) in enumerate(zip(*parts)):
        assert torch.equal(torch.cat([a, c]), single[b])  # the last batch of 2 splits into 1 + 1
    assert len(list(rank_batches(10, 4, rank=0, world_size=2, drop_last=True))) == 2
    assert [i.tolist() for i in rank_batches(7, 4, shuffle=False, rank=1, world_size=2)] == [[2, 3], [5]]
    assert [len(i) for i in rank_batches(5, 4, rank=2, world_size=4)] == [1]  # the last global batch of 1: dropped
    with pytest.raises(ValueError, match="batch_size=10 .* must be a multiple of world_size=4.* use e.g. 8"):
        next(rank_batches(100, 10, rank=0, world_size=4))
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\)"):
        next(rank_batches(100, 10, rank=2, world_size=2))
    assert next(rank_batches(8, 8)).numel() == 8  # no process group: one rank
