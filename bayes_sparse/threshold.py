"""Thresholding: turn each sparse layer's scores into a fixed hard mask.

Three ways, for every method: each layer's own criterion (log alpha for Sparse VD, the test-time gate for
L0, the learned threshold for LTP, magnitude for L1 and magnitude pruning), a target sparsity per layer,
or a target sparsity over the whole model (ranking keep-scores). Masks only ever prune more: a weight
pruned by an earlier call stays pruned (``layer.clear_mask_()`` starts over).
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ._validation import check_number, check_positive_int
from .layers.base import global_top_k_masks, sparse_layers, top_k_mask
from .layers.magnitude import sparsity_schedule

__all__ = ["SCOPES", "iterative_magnitude_prune_", "sparsity_schedule", "threshold_"]

logger = logging.getLogger(__name__)

SCOPES = ("layer", "global")
#: Default guard: every layer keeps at least this fraction of its weights (and at least one weight).
DEFAULT_MIN_DENSITY = 1e-3


def threshold_(model: nn.Module, threshold: Optional[float] = None, *, sparsity: Optional[float] = None,
               scope: str = "layer", min_density: float = DEFAULT_MIN_DENSITY,
               log_alpha: Optional[float] = None) -> dict[str, float]:
    """Fix the hard mask of every sparse layer in place.

    ``threshold_(model)`` uses each layer's own criterion (Sparse VD: ``log alpha < 3``);
    ``threshold_(model, t)`` hands ``t`` to every layer's ``criterion_mask`` (Sparse VD: log alpha, L1 and
    magnitude: ``|w|``; methods that prune by a learned criterion, L0 and LTP, refuse one);
    ``threshold_(model, sparsity=s, scope="layer"|"global")`` keeps the ``1 - s`` highest keep-scores per
    layer or over all layers. Afterwards training and evaluation use the fixed masks, penalties count kept
    weights only, every reader of ``layer.weight`` sees the masked weight, and
    :func:`bayes_sparse.to_dense` can export the model.

    Args:
        model: A model containing sparse layers; changed in place.
        threshold: Passed to each layer's ``criterion_mask``; its meaning and range are the method's.
        sparsity: Target fraction of pruned weights in [0, 1); replaces the layers' own criteria.
        scope: ``"layer"`` (each layer reaches ``sparsity``) or ``"global"`` (one ranking over all layers,
            which must then share one method so their scores compare).
        min_density: Guard: each layer keeps at least ``ceil(min_density * n)`` weights (at least one when
            > 0), with a warning naming the layer when the guard acts. 0 disables it.
        log_alpha: Alias of ``threshold`` for methods whose threshold is a log alpha (Sparse VD); the other
            layers then use their own criterion.

    Returns:
        ``{layer_name: density}`` for every sparse layer (density = kept / total weights).

    Raises:
        TypeError: ``model`` is not a module or a number argument is not a number.
        FloatingPointError: a layer holds NaN or infinite weights (named in the message).
        ValueError: an argument out of range, a threshold a method cannot take (the message names the
            method), two of ``threshold``/``log_alpha``/``sparsity`` given, a global scope over mixed methods,
            or a model without sparse layers.

    Warns:
        UserWarning: naming each layer the guard acted on, or left with no weight at all.

    Example:
        >>> import bayes_sparse as bs
        >>> bs.threshold_(bs.MagnitudeLinear(10, 10), sparsity=0.9)
        {'': 0.1}

    References:
        Molchanov, Ashukha, Vetrov 2017 (log alpha >= 3); Han et al. 2015 (magnitude); Gale et al. 2019 (global).
    """
    given = [k for k, v in (("threshold", threshold), ("log_alpha", log_alpha), ("sparsity", sparsity)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give one of threshold, log_alpha (the Sparse VD criterion) or sparsity (a target), "
                         f"not both {given[0]} and {given[1]}")
    if sparsity is not None:
        sparsity = check_number(sparsity, "sparsity", low=0.0, high=1.0,
                                hint="It is the fraction of weights to prune, e.g. 0.9.")
        if sparsity >= 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}; 1.0 would prune every weight")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; known: {', '.join(SCOPES)}")
    min_density = check_number(min_density, "min_density", low=0.0, high=1.0)
    layers = list(sparse_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no sparse layers to threshold; convert it first, "
                         "e.g. bayes_sparse.sparsify(model, method='vd')")
    if log_alpha is not None:
        log_alpha = check_number(log_alpha, "log_alpha", low=0.0,
                                 hint="Weights with log alpha >= threshold are pruned; the paper uses 3.0.")
        if not any(layer.threshold_name == "log_alpha" for _, layer in layers):
            kinds = sorted({layer.method for _, layer in layers})
            raise ValueError(f"log_alpha={log_alpha} applies to methods whose threshold is a log alpha (Sparse VD), "
                             f"and this model has {kinds}; use threshold_(model) for each method's own criterion, "
                             "threshold=... or sparsity=...")

    for name, layer in layers:
        if not bool(torch.isfinite(layer.raw_weight).all()):
            bad = int((~torch.isfinite(layer.raw_weight)).sum())
            raise FloatingPointError(f"layer {name or type(layer).__name__!r} ({type(layer).__name__}) has {bad} "
                                     "non-finite weight(s) (NaN or inf); training diverged. Restore a checkpoint or "
                                     "lower the learning rate; thresholding would export them")
    masks: dict[str, Tensor] = {}
    if sparsity is not None and scope == "global":
        kinds = sorted({layer.method for _, layer in layers})
        if len(kinds) > 1:
            raise ValueError(f"scope='global' ranks keep-scores across layers, which only compare within one "
                             f"method; this model mixes {kinds}. Use scope='layer'")
        kept = global_top_k_masks([layer.ranking_score() for _, layer in layers], sparsity)
        masks.update((name, m) for (name, _), m in zip(layers, kept))
    else:
        for name, layer in layers:
            if sparsity is not None:
                s = layer.ranking_score()
                masks[name] = top_k_mask(s, s.numel() - round(sparsity * s.numel()))
            else:
                t = threshold
                if log_alpha is not None:
                    t = log_alpha if layer.threshold_name == "log_alpha" else None
                with torch.no_grad():
                    masks[name] = layer.criterion_mask(t).detach()

    densities: dict[str, float] = {}
    for name, layer in layers:
        mask = masks[name]
        if layer.mask_fixed:
            mask = mask & layer.weight_mask
        label = name or type(layer).__name__
        min_keep = math.ceil(min_density * mask.numel()) if min_density > 0 else 0
        score = layer.ranking_score()
        available = int((score > float("-inf")).sum())  # not pruned before, not gated off
        min_keep = min(min_keep, available)  # the guard never brings back a pruned weight
        if int(mask.sum()) < min_keep:
            warnings.warn(f"layer {label!r} ({type(layer).__name__}) would keep {int(mask.sum())} of {mask.numel()} "
                          f"weights; min_density={min_density} keeps its {min_keep} best. Pass min_density=0 to "
                          f"allow it.", UserWarning, stacklevel=2)
            mask = top_k_mask(score, min_keep)
        layer.set_mask_(mask)
        densities[name] = layer.density
        if densities[name] == 0.0:
            fix = ("its weights were all pruned before (a fixed mask) and thresholding never brings one back; "
                   "prune it less earlier" if available == 0 and min_density > 0 else
                   "use a milder threshold or min_density > 0 to keep it alive")
            warnings.warn(f"layer {label!r} ({type(layer).__name__}) has no weight left after thresholding; its "
                          f"output is its bias only: {fix}.", UserWarning, stacklevel=2)
        logger.debug("threshold_: %s density %.4f", name, densities[name])
    return densities


def iterative_magnitude_prune_(model: nn.Module, finetune: Callable[[nn.Module, int], None], final_sparsity: float,
                               steps: int, start_sparsity: float = 0.0, scope: str = "layer",
                               min_density: float = DEFAULT_MIN_DENSITY) -> list[dict[str, float]]:
    """Prune in ``steps`` rounds from ``start_sparsity`` to ``final_sparsity``, fine-tuning after each round.

    Each round calls :func:`threshold_` with the cubic :func:`sparsity_schedule` target (ranking
    ``|w|`` for magnitude layers; any method's keep-scores otherwise), then ``finetune(model, step)``
    with the masks fixed.

    Args:
        model: Model with sparse layers (``sparsify(model, method="magnitude")``); changed in place.
        finetune: Called after each pruning round; trains ``model`` (e.g. an epoch of Adam).
        final_sparsity: Target in [0, 1).
        steps: Number of pruning rounds, >= 1.
        start_sparsity: Sparsity of the first round's starting point, in [0, final_sparsity].
        scope, min_density: As in :func:`threshold_`.

    Returns:
        The densities returned by each round's :func:`threshold_`.

    References:
        Han et al. 2015 (iterative pruning and retraining); Zhu and Gupta 2017 (cubic schedule).
    """
    steps = check_positive_int(steps, "steps")
    final_sparsity = check_number(final_sparsity, "final_sparsity", low=0.0, high=1.0)
    if final_sparsity >= 1.0:
        raise ValueError(f"final_sparsity must be in [0, 1), got {final_sparsity}; 1.0 would prune every weight")
    if not callable(finetune):
        raise TypeError(f"finetune must be a callable finetune(model, step), got {type(finetune).__name__}")
    start_sparsity = check_number(start_sparsity, "start_sparsity", low=0.0, high=final_sparsity)
    history = []
    for step in range(1, steps + 1):
        target = sparsity_schedule(step, steps, final_sparsity, start_sparsity)
        history.append(threshold_(model, sparsity=target, scope=scope, min_density=min_density))
        finetune(model, step)
    return history
