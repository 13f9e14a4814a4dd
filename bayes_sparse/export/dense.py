"""Dense export: the same architecture with plain torch layers and masked weights."""

from __future__ import annotations

import copy

from torch import nn

from .._validation import check_module
from ..layers.base import ParameterHolder, SparseLayer, sparse_layers
from ..layers.parameter import detach_

__all__ = ["dense_copy", "to_dense"]


def to_dense(model: nn.Module) -> nn.Module:
    """Return a copy of ``model`` with every sparse layer replaced by its plain torch twin.

    The copy's ``state_dict`` has the same keys as the original (pre-conversion) architecture, so
    ``original.load_state_dict(to_dense(model).state_dict())`` works, and in eval mode its outputs equal
    the thresholded sparse model's. ``model`` itself is not changed.

    Args:
        model: A model whose sparse layers have been thresholded with :func:`bayes_sparse.threshold_`.

    Returns:
        A new module made only of the original torch layer classes.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        RuntimeError: a sparse layer has no fixed mask yet (call ``threshold_`` first).

    Example:
        >>> import bayes_sparse as bs
        >>> layer = bs.VDLinear(4, 2); _ = bs.threshold_(layer)
        >>> type(bs.to_dense(layer)).__name__
        'Linear'
    """
    check_module(model)
    unfixed = [name or type(layer).__name__ for name, layer in sparse_layers(model) if not bool(layer.mask_fixed)]
    if unfixed:
        raise RuntimeError(f"layers {unfixed} have no fixed mask; call bayes_sparse.threshold_(model) before to_dense")
    if isinstance(model, SparseLayer):
        return model.to_dense()
    # each sparse layer is copied straight into its dense twin (its method state is never copied); a layer
    # used at several places stays one module
    memo: dict = {id(m): m.to_dense() for m in model.modules()
                  if isinstance(m, SparseLayer) and m.dense_type is not ParameterHolder}
    out = copy.deepcopy(model, memo)
    held: dict = {}
    for m in list(out.modules()):  # held parameters go back into their modules, tied ones re-tied
        detach_(m, held)
    return out


def dense_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` made only of plain torch layers, whether or not it has sparse layers.

    Args:
        model: A thresholded sparse model or a plain model.

    Returns:
        :func:`to_dense` of ``model`` when it has sparse layers, else ``copy.deepcopy(model)``; ``model``
        itself is not changed.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        RuntimeError: a sparse layer has no fixed mask yet (call ``threshold_`` first).

    Example:
        >>> plain = nn.Linear(4, 2)
        >>> twin = dense_copy(plain)
        >>> twin is not plain and twin.weight.equal(plain.weight)
        True
    """
    check_module(model)
    if any(isinstance(m, SparseLayer) for m in model.modules()):
        return to_dense(model)
    return copy.deepcopy(model)
