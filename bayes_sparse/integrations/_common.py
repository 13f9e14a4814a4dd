"""What the framework integrations share: argument checks, the regularized loss, the per-step hook.

Nothing here imports a training framework; :mod:`bayes_sparse.integrations.lightning` and
:mod:`bayes_sparse.integrations.hf` wrap these pieces in each framework's callback protocol.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Mapping
from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor, nn

from .._validation import check_module, check_positive_int
from ..layers.base import SparseLayer, sparse_layers
from ..objectives import regularizer
from ..schedule import after_step
from ..threshold import threshold_

__all__ = ["ThresholdSpec", "add_regularizer", "check_num_data", "threshold_kwargs"]

#: What the integrations' ``threshold`` argument accepts: ``True`` (each method's own criterion),
#: ``False`` (leave the masks unfixed), or keyword arguments for :func:`bayes_sparse.threshold_`.
ThresholdSpec = Union[bool, Mapping[str, Any]]

# layer -> the num_data of the last add_regularizer call that covered it (read by RegularizerCheck)
_REGULARIZED: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()


def check_num_data(num_data: Any) -> int:
    """Return ``num_data`` after checking it is a positive int (the training set size N)."""
    return check_positive_int(num_data, "num_data",
                              hint="the number of training examples N, e.g. len(train_dataset), not the batch "
                                   "size or the number of batches")


def unique_sparse_layers(model: nn.Module) -> list[tuple[str, SparseLayer]]:
    """``(name, layer)`` for every sparse layer of ``model``, a shared layer once."""
    seen: set[int] = set()
    out = []
    for name, layer in sparse_layers(model):
        if id(layer) not in seen:
            seen.add(id(layer))
            out.append((name, layer))
    return out


def require_sparse_layers(model: nn.Module, who: str) -> list[tuple[str, SparseLayer]]:
    """The sparse layers of ``model``; ``ValueError`` saying how to fix it when there are none."""
    check_module(model)
    layers = unique_sparse_layers(model)
    if not layers:
        raise ValueError(f"{who}: {type(model).__name__} has no sparse layers, so there is nothing to regularize, "
                         "schedule or threshold; convert the network before training, e.g. "
                         "net = bayes_sparse.sparsify(net, method='vd')")
    return layers


def add_regularizer(loss: Tensor, model: nn.Module, num_data: int) -> Tensor:
    """``loss + bayes_sparse.regularizer(model) / num_data``: the sparse objective for a mean-reduced loss.

    The regularizer (KL divergences and penalties of every sparse layer, each weighted by its warm-up
    schedule) is in whole-data units; dividing by the training set size N puts it in the units of a loss
    that is a mean over the examples of a batch. Framework integrations call this, or users call it in
    their own ``training_step``; the callbacks check, on the first optimizer step, that it was called.

    Args:
        loss: The data term, a mean over the batch (e.g. ``F.cross_entropy(logits, y)``); a scalar tensor.
        model: The module holding the sparse layers (the network or any module containing it).
        num_data: The training set size N (a positive int).

    Returns:
        ``loss + regularizer(model) / num_data``, differentiable in both.

    Raises:
        TypeError: ``loss`` is not a tensor or ``model`` is not a module.
        ValueError: ``num_data`` is not a positive int, or ``model`` has no sparse layers.

    Example:
        >>> import torch, bayes_sparse as bs
        >>> from bayes_sparse.integrations import add_regularizer
        >>> net = bs.sparsify(torch.nn.Linear(4, 2), method="l1")
        >>> nll = torch.tensor(0.5)
        >>> torch.equal(add_regularizer(nll, net, 100), nll + bs.regularizer(net) / 100)
        True
    """
    return regularize(loss, model, num_data)


def regularize(loss: Tensor, model: nn.Module, num_data: int, accumulation_steps: int = 1) -> Tensor:
    """:func:`add_regularizer` with the term also divided by ``accumulation_steps``, for a loss already
    normalised over a whole accumulated batch (each micro-batch then carries its share of the term)."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss must be a torch.Tensor (the mean data loss of the batch), got {type(loss).__name__}")
    num_data = check_num_data(num_data)
    accumulation_steps = check_positive_int(accumulation_steps, "accumulation_steps")
    layers = require_sparse_layers(model, "add_regularizer")
    for _, layer in layers:
        _REGULARIZED[layer] = num_data
    return loss + regularizer(model) / (num_data * accumulation_steps)


def threshold_kwargs(threshold: Any) -> Optional[dict[str, Any]]:
    """Check an integration's ``threshold`` argument; the keywords for ``threshold_``, or ``None`` for none.

    Raises:
        TypeError: ``threshold`` is neither a bool nor a mapping, or names an argument ``threshold_`` lacks.
    """
    if isinstance(threshold, bool):
        return {} if threshold else None
    if not isinstance(threshold, Mapping):
        raise TypeError(f"threshold must be True (each method's own criterion), False (no thresholding) or a dict "
                        f"of keyword arguments for bayes_sparse.threshold_, e.g. {{'sparsity': 0.9}}; got "
                        f"{type(threshold).__name__} ({threshold!r:.60})")
    kwargs = dict(threshold)
    params = inspect.signature(threshold_).parameters
    unknown = sorted(k for k in kwargs if k not in params or k == "model")
    if unknown:
        accepted = [k for k in params if k != "model"]
        raise TypeError(f"threshold has key(s) {unknown} that bayes_sparse.threshold_ does not take; accepted: "
                        f"{accepted}")
    return kwargs


def resolve_epochs(epochs: Any, framework_epochs: Any, where: str) -> int:
    """The number of epochs the schedules span: ``epochs`` when given, else the framework's count."""
    if epochs is not None:
        return check_positive_int(epochs, "epochs", hint="the number of epochs the schedules span")
    if isinstance(framework_epochs, int) and not isinstance(framework_epochs, bool) and 0 < framework_epochs < 2**31:
        return framework_epochs
    raise ValueError(f"the schedules (warm-up, LTP temperature, magnitude rounds) are fractions of the training "
                     f"epochs, and {where} gives no finite epoch count ({framework_epochs!r}); pass epochs=... to "
                     "the callback")


def _lr_of_params(optimizer: Any) -> dict[int, float]:
    lrs: dict[int, float] = {}
    for group in optimizer.param_groups:
        lr = group.get("lr")
        if isinstance(lr, Tensor):
            lr = float(lr)
        for p in group["params"]:
            lrs[id(p)] = lr
    return lrs


def step_hook(model: nn.Module, optimizers: Iterable[Any], num_data: int) -> None:
    """Run :func:`bayes_sparse.after_step` for the sparse layers these optimizers just stepped.

    Each layer gets the learning rate of the parameter group holding its weight (read before any scheduler
    moved it); layers whose weight no optimizer holds (frozen) are left alone.
    """
    layers = unique_sparse_layers(model)
    lrs: dict[int, float] = {}
    for opt in optimizers:
        lrs.update(_lr_of_params(opt))
    stepped = [(layer, lrs[id(layer.raw_weight)]) for _, layer in layers if id(layer.raw_weight) in lrs]
    if not stepped:
        return
    if len(stepped) == len(layers) and len({lr for _, lr in stepped}) == 1:
        after_step(model, stepped[0][1], num_data)  # the common case: one call names the failing layer
        return
    for layer, lr in stepped:
        after_step(layer, lr, num_data)


class RegularizerCheck:
    """Checks, once, that the loss of the first optimizer step went through :func:`add_regularizer`.

    ``start(model)`` forgets earlier calls; ``check(model, num_data, hint)`` warns naming the sparse layers
    whose trainable regularizer was not added, and raises when it was added with another ``num_data``.
    """

    def __init__(self) -> None:
        self.done = False

    def start(self, model: nn.Module) -> None:
        self.done = False
        for _, layer in unique_sparse_layers(model):
            _REGULARIZED.pop(layer, None)

    def check(self, model: nn.Module, num_data: int, hint: str) -> None:
        if self.done:
            return
        self.done = True
        missing, other_n = [], set()
        for name, layer in unique_sparse_layers(model):
            if layer in _REGULARIZED:
                if _REGULARIZED[layer] != num_data:
                    other_n.add(_REGULARIZED[layer])
                continue
            with torch.enable_grad():
                trainable = layer.regularizer().requires_grad  # magnitude pruning, proximal L1: no loss term
            if trainable:
                missing.append(name or type(layer).__name__)
        if other_n:
            raise ValueError(f"the loss was regularized with num_data={sorted(other_n)} but the callback has "
                             f"num_data={num_data}; use the training set size in both places")
        if missing:
            shown = ", ".join(repr(n) for n in missing[:8]) + (" ..." if len(missing) > 8 else "")
            warnings.warn(f"the loss of the first optimizer step did not include the regularizer of sparse layer(s) "
                          f"{shown}; without it they do not sparsify. {hint}", UserWarning, stacklevel=2)
