"""Magnitude pruning (Han et al. 2015): the baseline every comparison needs.

The layers train like plain torch layers (no penalty); thresholding ranks ``|w|``. Their own criterion is
Han's per-layer threshold ``|w| > quality * std(w)``; most uses give a target sparsity instead, one-shot
(``threshold_(model, sparsity=0.9)``) or iteratively with fine-tuning between steps
(:func:`bayes_sparse.iterative_magnitude_prune_`).
"""

from __future__ import annotations

from torch import Tensor, nn

from .._validation import check_number
from .base import HyperparameterState, SparseLayer

__all__ = ["MagnitudeConv1d", "MagnitudeConv2d", "MagnitudeConv3d", "MagnitudeLinear"]

DEFAULT_QUALITY = 1.0


class _MagnitudeLayer(HyperparameterState, SparseLayer):
    hyperparameters = ("quality",)
    method = "magnitude"
    criterion_in_eval = False

    def _init_method_parameters(self) -> None:
        self.quality = DEFAULT_QUALITY

    @classmethod
    def from_dense(cls, layer: nn.Module, *, quality: float = DEFAULT_QUALITY) -> "_MagnitudeLayer":
        """Build the layer from a trained torch layer; ``quality`` (>= 0) sets Han's criterion.

        References:
            Han, Pool, Tran, Dally. Learning both Weights and Connections for Efficient Neural Networks. 2015.
        """
        new = cls._copy_from_dense(layer)
        new.quality = check_number(quality, "quality", low=0.0)
        return new

    def keep_score(self) -> Tensor:
        return self.weight.abs()

    def criterion_mask(self, threshold: float | None = None) -> Tensor:
        t = self.quality * float(self.weight.detach().std()) if threshold is None else threshold
        return self.weight.abs() > t

    def regularizer(self) -> Tensor:
        return self.weight.new_zeros(())


class MagnitudeLinear(_MagnitudeLayer, nn.Linear):
    """Drop-in ``nn.Linear`` for magnitude pruning.

    Example:
        >>> MagnitudeLinear(4, 2)(torch.randn(3, 4)).shape
        torch.Size([3, 2])
    """


class MagnitudeConv1d(_MagnitudeLayer, nn.Conv1d):
    """Drop-in ``nn.Conv1d`` for magnitude pruning."""


class MagnitudeConv2d(_MagnitudeLayer, nn.Conv2d):
    """Drop-in ``nn.Conv2d`` for magnitude pruning."""


class MagnitudeConv3d(_MagnitudeLayer, nn.Conv3d):
    """Drop-in ``nn.Conv3d`` for magnitude pruning."""
