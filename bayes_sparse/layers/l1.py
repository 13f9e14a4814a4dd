"""L1 penalty, with an optional proximal (soft-threshold) step that makes exact zeros: the method ``"l1"``.

The penalty is ``penalty * |w|_1`` in units of 1/N (plain loop: ``loss = nll + regularizer(model) / N``).
With ``proximal=True`` the penalty is left out of the loss and the ``after_step`` hook (run by
:func:`bayes_sparse.after_step` right after ``optimizer.step()``) applies
``w <- sign(w) max(|w| - lr * penalty / N, 0)`` instead.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional as BF
from .._validation import check_module, check_number, check_positive_int
from .base import COMMON_OPTIONS, Option, SparseLayer, penalty_alias

__all__ = ["L1", "L1Conv1d", "L1Conv2d", "L1Conv3d", "L1Linear", "proximal_step_"]

DEFAULT_L1_PENALTY = 1.0
#: Weights with |w| at or below this are pruned by the default criterion.
DEFAULT_PRUNE_BELOW = 1e-3


def _check_bool(value, name):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


class L1(SparseLayer):
    """L1-penalized weights.

    Options:
        penalty: L1 strength in units of 1/N, finite and >= 0.
        proximal: Leave the penalty out of the loss and apply it as a proximal step after each optimizer step.
        prune_below: Default pruning criterion ``|w| > prune_below``, >= 0 (``threshold_(model, threshold=t)``
            uses ``t`` instead).
        warmup: See :data:`bayes_sparse.layers.base.COMMON_OPTIONS`.

    Example:
        >>> L1Linear(4, 2)(torch.randn(3, 4)).shape
        torch.Size([3, 2])
    """

    method = "l1"
    criterion_in_eval = False
    threshold_name = "magnitude"
    threshold_low = 0.0
    options = {
        **COMMON_OPTIONS,
        "penalty": Option(DEFAULT_L1_PENALTY, lambda v, n: check_number(v, n, low=0.0), "L1 strength, units of 1/N"),
        "proximal": Option(False, _check_bool, "apply the penalty as a proximal step"),
        "prune_below": Option(DEFAULT_PRUNE_BELOW, lambda v, n: check_number(v, n, low=0.0),
                              "default criterion |w| > prune_below"),
    }
    penalty_strength = penalty_alias

    def keep_score(self) -> Tensor:
        return self.raw_weight.abs()

    def criterion_mask(self, threshold: float | None = None) -> Tensor:
        return self.raw_weight.abs() > self.check_threshold(threshold, self.prune_below)

    def regularizer(self) -> Tensor:
        if self.proximal:
            return self.raw_weight.new_zeros(())
        if not self.mask_fixed:  # a training step's common case: the fused backward (see BF.l1_norm)
            return self.penalty * BF.l1_norm(self.raw_weight)
        return self.penalty * self._masked_sum(self.raw_weight.abs())

    def after_step(self, lr: float, num_data: int) -> None:
        """The proximal step (when ``proximal``): the exact proximal operator of the penalty for SGD."""
        if self.proximal:
            with torch.no_grad():
                w = self.raw_weight
                w.copy_(BF.soft_threshold(w, lr * self.penalty * self.reg_weight / num_data))


L1Linear = L1[nn.Linear]
L1Conv1d = L1[nn.Conv1d]
L1Conv2d = L1[nn.Conv2d]
L1Conv3d = L1[nn.Conv3d]


def proximal_step_(model: nn.Module, lr: float, num_data: int) -> nn.Module:
    """Soft-threshold the weights of every L1 layer with ``proximal=True`` by ``lr * penalty / num_data``.

    Call it right after ``optimizer.step()`` (or call :func:`bayes_sparse.after_step`, which runs every
    method's step hook, this one included). Returns ``model``.
    """
    check_module(model)
    lr = check_number(lr, "lr", low=0.0)
    num_data = check_positive_int(num_data, "num_data", hint="the training set size")
    for m in model.modules():
        if isinstance(m, L1):
            m.after_step(lr, num_data)
    return model
