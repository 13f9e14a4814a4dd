"""Thresholding: turn each sparse layer's noise parameters into a fixed hard mask."""

from __future__ import annotations

import logging
import warnings

from torch import nn

from ._validation import check_number
from .layers.base import sparse_layers
from .layers.vd import _VDLayer

__all__ = ["threshold_"]

logger = logging.getLogger(__name__)


def threshold_(model: nn.Module, log_alpha: float | None = None) -> dict[str, float]:
    """Fix the hard mask of every sparse layer in place.

    Sparse VD layers keep the weights with ``log alpha < log_alpha`` (default 3.0, the paper's value).
    Afterwards both training and evaluation use the fixed masks, the KL counts kept weights only, and
    :func:`bayes_sparse.to_dense` can export the model.

    Args:
        model: A model containing sparse layers; changed in place.
        log_alpha: Threshold on the clipped log alpha, a finite number >= 0; ``None`` for each layer's default.

    Returns:
        ``{layer_name: density}`` for every sparse layer (density = kept / total weights).

    Raises:
        TypeError: ``model`` is not a module or ``log_alpha`` is not a number.
        ValueError: ``log_alpha`` is negative, NaN or infinite, or the model has no sparse layers.

    Warns:
        UserWarning: naming each layer left with no weight at all.

    Example:
        >>> import bayes_sparse as bs
        >>> bs.threshold_(bs.VDLinear(4, 2))
        {'': 1.0}

    References:
        Molchanov, Ashukha, Vetrov 2017, Section 4 (log alpha >= 3 means dropout rate > 0.95).
    """
    if log_alpha is not None:
        log_alpha = check_number(log_alpha, "log_alpha", low=0.0,
                                 hint="Weights with log alpha >= threshold are pruned; the paper uses 3.0.")
    layers = list(sparse_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no sparse layers to threshold; replace its layers first, "
                         "e.g. VDLinear.from_dense(linear)")
    densities: dict[str, float] = {}
    for name, layer in layers:
        if isinstance(layer, _VDLayer):
            mask = layer.criterion_mask(log_alpha)
        else:  # pragma: no cover - every layer family in this package is handled above
            raise TypeError(f"threshold_ does not know layer type {type(layer).__name__}")
        layer.set_mask_(mask)
        densities[name] = layer.density
        if densities[name] == 0.0:
            warnings.warn(f"layer {name or type(layer).__name__!r} ({type(layer).__name__}) has no weight left after "
                          f"thresholding; its output is its bias only. Use a higher threshold to keep it alive.",
                          UserWarning, stacklevel=2)
        logger.debug("threshold_: %s density %.4f", name, densities[name])
    return densities
