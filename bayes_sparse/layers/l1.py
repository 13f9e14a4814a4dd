"""L1-penalized layers, with an optional proximal (soft-threshold) step that makes exact zeros.

The penalty is ``penalty_strength * |w|_1`` in units of 1/N (plain loop: ``loss = nll + penalty(model) / N``).
With ``proximal=True`` the penalty is left out of the loss and :func:`proximal_step_`, called after each
optimizer step, applies ``w <- sign(w) max(|w| - lr * penalty_strength / N, 0)`` instead.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional as BF
from .._validation import check_module, check_number
from .base import HyperparameterState, SparseLayer

__all__ = ["L1Conv1d", "L1Conv2d", "L1Conv3d", "L1Linear", "proximal_step_"]

DEFAULT_L1_PENALTY = 1.0
#: Weights with |w| at or below this are pruned by the default criterion.
DEFAULT_PRUNE_BELOW = 1e-3


class _L1Layer(HyperparameterState, SparseLayer):
    hyperparameters = ("penalty_strength", "proximal", "prune_below")
    method = "l1"
    criterion_in_eval = False

    def _init_method_parameters(self) -> None:
        self.penalty_strength = DEFAULT_L1_PENALTY
        self.proximal = False
        self.prune_below = DEFAULT_PRUNE_BELOW

    @classmethod
    def from_dense(cls, layer: nn.Module, *, penalty: float = DEFAULT_L1_PENALTY, proximal: bool = False,
                   prune_below: float = DEFAULT_PRUNE_BELOW) -> "_L1Layer":
        """Build the L1 layer from a trained torch layer.

        Args:
            layer: A plain torch layer of this class's :attr:`dense_type`.
            penalty: L1 strength in units of 1/N, finite and >= 0.
            proximal: Leave the penalty out of the loss and apply it with :func:`proximal_step_`.
            prune_below: Default pruning criterion ``|w| > prune_below``, >= 0.
        """
        new = cls._copy_from_dense(layer)
        new.penalty_strength = check_number(penalty, "penalty", low=0.0)
        if not isinstance(proximal, bool):
            raise TypeError(f"proximal must be True or False, got {proximal!r}")
        new.proximal = proximal
        new.prune_below = check_number(prune_below, "prune_below", low=0.0)
        return new

    def keep_score(self) -> Tensor:
        return self.weight.abs()

    def criterion_mask(self, threshold: float | None = None) -> Tensor:
        return self.weight.abs() > (self.prune_below if threshold is None else threshold)

    def regularizer(self) -> Tensor:
        if self.proximal:
            return self.weight.new_zeros(())
        return self.penalty_strength * self._masked_sum(self.weight.abs())


class L1Linear(_L1Layer, nn.Linear):
    """Drop-in ``nn.Linear`` with an L1 penalty (see the module docstring).

    Example:
        >>> L1Linear(4, 2)(torch.randn(3, 4)).shape
        torch.Size([3, 2])
    """


class L1Conv1d(_L1Layer, nn.Conv1d):
    """Drop-in ``nn.Conv1d`` with an L1 penalty."""


class L1Conv2d(_L1Layer, nn.Conv2d):
    """Drop-in ``nn.Conv2d`` with an L1 penalty."""


class L1Conv3d(_L1Layer, nn.Conv3d):
    """Drop-in ``nn.Conv3d`` with an L1 penalty."""


@torch.no_grad()
def proximal_step_(model: nn.Module, lr: float, num_data: int) -> nn.Module:
    """Soft-threshold the weights of every L1 layer with ``proximal=True`` by ``lr * penalty_strength / num_data``.

    Call it right after ``optimizer.step()``; it is the exact proximal step for SGD and sets weights to
    exactly zero. Returns ``model``.
    """
    check_module(model)
    lr = check_number(lr, "lr", low=0.0)
    if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1:
        raise ValueError(f"num_data must be a positive int (the training set size), got {num_data!r}")
    for m in model.modules():
        if isinstance(m, _L1Layer) and m.proximal:
            m.weight.copy_(BF.soft_threshold(m.weight, lr * m.penalty_strength / num_data))
    return model
