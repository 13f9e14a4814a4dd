"""Group L0: one hard-concrete gate per unit (Louizos, Welling, Kingma 2018): the method ``"group_l0"``.

The structured variant of :mod:`~bayes_sparse.layers.l0`: a gate per output neuron / output channel
(``unit="out"``, the default; it multiplies the unit's weight row *and* its bias, so a removed unit outputs
exactly 0 before the activation) or per input feature / input channel (``unit="in"``: it multiplies the
weight columns; use it on a network's first layer, as the paper gates the input pixels).

Training draws one gate per example and unit (the paper's local sampling: ``h = (W x + b) * z`` with
``z[n, j] ~ HardConcrete(log_alpha_j)``; for a convolution one gate per example and channel, shared over
the positions). The penalty is the paper's group L0, each group counted by its size:
``penalty * sum_j |g_j| P(z_j != 0)``, where ``|g_j|`` is the number of weights of unit ``j`` (its row, or
for ``unit="in"`` the weights reading input ``j``; once thresholded, the ones still kept), so the
penalty is the expected number of non-zero weights, on the same scale as ``l0``'s (units of 1/N).
Evaluation uses the deterministic test-time gate, exactly 0 for removed units.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as BF
from .._validation import check_number
from ..distributions import HardConcrete
from . import _units as U
from .base import COMMON_OPTIONS, Option, SparseLayer, penalty_alias
from .l0 import DEFAULT_L0_PENALTY, L0

__all__ = ["GroupL0", "GroupL0Conv1d", "GroupL0Conv2d", "GroupL0Conv3d", "GroupL0Linear"]


class GroupL0(SparseLayer):
    """Hard-concrete L0 gates, one per unit (output neuron/channel, or input feature/channel).

    Options:
        unit: ``"out"`` (default: a gate per output neuron/channel, gating its weight row and bias) or
            ``"in"`` (a gate per input feature/channel, gating the weight columns).
        penalty: Strength of the group expected-L0 penalty in units of 1/N, finite and >= 0 (paper: 0.1).
        droprate_init: Initial gate drop rate p in (0, 1); log_alpha starts at log((1 - p) / p).
        weight_decay: Strength of the gated (expected) L2 penalty, units of 1/N like ``penalty``, finite and
            >= 0 (default 0: none). The regularizer adds ``weight_decay / 2 * sum_j P(z_j != 0) ||theta_j||^2``
            over each unit's weights (Louizos et al. 2018, Sec. 2.4: the L2 norm under the gates), so a unit's
            expected cost grows with its weights' size. Their code's weight decay 5e-4 per example is
            ``weight_decay = 5e-4 * N`` here (30 for MNIST's 60k).
        warmup: See :data:`bayes_sparse.layers.base.COMMON_OPTIONS`.

    ``log_alpha`` has one entry per unit. On conversion the weight (and, for ``unit="out"``, the bias) is
    stored divided by the initial test-time gate, so the converted layer computes what the dense one did.
    The mask (``criterion_mask``, ``weight_mask``) stays per weight, broadcast from the units, so
    :func:`bayes_sparse.threshold_` works unchanged; a unit none of whose weights is kept is removed with
    its bias. Group L0 prunes where the test-time gate is 0 and takes no threshold.

    Example:
        >>> layer = GroupL0Linear(784, 300, penalty=0.1)
        >>> layer(torch.randn(2, 784)).shape, layer.log_alpha.shape
        (torch.Size([2, 300]), torch.Size([300]))

    References:
        Louizos, Welling, Kingma. Learning Sparse Neural Networks through L0 Regularization. ICLR 2018
        (Sec. 4.1: group sparsity, neurons and convolutional feature maps).
    """

    method = "group_l0"
    prefix = "GroupL0"
    options = {
        **COMMON_OPTIONS,
        "unit": Option("out", U.check_unit, "'out': a gate per output neuron/channel; 'in': per input"),
        "penalty": Option(DEFAULT_L0_PENALTY,
                          lambda v, n: check_number(v, n, low=0.0, hint="The paper uses 0.1 (i.e. 0.1/N)."),
                          "group expected-L0 penalty strength (per weight of a group), units of 1/N"),
        "droprate_init": L0.options["droprate_init"],
        "weight_decay": Option(0.0, lambda v, n: check_number(v, n, low=0.0, hint="Use 0 for no L2 penalty."),
                               "gated expected-L2 penalty strength, units of 1/N"),
    }
    penalty_strength = penalty_alias

    def init_parameters(self) -> None:
        w = self.raw_weight
        n = U.num_units(self, self.unit)
        if "log_alpha" not in self._parameters or self.log_alpha.numel() != n:
            self.log_alpha = nn.Parameter(torch.empty(n, device=w.device, dtype=w.dtype))
        with torch.no_grad():
            self.log_alpha.fill_(math.log((1 - self.droprate_init) / self.droprate_init))

    def init_from_dense(self) -> None:
        with torch.no_grad():
            gate = self.test_gates()
            self.raw_weight.div_(U.to_weight(self, gate, self.unit))
            if self.unit == "out" and getattr(self, "bias", None) is not None:
                self.bias.div_(gate)

    def gates(self) -> HardConcrete:
        """The gates' distribution (one per unit)."""
        return HardConcrete(self.log_alpha)

    def test_gates(self) -> Tensor:
        """Deterministic test-time gate per unit, ``clamp(sigmoid(log_alpha)(zeta - gamma) + gamma, 0, 1)``."""
        return BF.hard_concrete_test_gate(self.log_alpha)

    def keep_score(self) -> Tensor:
        """The unit's log alpha for each of its weights, and -inf where its test-time gate is 0."""
        score = U.to_weight(self, self.log_alpha, self.unit)
        return score.masked_fill(~self.criterion_mask(), float("-inf"))

    def criterion_mask(self, threshold: Optional[float] = None) -> Tensor:
        """Per-weight mask: the weights of the units whose test-time gate is not 0."""
        self.check_threshold(threshold, 0.0)
        return U.to_weight(self, self.test_gates() > 0, self.unit)

    def hard_mask(self) -> Tensor:
        """The fixed mask, and never a weight of a unit whose test-time gate is 0."""
        mask = super().hard_mask()
        return mask & self.criterion_mask() if self.mask_fixed else mask

    def masked_weight(self) -> Tensor:
        w = self.raw_weight
        return w * U.to_weight(self, self.test_gates(), self.unit).to(w.dtype) * self.hard_mask().to(w.dtype)

    def masked_bias(self) -> Optional[Tensor]:
        """``unit="out"``: the bias times the test-time gate, 0 for a unit with no kept weight; else the bias."""
        b = getattr(self, "bias", None)
        if b is None or self.unit != "out":
            return b
        alive = U.unit_alive(self, self.hard_mask(), "out")
        return b * self.test_gates().to(b.dtype) * alive.to(b.dtype)

    def regularizer(self) -> Tensor:
        """``penalty * sum_j |g_j| P(z_j != 0)``: the expected number of non-zero weights (kept ones only),
        plus ``weight_decay / 2 * sum_j P(z_j != 0) ||theta_j||^2`` when ``weight_decay`` is set."""
        p = BF.hard_concrete_prob_nonzero(self.log_alpha)
        if self.mask_fixed:
            sizes = U.reduce_to_units(self, self.weight_mask.to(p.dtype), self.unit)
        else:
            w = self.raw_weight
            sizes = torch.full_like(p, w.numel() / p.numel())
        reg = self.penalty * (sizes * p).sum()
        if self.weight_decay:
            w = self._train_weight()
            reg = reg + 0.5 * self.weight_decay * (U.reduce_to_units(self, w * w, self.unit).to(p.dtype) * p).sum()
        return reg

    def _train_bias(self) -> Optional[Tensor]:
        """The bias in training: a unit the fixed mask removed entirely has no bias either."""
        b = getattr(self, "bias", None)
        if b is None or not self.mask_fixed or self.unit != "out":
            return b
        return b * U.unit_alive(self, self.weight_mask, "out").to(b.dtype)

    def sample_weight(self) -> Tensor:
        """One draw of the gates (one per unit, for the whole batch) applied to the weight."""
        z = BF.hard_concrete_sample(self.log_alpha)
        w = self._train_weight()
        return w * U.to_weight(self, z, self.unit).to(w.dtype)

    def _forward_train(self, x: Tensor) -> Tensor:
        """Gates drawn per example and unit: ``(W x + b) * z`` (``unit="out"``) or ``W (x * z) + b`` (``"in"``)."""
        w, b = self._train_weight(), self._train_bias()
        la = self.log_alpha
        if self.unit == "out":
            h = self._affine(x, w, b)
            la = U.channel_view(la, h, self).expand(U.per_example(la, h, self))
            return h * BF.hard_concrete_sample(la).to(h.dtype)
        la = U.channel_view(la, x, self).expand(U.per_example(la, x, self))
        return self._affine(x * BF.hard_concrete_sample(la).to(x.dtype), w, b)


GroupL0Linear = GroupL0[nn.Linear]
GroupL0Conv1d = GroupL0[nn.Conv1d]
GroupL0Conv2d = GroupL0[nn.Conv2d]
GroupL0Conv3d = GroupL0[nn.Conv3d]
