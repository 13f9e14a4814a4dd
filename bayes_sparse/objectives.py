"""Model-level regularizers: sums over every sparse layer in a model."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers.base import sparse_layers

__all__ = ["kl"]


def kl(model: nn.Module) -> Tensor:
    """Sum of the KL divergences (or penalties) of all sparse layers in ``model``.

    For Sparse VD layers this is the approximate KL to the log-uniform prior. In a plain PyTorch loop
    with a mean-reduced negative log-likelihood, use ``loss = nll + kl(model) / N`` (N = training set size).

    Args:
        model: Any module; dense layers contribute nothing.

    Returns:
        A scalar tensor on the model's device (0 when it has no sparse layers).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    Example:
        >>> import bayes_sparse as bs
        >>> float(bs.kl(bs.VDLinear(4, 2))) > 0
        True

    References:
        Molchanov, Ashukha, Vetrov 2017, Eq. 14.
    """
    terms = [layer.regularizer() for _, layer in sparse_layers(model)]
    if not terms:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return torch.stack(terms).sum()
