"""Learned-threshold pruning (Azarian et al. 2020), a soft mask with a learned threshold per layer: ``"ltp"``.

Training multiplies ``weight`` by ``sigmoid((w^2 - tau) / (T s^2))``, where ``s^2`` is the layer's mean
squared weight when it was built (buffer ``weight_scale2``), so the temperature ``T`` is dimensionless and
one schedule suits every layer. ``tau`` is learned through ``log_tau = log(tau / s^2) / 20``: it stays
positive, and Adam's fixed step size (1e-3) moves it by 2% a step, so the threshold can travel the orders
of magnitude squared weights span within a few epochs. The penalty is ``penalty * sum(soft mask)`` (the
soft L0 norm, strength in units of 1/N). The ``on_epoch_start`` hook lowers ``T`` geometrically from
``temperature`` to ``final_temperature``, hardening the mask towards the step ``w^2 > tau`` used in
evaluation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._validation import check_module, check_number
from .. import functional as BF
from .base import COMMON_OPTIONS, Option, SparseLayer, penalty_alias

__all__ = ["LTP", "LTPConv1d", "LTPConv2d", "LTPConv3d", "LTPLinear", "set_temperature_", "temperature_schedule"]

DEFAULT_LTP_PENALTY = 1e-3
#: Default temperature, relative to the layer's mean squared weight.
DEFAULT_TEMPERATURE = 0.25
#: Default initial threshold, relative to the layer's mean squared weight (the log-scale parameter gets it
#: to useful values within a few hundred steps).
DEFAULT_TAU_INIT = 1e-6
#: ``tau = s^2 exp(LOG_TAU_SCALE * log_tau)``: a preconditioner for the one scalar per layer.
LOG_TAU_SCALE = 20.0


def _positive(v, n):
    return check_number(v, n, low=0.0, low_inclusive=False)


def _optional_positive(v, n):
    return None if v is None else _positive(v, n)


class LTP(SparseLayer):
    """Learned-threshold soft-L0 pruning.

    Options:
        penalty: Soft-L0 penalty strength in units of 1/N, finite and >= 0.
        temperature: Temperature T > 0 of the soft mask at the start of training, relative to the mean
            squared weight (the current value is the attribute ``temperature``).
        final_temperature: Temperature the ``on_epoch_start`` hook anneals to by the last epoch
            (geometrically); ``None`` (default) means ``temperature / 100``.
        tau_init: Initial threshold on ``w^2`` relative to the mean squared weight, > 0. On conversion it is
            lowered below half the smallest non-zero ``w^2`` when needed, so nothing starts pruned and the
            converted layer computes exactly what the dense one did until training moves it.
        warmup: See :data:`bayes_sparse.layers.base.COMMON_OPTIONS`.

    Example:
        >>> LTPLinear(4, 2)(torch.randn(3, 4)).shape
        torch.Size([3, 2])

    References:
        Azarian, Bhalgat, Lee, Blankevoort. Learned Threshold Pruning. 2020.
    """

    method = "ltp"
    options = {
        **COMMON_OPTIONS,
        "penalty": Option(DEFAULT_LTP_PENALTY, lambda v, n: check_number(v, n, low=0.0), "soft-L0 strength, 1/N"),
        "temperature": Option(DEFAULT_TEMPERATURE, _positive, "initial soft-mask temperature"),
        "final_temperature": Option(None, _optional_positive, "temperature at the last epoch (None: T/100)"),
        "tau_init": Option(DEFAULT_TAU_INIT, _positive, "initial threshold relative to the mean squared weight"),
    }
    state_attributes = ("start_temperature",)
    penalty_strength = penalty_alias

    def init_parameters(self) -> None:
        w = self.raw_weight
        self.start_temperature = self.temperature
        if "log_tau" not in self._parameters:
            self.log_tau = nn.Parameter(torch.zeros((), device=w.device, dtype=w.dtype))
            self.register_buffer("weight_scale2", torch.zeros((), device=w.device, dtype=w.dtype))
        with torch.no_grad():
            self.log_tau.fill_(math.log(self.tau_init) / LOG_TAU_SCALE)
        self._set_scale()

    def _set_scale(self) -> None:
        with torch.no_grad():
            w = self.raw_weight
            self.weight_scale2.fill_(float((w * w).mean()) or 1.0)

    def init_from_dense(self) -> None:
        self._set_scale()
        with torch.no_grad():
            w2 = self.raw_weight * self.raw_weight
            smallest = float(w2[w2 > 0].min()) / float(self.weight_scale2) if bool((w2 > 0).any()) else self.tau_init
            self.log_tau.fill_(math.log(min(self.tau_init, 0.5 * smallest)) / LOG_TAU_SCALE)

    @property
    def tau(self) -> Tensor:
        """The learned threshold on ``w^2`` (> 0)."""
        return torch.exp(LOG_TAU_SCALE * self.log_tau) * self.weight_scale2

    def soft_mask(self) -> Tensor:
        return BF.soft_threshold_mask(self.raw_weight, self.tau, self.temperature * self.weight_scale2)

    def keep_score(self) -> Tensor:
        w = self.raw_weight
        return w * w - self.tau

    def criterion_mask(self, threshold: float | None = None) -> Tensor:
        self.check_threshold(threshold, 0.0)
        w = self.raw_weight
        return w * w > self.tau

    def regularizer(self) -> Tensor:
        """``penalty * sum(soft mask)`` over the kept weights (the training forward's soft mask reused)."""
        soft = self._reuse_for_regularizer()
        return self.penalty * self._masked_sum(self.soft_mask() if soft is None else soft)

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Warm-up, and the temperature annealed geometrically from ``temperature`` to ``final_temperature``."""
        super().on_epoch_start(epoch, epochs)
        end = self.final_temperature if self.final_temperature is not None else self.start_temperature / 100
        self.temperature = temperature_schedule(epoch, epochs, self.start_temperature, end)

    def set_options_(self, **options) -> "LTP":
        super().set_options_(**options)
        if "temperature" in options:
            self.start_temperature = self.temperature
        return self

    def sample_weight(self) -> Tensor:
        soft = self.soft_mask()
        self._keep_for_regularizer(soft)
        return self._train_weight() * soft


LTPLinear = LTP[nn.Linear]
LTPConv1d = LTP[nn.Conv1d]
LTPConv2d = LTP[nn.Conv2d]
LTPConv3d = LTP[nn.Conv3d]


def set_temperature_(model: nn.Module, temperature: float) -> nn.Module:
    """Set the current soft-mask temperature of every LTP layer in ``model`` (in place); returns ``model``.

    Training loops that call :func:`bayes_sparse.on_epoch_start` get the annealing without this.
    """
    check_module(model)
    temperature = check_number(temperature, "temperature", low=0.0, low_inclusive=False,
                               hint="Lower temperatures give harder masks; the default starts at 0.25.")
    for m in model.modules():
        if isinstance(m, LTP):
            m.temperature = temperature
    return model


def temperature_schedule(epoch: int, epochs: int, start: float = DEFAULT_TEMPERATURE,
                         end: float = DEFAULT_TEMPERATURE / 100) -> float:
    """Geometric annealing from ``start`` at epoch 0 to ``end`` at the last epoch (hardening the mask)."""
    start = check_number(start, "start", low=0.0, low_inclusive=False)
    end = check_number(end, "end", low=0.0, low_inclusive=False)
    frac = min(1.0, max(0.0, epoch / max(1, epochs - 1)))
    return math.exp(math.log(start) + frac * (math.log(end) - math.log(start)))
