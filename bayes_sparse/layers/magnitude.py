"""Magnitude pruning (Han et al. 2015), the baseline every comparison needs: the method ``"magnitude"``.

The layers train like plain torch layers (no penalty); thresholding ranks ``|w|``. Their own criterion is
Han's per-layer threshold ``|w| > quality * std(w)``, or the option ``target_sparsity`` when set; most
uses give a target sparsity, one-shot
(``threshold_(model, sparsity=0.9)``), iteratively through the ``on_epoch_start`` hook (option
``target_sparsity``: Zhu and Gupta's cubic schedule in ``rounds`` rounds between ``prune_start`` and
``prune_end``, fine-tuning in between), or with :func:`bayes_sparse.iterative_magnitude_prune_`.
The schedule prunes each layer to the target (``scope="layer"``) or ranks ``|w|`` over all the model's
magnitude layers together (``scope="global"``, Gale et al. 2019: small layers such as a classifier are not
forced to the same sparsity as the big ones, which is what a tuned magnitude baseline does).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from .._validation import check_number, check_positive_int
from .base import COMMON_OPTIONS, Option, SparseLayer, global_top_k_masks, top_k_mask

__all__ = ["SCOPES", "Magnitude", "MagnitudeConv1d", "MagnitudeConv2d", "MagnitudeConv3d", "MagnitudeLinear",
           "pruning_rounds", "sparsity_schedule"]

DEFAULT_QUALITY = 1.0
#: Least density a layer keeps in a global round (as ``threshold_``'s default ``min_density``).
MIN_DENSITY = 1e-3


def sparsity_schedule(step: int, steps: int, final: float, start: float = 0.0) -> float:
    """Cubic schedule of Zhu and Gupta (2017): ``final + (start - final)(1 - step/steps)^3`` for step 1..steps."""
    steps = check_positive_int(steps, "steps")
    frac = min(1.0, max(0.0, step / steps))
    return final + (start - final) * (1.0 - frac) ** 3


def pruning_rounds(epochs: int, target: float, rounds: int, start: float, end: float) -> dict[int, float]:
    """``{epoch: sparsity}`` of iterative pruning: ``rounds`` rounds evenly from ``start`` to before ``end``
    (fractions of ``epochs``), each to the cubic schedule's target."""
    first, last = int(start * epochs), int(end * epochs)
    out: dict[int, float] = {}
    for k in range(1, rounds + 1):  # evenly spread over [first, last); rounds that fall on one epoch: the last wins
        out[min(epochs - 1, first + ((k - 1) * (last - first)) // rounds)] = sparsity_schedule(k, rounds, target)
    return out


def _check_target(v, n):
    if v is None:
        return None
    v = check_number(v, n, low=0.0, high=1.0, hint="It is the final fraction of weights pruned, e.g. 0.95.")
    if v >= 1.0:
        raise ValueError(f"{n} must be in [0, 1), got {v}; 1.0 would prune every weight")
    return v


SCOPES = ("layer", "global")


def _check_scope(v, n):
    if v not in SCOPES:
        raise ValueError(f"{n} must be 'layer' (each layer pruned to the target) or 'global' (one ranking of |w| "
                         f"over all the model's magnitude layers), got {v!r}")
    return str(v)


class Magnitude(SparseLayer):
    """Magnitude pruning.

    Options:
        quality: Han's criterion ``|w| > quality * std(w)``, >= 0 (``threshold_(model, threshold=t)``
            prunes ``|w| <= t`` instead).
        target_sparsity: Final sparsity of iterative pruning run by ``on_epoch_start``, in [0, 1), or
            ``None`` (default) for no schedule.
        rounds: Number of pruning rounds (>= 1).
        prune_start, prune_end: The rounds lie between these fractions of the epochs (default: the second
            half of training, dense before).
        scope: ``"layer"`` (default): each round prunes every layer to the schedule's sparsity; ``"global"``:
            each round ranks ``|w|`` over all the model's magnitude layers with ``scope="global"`` together
            (they must share ``target_sparsity``, ``rounds``, ``prune_start`` and ``prune_end``), run by
            :func:`bayes_sparse.on_epoch_start`.
        warmup: See :data:`bayes_sparse.layers.base.COMMON_OPTIONS` (no effect: no regularizer).

    Example:
        >>> MagnitudeLinear(4, 2)(torch.randn(3, 4)).shape
        torch.Size([3, 2])

    References:
        Han, Pool, Tran, Dally. Learning both Weights and Connections for Efficient Neural Networks. 2015.
        Zhu, Gupta. To prune, or not to prune. 2017 (cubic schedule).
    """

    method = "magnitude"
    criterion_in_eval = False
    threshold_name = "magnitude"
    threshold_low = 0.0
    options = {
        **COMMON_OPTIONS,
        "quality": Option(DEFAULT_QUALITY, lambda v, n: check_number(v, n, low=0.0), "Han's quality parameter"),
        "target_sparsity": Option(None, _check_target, "final sparsity of the iterative schedule"),
        "rounds": Option(4, lambda v, n: check_positive_int(v, n), "pruning rounds"),
        "prune_start": Option(0.5, lambda v, n: check_number(v, n, low=0.0, high=1.0), "first round (fraction)"),
        "prune_end": Option(1.0, lambda v, n: check_number(v, n, low=0.0, high=1.0), "rounds end (fraction)"),
        "scope": Option("layer", _check_scope, "'layer': per-layer rounds; 'global': one ranking over layers"),
    }

    #: ``global_sparsity``: the sparsity the last global round pruned to (None before the first).
    state_attributes = ("global_sparsity",)

    def init_parameters(self) -> None:
        self.global_sparsity = None

    def keep_score(self) -> Tensor:
        return self.raw_weight.abs()

    def criterion_mask(self, threshold: float | None = None) -> Tensor:
        """``|w| > threshold``; by default the ``target_sparsity`` when one is set (the schedule's end point),
        else Han's ``|w| > quality * std(w)``."""
        w = self.raw_weight
        if threshold is not None:
            return w.abs() > self.check_threshold(threshold, 0.0)
        if self.target_sparsity is not None and self.scope == "global":
            if self.global_sparsity is None or self.global_sparsity < self.target_sparsity or not self.mask_fixed:
                done = "has not pruned yet" if self.global_sparsity is None else \
                    f"stopped at sparsity {self.global_sparsity:.4g} before its last round"
                raise ValueError(f"the global magnitude schedule (target_sparsity={self.target_sparsity}) {done}, "
                                 "and its criterion needs the whole model; train all the epochs the schedule was "
                                 "given through bayes_sparse.on_epoch_start (fit_svi does), or threshold with "
                                 "threshold_(model, sparsity=..., scope='global')")
            return self.weight_mask.clone()  # what the global rounds kept
        if self.target_sparsity is not None:
            score = self.ranking_score()
            return top_k_mask(score, score.numel() - round(self.target_sparsity * score.numel()))
        return w.abs() > self.quality * w.detach().std()  # a tensor: no host synchronization on a GPU

    def regularizer(self) -> Tensor:
        return self.raw_weight.new_zeros(())

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Prune to the schedule's sparsity at the round epochs (when ``target_sparsity`` is set)."""
        super().on_epoch_start(epoch, epochs)
        if self.target_sparsity is None or self.scope == "global":
            return
        rounds = pruning_rounds(epochs, self.target_sparsity, self.rounds, self.prune_start, self.prune_end)
        if epoch in rounds:
            self.prune_to_(rounds[epoch])

    @classmethod
    def on_epoch_start_model(cls, layers, epoch: int, epochs: int) -> None:
        """The global rounds: at a round epoch, keep the schedule's fraction of the highest ``|w|`` of all
        layers with ``scope="global"`` ranked together (weights pruned before stay pruned). Every layer keeps at
        least its ``MIN_DENSITY`` share of its best weights still available (a layer of small weights is not
        cut off whole), so the total may keep a few more than the fraction."""
        group = [(n, l) for n, l in layers if l.scope == "global" and l.target_sparsity is not None]
        if not group:
            return
        keys = {(l.target_sparsity, l.rounds, l.prune_start, l.prune_end) for _, l in group}
        if len(keys) > 1:
            raise ValueError("magnitude layers with scope='global' must share target_sparsity, rounds, prune_start "
                             f"and prune_end to be ranked together; got {sorted(keys)} on "
                             f"{[n or type(l).__name__ for n, l in group]}. Give them the same options")
        target, rounds, start, end = keys.pop()
        schedule = pruning_rounds(epochs, target, rounds, start, end)
        if epoch in schedule:
            scores = [l.ranking_score() for _, l in group]
            for (_, layer), score, mask in zip(group, scores, global_top_k_masks(scores, schedule[epoch])):
                available = score > float("-inf")
                floor = min(math.ceil(MIN_DENSITY * score.numel()), int(available.sum()))
                if int(mask.sum()) < floor:
                    mask = top_k_mask(score, floor)
                layer.set_mask_(mask & available)
                layer.global_sparsity = schedule[epoch]


MagnitudeLinear = Magnitude[nn.Linear]
MagnitudeConv1d = Magnitude[nn.Conv1d]
MagnitudeConv2d = Magnitude[nn.Conv2d]
MagnitudeConv3d = Magnitude[nn.Conv3d]
