"""Data-parallel training with ``torch.distributed``: what changes (little), and four small helpers.

Sparse layers are ordinary modules, so ``torch.nn.parallel.DistributedDataParallel`` (DDP) wraps a
sparsified network as it wraps any other. Each of the W ranks runs the forward and backward pass on its
local share of a global minibatch of B examples (B/W each), and DDP averages the gradients over the ranks.

The regularizer is counted once
-------------------------------
Every rank adds the same whole-data regularizer to its local loss, so the average over the ranks keeps
exactly one copy of it:

* plain loop: rank r minimises ``mean NLL over its B/W examples + regularizer(net) / N``; the averaged
  gradient is that of ``mean NLL over the B examples + regularizer(net) / N``, the single-process loss;
* Pyro: :class:`~bayes_sparse.SVIModel` scales the likelihood by ``N / (B/W)`` (the plate sees the local
  batch), so rank r's negative ELBO is ``N/(B/W) * NLL_r + KL``, whose average over the ranks is
  ``N/B * NLL + KL``, the single-process negative ELBO.

Both need the same local batch size on every rank (:func:`rank_batches` makes it so). Put the DDP wrapper
inside the Pyro model, ``SVIModel(DDP(net), num_data=N)``, and train with :func:`bayes_sparse.fit_svi`
(tested against a single process, ``tests/test_ddp.py``; ``pyro.infer.SVI`` and ``torch.optim`` over
``Trace_ELBO()(model, model.guide)`` work the same way): each SVI step runs one forward and one backward
pass of the wrapper, which is what DDP expects. The schedule hooks, the
regularizer and :func:`bayes_sparse.threshold_` find the sparse layers through the wrapper; evaluate
with the inner network (``ddp.module``), since a forward of the wrapper is a collective call that every
rank must make.

Noise, masks and schedules
--------------------------
Parameters stay identical on every rank (DDP broadcasts them from rank 0 at construction and every rank
applies the same averaged gradient), so everything computed from them agrees too: the masks fixed by
:func:`bayes_sparse.threshold_` and by magnitude pruning rounds, the proximal L1 step, LTP's temperature.
DDP also broadcasts rank 0's buffers (``weight_mask`` included) before each forward pass. The training
noise differs: Sparse VD draws noise per example (local reparameterization) and L0 draws its gates once
per forward pass, on each rank from its own generator. Seed the ranks differently (e.g.
``torch.manual_seed(seed + rank)``) so that L0's gate draws are independent samples of the gradient
estimator; identical seeds give every rank the same gates (which is what a single process draws for the
whole batch). :func:`check_replicas` verifies that the ranks agree.

NaN and inf
-----------
The non-finite guard of :func:`bayes_sparse.fit_svi` and :func:`bayes_sparse.infer.check_finite_` (given
the wrapper) exchanges one flag between the ranks at each check, so a NaN in one rank's batch or loss
stops every rank with a ``FloatingPointError`` before any optimizer step, none waiting in a collective.

Exit
----
With torch 2.14 and gloo, a process that has run DDP sometimes aborts during the interpreter's shutdown,
after ``destroy_process_group()`` ("terminate called without an active exception"; a bare DDP script
does it too), which ``torchrun`` reports as a failed rank; ``examples/ddp_mnist.py`` leaves with
``os._exit(0)`` once everything is written.

Example (run with ``torchrun --nproc_per_node 2 script.py``)::

    dist.init_process_group("gloo")
    torch.manual_seed(0)                     # the same network on every rank
    net = bs.sparsify(model, method="vd")
    model = bs.SVIModel(DistributedDataParallel(net), num_data=N)
    torch.manual_seed(1 + dist.get_rank())  # independent training noise on each rank
    epochs = iter(range(10))

    def batches():                           # this rank's share of the same global batches on every rank
        for idx in bs.distributed.rank_batches(N, 100, epoch=next(epochs)):
            yield x[idx], y[idx]

    bs.fit_svi(model, batches, epochs=10, progress=dist.get_rank() == 0)
    bs.threshold_(net)                       # identical masks on every rank
    bs.distributed.check_replicas(net)      # raises if any rank differs
    dist.destroy_process_group()

The plain loop is the one of :mod:`bayes_sparse.schedule` with ``DistributedDataParallel(net)`` called in
place of ``net`` (the regularizer, the hooks and ``threshold_`` still take ``net``), and
:func:`bayes_sparse.infer.check_finite_` (given the wrapper) between ``backward()`` and ``step()``.
See ``examples/ddp_mnist.py``.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ._validation import check_module, check_positive_int

__all__ = ["check_replicas", "find_ddp", "rank_batches", "unwrap"]


def find_ddp(model: nn.Module) -> Optional[DistributedDataParallel]:
    """The first ``DistributedDataParallel`` module in ``model`` (``model`` itself included), or ``None``."""
    check_module(model)
    return next((m for m in model.modules() if isinstance(m, DistributedDataParallel)), None)


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``DistributedDataParallel`` wrapper holds (``model.module``), else ``model`` itself."""
    check_module(model)
    return model.module if isinstance(model, DistributedDataParallel) else model


def _rank_and_world(rank: Optional[int], world_size: Optional[int],
                    group: Optional[dist.ProcessGroup] = None) -> tuple[int, int]:
    initialized = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size(group) if initialized else 1
    if rank is None:
        rank = dist.get_rank(group) if initialized else 0
    world_size = check_positive_int(world_size, "world_size")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}) (world_size={world_size}), got {rank!r}")
    return rank, world_size


def rank_batches(num_data: int, batch_size: int, *, epoch: int = 0, seed: int = 0, rank: Optional[int] = None,
                 world_size: Optional[int] = None, shuffle: bool = True, drop_last: bool = False) -> Iterator[Tensor]:
    """This rank's share of each global minibatch of one epoch, as indices into the training set.

    Every rank draws the same permutation of ``range(num_data)`` (a generator seeded with ``seed + epoch``,
    as ``DistributedSampler`` does), cuts it into global batches of ``batch_size`` consecutive indices,
    the batches a single process would take from that permutation, and yields part ``rank`` of each,
    cut into ``world_size`` equal consecutive parts. Every rank therefore yields the same number of
    batches of the same size, which keeps the average over the ranks of the local mean losses equal
    to the global mean (and keeps the ranks' collective calls paired).

    Args:
        num_data: Size N of the training set.
        batch_size: The global batch size B, a multiple of ``world_size``.
        epoch: The epoch, so each epoch has its own permutation.
        seed: Base seed, the same on every rank.
        rank: This rank; default ``torch.distributed.get_rank()`` (0 without a process group).
        world_size: Number of ranks; default ``torch.distributed.get_world_size()`` (1 without a process group).
        shuffle: ``False`` keeps the order ``0 .. N-1``.
        drop_last: Drop the last global batch when it is smaller than ``batch_size``; otherwise it is kept,
            shortened to a multiple of ``world_size`` (dropping fewer than ``world_size`` examples).

    Yields:
        Index tensors (int64) of ``batch_size // world_size`` examples (the last batch can be shorter).

    Raises:
        ValueError: a size is not a positive int, ``batch_size`` is not a multiple of ``world_size``, or
            ``rank`` is out of range.

    Example:
        >>> [idx.tolist() for idx in rank_batches(8, 4, shuffle=False, rank=1, world_size=2)]
        [[2, 3], [6, 7]]
    """
    num_data = check_positive_int(num_data, "num_data", hint="the training set size")
    batch_size = check_positive_int(batch_size, "batch_size", hint="the global batch size")
    rank, world_size = _rank_and_world(rank, world_size)
    if batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} (the global batch) must be a multiple of world_size={world_size}, "
                         "so that every rank gets the same number of examples and the mean over the ranks is the "
                         f"global mean; use e.g. {batch_size - batch_size % world_size or world_size}")
    if shuffle:
        order = torch.randperm(num_data, generator=torch.Generator().manual_seed(int(seed) + int(epoch)))
    else:
        order = torch.arange(num_data)
    for start in range(0, num_data, batch_size):
        batch = order[start:start + batch_size]
        if batch.numel() < batch_size and drop_last:
            break
        local = batch.numel() // world_size
        if local == 0:
            break
        yield batch[rank * local:(rank + 1) * local]


def _digest(value: Any) -> str:
    if isinstance(value, Tensor):
        t = value.detach().to("cpu").contiguous().reshape(-1)
        h = hashlib.sha1(f"{t.dtype}{tuple(value.shape)}".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
    return hashlib.sha1(repr(value).encode()).hexdigest()


def check_replicas(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> None:
    """Raise unless every rank holds bit-identical parameters, buffers and extra state (masks included).

    A collective call: every rank of ``group`` must make it. It hashes each entry of ``model.state_dict()``
    (the ``DistributedDataParallel`` wrapper removed), so only the hashes travel. Without an initialized
    process group it returns at once.

    Args:
        model: The network, or its ``DistributedDataParallel`` wrapper.
        group: The process group; default the wrapper's, else the default group.

    Raises:
        RuntimeError: on every rank, naming the entries that differ and the ranks that differ from rank 0.
    """
    check_module(model)
    if not (dist.is_available() and dist.is_initialized()):
        return
    ddp = find_ddp(model)
    if group is None and ddp is not None:
        group = ddp.process_group
    digests = {name: _digest(v) for name, v in unwrap(model).state_dict().items()}
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, digests, group=group)
    reference = gathered[0]
    differ: dict[str, list[int]] = {}
    for r, other in enumerate(gathered[1:], start=1):
        for name in sorted(set(reference) | set(other)):
            if reference.get(name) != other.get(name):
                differ.setdefault(name, []).append(r)
    if differ:
        listed = "; ".join(f"{name!r} (ranks {ranks})" for name, ranks in list(differ.items())[:5])
        more = f" and {len(differ) - 5} more" if len(differ) > 5 else ""
        raise RuntimeError(f"the replicas differ from rank 0 in {len(differ)} state_dict entries: {listed}{more}. "
                           "Build the model identically on every rank (or wrap it in DistributedDataParallel, "
                           "which broadcasts rank 0's parameters), give every rank the same number of batches, "
                           "and change parameters or masks outside training on every rank alike")
