"""Magnitude pruning (Han et al. 2015), the baseline every comparison needs: the method ``"magnitude"``.

The layers train like plain torch layers (no penalty); thresholding ranks ``|w|``. Their own criterion is
Han's per-layer threshold ``|w| > quality * std(w)``, or the option ``target_sparsity`` when set; most
uses give a target sparsity, one-shot
(``threshold_(model, sparsity=0.9)``), iteratively through the ``on_epoch_start`` hook (option
``target_sparsity``: Zhu and Gupta's cubic schedule in ``rounds`` rounds between ``prune_start`` and
``prune_end``, fine-tuning in between), or with :func:`bayes_sparse.iterative_magnitude_prune_`.
"""

from __future__ import annotations

from torch import Tensor, nn

from .._validation import check_number, check_positive_int
from .base import COMMON_OPTIONS, Option, SparseLayer, top_k_mask

__all__ = ["Magnitude", "MagnitudeConv1d", "MagnitudeConv2d", "MagnitudeConv3d", "MagnitudeLinear",
           "pruning_rounds", "sparsity_schedule"]

DEFAULT_QUALITY = 1.0


def sparsity_schedule(step: int, steps: int, final: float, start: float = 0.0) -> float:
    """Cubic schedule of Zhu and Gupta (2017): ``final + (start - final)(1 - step/steps)^3`` for step 1..steps."""
    steps = check_positive_int(steps, "steps")
    frac = min(1.0, max(0.0, step / steps))
    return final + (start - final) * (1.0 - frac) ** 3


def pruning_rounds(epochs: int, target: float, rounds: int, start: float, end: float) -> dict[int, float]:
    """``{epoch: sparsity}`` of iterative pruning: ``rounds`` rounds evenly from ``start`` to before ``end``
    (fractions of ``epochs``), each to the cubic schedule's target."""
    first, last = int(start * epochs), int(end * epochs)
    span = max(1, (last - first) // rounds)
    return {min(epochs - 1, first + (k - 1) * span): sparsity_schedule(k, rounds, target) for k in range(1, rounds + 1)}


def _check_target(v, n):
    if v is None:
        return None
    v = check_number(v, n, low=0.0, high=1.0, hint="It is the final fraction of weights pruned, e.g. 0.95.")
    if v >= 1.0:
        raise ValueError(f"{n} must be in [0, 1), got {v}; 1.0 would prune every weight")
    return v


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
    }

    def keep_score(self) -> Tensor:
        return self.raw_weight.abs()

    def criterion_mask(self, threshold: float | None = None) -> Tensor:
        """``|w| > threshold``; by default the ``target_sparsity`` when one is set (the schedule's end point),
        else Han's ``|w| > quality * std(w)``."""
        w = self.raw_weight
        if threshold is not None:
            return w.abs() > self.check_threshold(threshold, 0.0)
        if self.target_sparsity is not None:
            score = self.ranking_score()
            return top_k_mask(score, score.numel() - round(self.target_sparsity * score.numel()))
        return w.abs() > self.quality * w.detach().std()  # a tensor: no host synchronization on a GPU

    def regularizer(self) -> Tensor:
        return self.raw_weight.new_zeros(())

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Prune to the schedule's sparsity at the round epochs (when ``target_sparsity`` is set)."""
        super().on_epoch_start(epoch, epochs)
        if self.target_sparsity is None:
            return
        rounds = pruning_rounds(epochs, self.target_sparsity, self.rounds, self.prune_start, self.prune_end)
        if epoch in rounds:
            self.prune_to_(rounds[epoch])


MagnitudeLinear = Magnitude[nn.Linear]
MagnitudeConv1d = Magnitude[nn.Conv1d]
MagnitudeConv2d = Magnitude[nn.Conv2d]
MagnitudeConv3d = Magnitude[nn.Conv3d]
