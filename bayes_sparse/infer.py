"""Training with Pyro SVI: the Pyro model for a network with sparse layers, KL warm-up, a fit loop.

The ELBO of a network with Sparse VD layers is

    ELBO = (N / B) * sum_{i in batch} log p(y_i | x_i, w) - sum_layers KL(q(w) || p(w)),

where the expectation over ``w`` is estimated by the layers' local reparameterization. In the Pyro model
the likelihood sits inside ``pyro.plate("data", size=N, subsample_size=B)`` (Pyro applies the N/B scale)
and the KL (plus the penalties of non-Bayesian layers: L0, LTP, L1) enters as
``pyro.factor("regularizer", -regularizer(net))``. The variational parameters are ordinary module
parameters registered with ``pyro.module``, so the guide has no sample sites.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterable, Optional

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions import constraints
from tqdm.auto import tqdm

from ._validation import check_module, check_number
from .objectives import regularizer

__all__ = ["LIKELIHOODS", "SVIModel", "error_rate", "fit_svi", "flat_then_linear_decay", "kl_warmup_weight"]

logger = logging.getLogger(__name__)

#: Likelihoods :class:`SVIModel` knows.
LIKELIHOODS = ("categorical", "gaussian")


class SVIModel:
    """Pyro model (and empty guide) for a network whose sparse layers carry a KL term.

    Call it with a minibatch ``(x, y)`` drawn from a training set of ``num_data`` examples.

    Args:
        net: The network (any mix of sparse and dense layers). Its parameters are registered as
            ``pyro.module(name, net)``.
        num_data: Size N of the training set, for the N/B minibatch scale.
        likelihood: ``"categorical"`` (``net`` returns logits, ``y`` holds integer labels) or
            ``"gaussian"`` (``net`` returns means shaped like ``y``).
        obs_scale: Standard deviation of the Gaussian likelihood; ``None`` learns it as a Pyro param.
        name: Prefix of the Pyro parameter names.

    Attributes:
        kl_weight: Multiplier of the KL/penalty term (set it for KL warm-up; 1.0 gives the true ELBO).

    Example:
        >>> import bayes_sparse as bs, pyro
        >>> net = torch.nn.Sequential(bs.VDLinear(4, 3))
        >>> model = SVIModel(net, num_data=100)
        >>> svi = pyro.infer.SVI(model, model.guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO())
        >>> loss = svi.step(torch.randn(10, 4), torch.randint(0, 3, (10,)))

    References:
        Molchanov, Ashukha, Vetrov 2017, Eq. 3 and 14; Pyro's SVI tutorial part II (subsampling).
    """

    def __init__(self, net: nn.Module, num_data: int, likelihood: str = "categorical",
                 obs_scale: Optional[float] = None, name: str = "net") -> None:
        self.net = check_module(net, "net")
        if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1:
            raise ValueError(f"num_data must be a positive int (the training set size), got {num_data!r}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; known: {', '.join(LIKELIHOODS)}")
        if obs_scale is not None:
            obs_scale = check_number(obs_scale, "obs_scale", low=0.0, low_inclusive=False)
        self._check_param_store(net, name)
        self.num_data = num_data
        self.likelihood = likelihood
        self.obs_scale = obs_scale
        self.name = name
        self.kl_weight = 1.0

    @staticmethod
    def _check_param_store(net: nn.Module, name: str) -> None:
        """Pyro would silently train stale tensors left in its param store under this network's names."""
        store = pyro.get_param_store()
        ours = {f"{name}$$${n}": p for n, p in net.named_parameters()}
        stale = [k for k in ours if k in store and store[k] is not ours[k]]
        if stale:
            raise RuntimeError(f"Pyro's param store already holds other tensors named {stale[:3]}... (from another "
                               f"model); call pyro.clear_param_store() first or give this SVIModel another name=")

    def _check_batch(self, x: Tensor, y: Optional[Tensor]) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if y is not None and x.shape[0] > self.num_data:
            raise ValueError(f"the batch has {x.shape[0]} examples but num_data={self.num_data}; "
                             "num_data must be the full training set size")
        if y is None:
            return
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
        if self.likelihood == "categorical" and (y.dtype.is_floating_point or y.dtype.is_complex
                                                 or y.dtype == torch.bool):
            raise TypeError(f"the categorical likelihood needs integer class labels, got y of dtype {y.dtype}; "
                            "convert with y.long()")
        if self.likelihood == "gaussian" and not y.dtype.is_floating_point:
            raise TypeError(f"the gaussian likelihood needs floating targets, got y of dtype {y.dtype}; "
                            "convert with y.float()")

    def obs_dist(self, out: Tensor) -> dist.Distribution:
        """The likelihood p(y | network output) for a batch of outputs (batch dim first)."""
        if self.likelihood == "categorical":
            return dist.Categorical(logits=out)
        scale = self.obs_scale
        if scale is None:
            scale = pyro.param(f"{self.name}.obs_scale", lambda: torch.ones((), device=out.device, dtype=out.dtype),
                               constraint=constraints.positive)
        return dist.Normal(out, scale).to_event(out.dim() - 1)

    def __call__(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        self._check_batch(x, y)
        self._check_param_store(self.net, self.name)
        pyro.module(self.name, self.net)
        batch = x.shape[0]
        # The minibatch was drawn by the data loader; handing Pyro its positions keeps the N/B scale
        # without a second, unused random draw of indices. Prediction (y=None) needs no scale.
        size = self.num_data if y is not None else max(batch, self.num_data)
        with pyro.plate("data", size=size, subsample_size=batch,
                        subsample=torch.arange(batch, device=x.device)):
            out = self.net(x)
            if y is not None and self.likelihood == "gaussian" and y.shape != out.shape:
                raise ValueError(f"the network returns shape {tuple(out.shape)} but y has shape {tuple(y.shape)}; "
                                 "reshape y (e.g. y.unsqueeze(-1)) so they match")
            pyro.deterministic("out", out)
            pyro.sample("obs", self.obs_dist(out), obs=y)
        # KL of the Bayesian layers plus the penalties of the others (all in whole-data units)
        pyro.factor("regularizer", -self.kl_weight * regularizer(self.net))
        return out

    def guide(self, x: Tensor, y: Optional[Tensor] = None) -> None:
        """The guide: empty, because q(w) lives in the layers and is reached by ``pyro.module``."""


def kl_warmup_weight(epoch: int, start: int = 5, end: int = 20) -> float:
    """KL weight of the official SparseVD recipe: 0 before ``start``, linear to 1 at ``end``, then 1."""
    if end <= start:
        return 1.0 if epoch >= start else 0.0
    return min(1.0, max(0.0, (epoch - start) / (end - start)))


def flat_then_linear_decay(epochs: int, flat_fraction: float = 0.5) -> Callable[[int], float]:
    """Learning-rate factor: 1 for the first ``flat_fraction`` of the epochs, then linear towards 0."""
    flat = int(round(epochs * flat_fraction))

    def factor(epoch: int) -> float:
        if epoch < flat:
            return 1.0
        return max(0.0, (epochs - epoch) / max(1, epochs - flat))

    return factor


@torch.no_grad()
def error_rate(net: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Classification error of ``net`` in eval mode on tensors ``x``, ``y`` (mode restored afterwards)."""
    was_training = net.training
    net.eval()
    wrong = 0
    for i in range(0, x.shape[0], batch_size):
        wrong += int((net(x[i:i + batch_size]).argmax(-1) != y[i:i + batch_size]).sum())
    net.train(was_training)
    return wrong / x.shape[0]


def fit_svi(model: SVIModel, batches: Callable[[], Iterable[tuple[Tensor, Tensor]]], epochs: int, lr: float = 1e-3,
            kl_warmup: tuple[int, int] = (5, 20), lr_lambda: Optional[Callable[[int], float]] = None,
            progress: bool = True, on_epoch_end: Optional[Callable[[int, dict], None]] = None,
            on_epoch_start: Optional[Callable[[int], None]] = None,
            on_step_end: Optional[Callable[[float], None]] = None) -> list[dict]:
    """Train ``model.net`` with ``pyro.infer.SVI`` and ``Trace_ELBO`` (Adam, per-epoch schedules).

    Args:
        model: The :class:`SVIModel`.
        batches: Called once per epoch; returns an iterable of ``(x, y)`` minibatches (e.g. a DataLoader's
            ``__iter__`` or a function that shuffles tensors).
        epochs: Number of passes.
        lr: Adam learning rate.
        kl_warmup: ``(start, end)`` epochs of the linear KL ramp (see :func:`kl_warmup_weight`).
        lr_lambda: Epoch -> learning-rate factor; default :func:`flat_then_linear_decay`.
        progress: Show a tqdm bar.
        on_epoch_end: Called as ``on_epoch_end(epoch, stats)`` after each epoch.
        on_epoch_start: Called as ``on_epoch_start(epoch)`` (e.g. to anneal an LTP temperature).
        on_step_end: Called as ``on_step_end(lr)`` after each SVI step with the current learning rate
            (e.g. ``lambda lr: bs.proximal_step_(net, lr, N)`` for proximal L1).

    Returns:
        One dict per epoch with ``epoch``, ``loss`` (mean negative ELBO per example), ``kl_weight``, ``lr``.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    lr = check_number(lr, "lr", low=0.0, low_inclusive=False)
    lr_lambda = lr_lambda or flat_then_linear_decay(epochs)
    scheduler = pyro.optim.LambdaLR({"optimizer": torch.optim.Adam, "optim_args": {"lr": lr}, "lr_lambda": lr_lambda})
    svi = pyro.infer.SVI(model, model.guide, scheduler, loss=pyro.infer.Trace_ELBO())
    model.net.train()
    history = []
    bar = tqdm(range(epochs), desc="SVI", unit="epoch", disable=not progress)
    for epoch in bar:
        model.kl_weight = kl_warmup_weight(epoch, *kl_warmup)
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        current_lr = lr * lr_lambda(epoch)
        total, count = 0.0, 0
        for x, y in batches():
            total += svi.step(x, y)
            count += 1
            if on_step_end is not None:
                on_step_end(current_lr)
        if count == 0:
            raise ValueError("batches() yielded no minibatch; check the data loader")
        stats = {"epoch": epoch, "loss": total / count / model.num_data, "kl_weight": model.kl_weight,
                 "lr": current_lr}
        if not math.isfinite(stats["loss"]):
            raise FloatingPointError(f"the loss became {stats['loss']} at epoch {epoch}; lower the learning rate")
        scheduler.step()
        history.append(stats)
        if on_epoch_end is not None:
            on_epoch_end(epoch, stats)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", kl_w=f"{model.kl_weight:.2f}")
        logger.info("epoch %d: %s", epoch, stats)
    return history
