"""Learned-threshold pruning layers (Azarian et al. 2020): a soft mask with a learned threshold per layer.

Training multiplies ``weight`` by ``sigmoid((w^2 - tau) / (T s^2))``, where ``s^2`` is the layer's mean
squared weight when it was built (buffer ``weight_scale2``), so the temperature ``T`` is dimensionless and
one schedule suits every layer. ``tau`` is learned through ``log_tau = log(tau / s^2) / 20``: it stays
positive, and Adam's fixed step size (1e-3) moves it by 2% a step, so the threshold can travel the orders
of magnitude squared weights span within a few epochs. The penalty is ``penalty_strength * sum(soft mask)`` (the soft L0 norm, strength
in units of 1/N). Lowering ``T`` during training (:func:`set_temperature_`, :func:`temperature_schedule`)
hardens the mask towards the step ``w^2 > tau`` used in evaluation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import functional as BF
from .._validation import check_module, check_number
from .base import HyperparameterState, SparseLayer

__all__ = ["LTPConv1d", "LTPConv2d", "LTPConv3d", "LTPLinear", "set_temperature_", "temperature_schedule"]

DEFAULT_LTP_PENALTY = 1e-3
#: Default temperature, relative to the layer's mean squared weight.
DEFAULT_TEMPERATURE = 0.25
#: Default initial threshold, relative to the layer's mean squared weight (the log-scale parameter gets it
#: to useful values within a few hundred steps).
DEFAULT_TAU_INIT = 1e-6
#: ``tau = s^2 exp(LOG_TAU_SCALE * log_tau)``: a preconditioner for the one scalar per layer.
LOG_TAU_SCALE = 20.0


class _LTPLayer(HyperparameterState, SparseLayer):
    hyperparameters = ("penalty_strength", "temperature")
    method = "ltp"

    def _init_method_parameters(self) -> None:
        self.penalty_strength = DEFAULT_LTP_PENALTY
        self.temperature = DEFAULT_TEMPERATURE
        self.log_tau = nn.Parameter(torch.full((), math.log(DEFAULT_TAU_INIT) / LOG_TAU_SCALE, device=self.weight.device,
                                               dtype=self.weight.dtype))
        self.register_buffer("weight_scale2", torch.zeros((), device=self.weight.device, dtype=self.weight.dtype))
        self._set_scale()

    def _set_scale(self) -> None:
        with torch.no_grad():
            self.weight_scale2.fill_(float((self.weight * self.weight).mean()) or 1.0)

    @property
    def tau(self) -> Tensor:
        """The learned threshold on ``w^2`` (> 0)."""
        return torch.exp(LOG_TAU_SCALE * self.log_tau) * self.weight_scale2

    @classmethod
    def from_dense(cls, layer: nn.Module, *, penalty: float = DEFAULT_LTP_PENALTY,
                   temperature: float = DEFAULT_TEMPERATURE, tau_init: float = DEFAULT_TAU_INIT) -> "_LTPLayer":
        """Build the LTP layer from a trained torch layer.

        Args:
            layer: A plain torch layer of this class's :attr:`dense_type`.
            penalty: Soft-L0 penalty strength in units of 1/N, finite and >= 0.
            temperature: Initial temperature T > 0 of the soft mask, relative to the mean squared weight.
            tau_init: Initial threshold on ``w^2`` relative to the mean squared weight, > 0. It is lowered
                below half the smallest non-zero ``w^2`` when needed, so nothing starts pruned and the
                converted layer computes exactly what ``layer`` did until training moves it.

        References:
            Azarian, Bhalgat, Lee, Blankevoort. Learned Threshold Pruning. 2020.
        """
        penalty = check_number(penalty, "penalty", low=0.0)
        temperature = check_number(temperature, "temperature", low=0.0, low_inclusive=False)
        tau_init = check_number(tau_init, "tau_init", low=0.0, low_inclusive=False)
        new = cls._copy_from_dense(layer)
        new._set_scale()
        new.penalty_strength, new.temperature = penalty, temperature
        with torch.no_grad():
            w2 = new.weight * new.weight
            smallest = float(w2[w2 > 0].min()) / float(new.weight_scale2) if bool((w2 > 0).any()) else tau_init
            new.log_tau.fill_(math.log(min(tau_init, 0.5 * smallest)) / LOG_TAU_SCALE)
        return new

    def soft_mask(self) -> Tensor:
        return BF.soft_threshold_mask(self.weight, self.tau, self.temperature * self.weight_scale2)

    def keep_score(self) -> Tensor:
        return self.weight * self.weight - self.tau

    def criterion_mask(self, threshold: float | None = None) -> Tensor:
        if threshold is not None:
            raise ValueError(f"LTP layers prune at their learned threshold and take no other (got {threshold}); "
                             "use threshold_(model) or threshold_(model, sparsity=...)")
        return self.weight * self.weight > self.tau

    def regularizer(self) -> Tensor:
        return self.penalty_strength * self._masked_sum(self.soft_mask())

    def _forward_train(self, x: Tensor) -> Tensor:
        return self._affine(x, self._train_weight() * self.soft_mask(), self.bias)


class LTPLinear(_LTPLayer, nn.Linear):
    """Drop-in ``nn.Linear`` with learned-threshold soft-L0 pruning.

    Example:
        >>> LTPLinear(4, 2)(torch.randn(3, 4)).shape
        torch.Size([3, 2])

    References:
        Azarian, Bhalgat, Lee, Blankevoort. Learned Threshold Pruning. 2020.
    """


class LTPConv1d(_LTPLayer, nn.Conv1d):
    """Drop-in ``nn.Conv1d`` with learned-threshold pruning (see :class:`LTPLinear`)."""


class LTPConv2d(_LTPLayer, nn.Conv2d):
    """Drop-in ``nn.Conv2d`` with learned-threshold pruning (see :class:`LTPLinear`)."""


class LTPConv3d(_LTPLayer, nn.Conv3d):
    """Drop-in ``nn.Conv3d`` with learned-threshold pruning (see :class:`LTPLinear`)."""


def set_temperature_(model: nn.Module, temperature: float) -> nn.Module:
    """Set the soft-mask temperature of every LTP layer in ``model`` (in place); returns ``model``."""
    check_module(model)
    temperature = check_number(temperature, "temperature", low=0.0, low_inclusive=False,
                               hint="Lower temperatures give harder masks; the default starts at 0.25.")
    for m in model.modules():
        if isinstance(m, _LTPLayer):
            m.temperature = temperature
    return model


def temperature_schedule(epoch: int, epochs: int, start: float = DEFAULT_TEMPERATURE,
                         end: float = DEFAULT_TEMPERATURE / 100) -> float:
    """Geometric annealing from ``start`` at epoch 0 to ``end`` at the last epoch (hardening the mask)."""
    start = check_number(start, "start", low=0.0, low_inclusive=False)
    end = check_number(end, "end", low=0.0, low_inclusive=False)
    frac = min(1.0, max(0.0, epoch / max(1, epochs - 1)))
    return math.exp(math.log(start) + frac * (math.log(end) - math.log(start)))
