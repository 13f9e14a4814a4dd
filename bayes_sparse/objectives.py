"""Model-level regularizers: sums over every sparse layer in a model.

Every term is in the units of the whole-data objective (summed negative log-likelihood over N examples),
so a plain PyTorch loop with a mean-reduced NLL uses ``loss = nll + regularizer(model) / N``, and Pyro
SVI adds ``regularizer(model)`` unscaled (:class:`bayes_sparse.SVIModel` does). Each layer's term is
multiplied by its ``reg_weight`` (the warm-up schedule's current weight, set by
:func:`bayes_sparse.on_epoch_start`; 1.0 when no schedule runs, which gives the true objective).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers.base import sparse_layers

__all__ = ["kl", "penalty", "regularizer"]


def _sum(model: nn.Module, bayesian: bool | None) -> Tensor:
    terms = [layer.regularizer() * layer.reg_weight if layer.reg_weight != 1.0 else layer.regularizer()
             for _, layer in sparse_layers(model) if bayesian is None or layer.bayesian == bayesian]
    if not terms:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None, dtype=p.dtype if p is not None else None)
    return torch.stack(terms).sum()


def kl(model: nn.Module) -> Tensor:
    """Sum of the KL divergences of the Bayesian sparse layers (Sparse VD) in ``model``.

    For Sparse VD layers this is the approximate KL to the log-uniform prior; in a plain loop with a
    mean-reduced NLL use ``loss = nll + kl(model) / N`` (N = training set size).

    Args:
        model: Any module; other layers contribute nothing.

    Returns:
        A scalar tensor on the model's device (0 when there is no Bayesian layer).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    Example:
        >>> import bayes_sparse as bs
        >>> float(bs.kl(bs.VDLinear(4, 2))) > 0
        True

    References:
        Molchanov, Ashukha, Vetrov 2017, Eq. 14.
    """
    return _sum(model, True)


def penalty(model: nn.Module) -> Tensor:
    """Sum of the penalties of the non-Bayesian sparse layers (L0, LTP, L1) in ``model``, units of 1/N.

    Example:
        >>> import bayes_sparse as bs
        >>> float(bs.penalty(bs.L0Linear(4, 2))) > 0
        True
    """
    return _sum(model, False)


def regularizer(model: nn.Module) -> Tensor:
    """``kl(model) + penalty(model)``: everything the sparse layers add to the objective, for any mix of layers."""
    return _sum(model, None)
