"""Hard-concrete L0 gates (Louizos, Welling, Kingma 2018), one stochastic gate per weight: the method ``"l0"``.

Training multiplies ``weight`` by gates drawn from :class:`~bayes_sparse.distributions.HardConcrete`
(reparameterized); the penalty is ``penalty * E[L0] = penalty * sum P(gate != 0)``, with the strength in
units of 1/N (the paper uses 0.1/N on MNIST: ``penalty=0.1``). Evaluation uses the deterministic test-time
gate ``clamp(sigmoid(log_alpha)(zeta - gamma) + gamma, 0, 1)``, which is exactly 0 for pruned weights;
``layer.weight`` reads the gated weight in every mode.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import functional as BF
from .._validation import check_number
from ..distributions import HardConcrete
from .base import COMMON_OPTIONS, Option, SparseLayer, penalty_alias

__all__ = ["L0", "L0Conv1d", "L0Conv2d", "L0Conv3d", "L0Linear"]

#: Default penalty strength in units of 1/N (paper: lambda = 0.1 / N on MNIST).
DEFAULT_L0_PENALTY = 0.1
#: Default initial drop rate p (log_alpha = log((1 - p) / p)); the paper uses 0.2 on an MLP's input layer.
DEFAULT_DROPRATE_INIT = 0.5


class L0(SparseLayer):
    """Hard-concrete L0 gates, one per weight.

    Options:
        penalty: Strength of the expected-L0 penalty in units of 1/N, finite and >= 0 (paper: 0.1).
        droprate_init: Initial gate drop rate p in (0, 1); log_alpha starts at log((1 - p) / p).
        warmup: See :data:`bayes_sparse.layers.base.COMMON_OPTIONS`.

    On conversion the weight is stored divided by the initial test-time gate (x2 at the default drop rate
    0.5), so the converted layer computes exactly what the dense one did, and ``weight`` (the gated view)
    equals the original weight. L0 prunes where the test-time gate is 0 and takes no threshold.

    Example:
        >>> L0Linear(784, 300)(torch.randn(2, 784)).shape
        torch.Size([2, 300])

    References:
        Louizos, Welling, Kingma. Learning Sparse Neural Networks through L0 Regularization. ICLR 2018.
    """

    method = "l0"
    options = {
        **COMMON_OPTIONS,
        "penalty": Option(DEFAULT_L0_PENALTY,
                          lambda v, n: check_number(v, n, low=0.0, hint="The paper uses 0.1 (i.e. 0.1/N)."),
                          "expected-L0 penalty strength, units of 1/N"),
        "droprate_init": Option(DEFAULT_DROPRATE_INIT, lambda v, n: check_number(v, n, low=1e-6, high=1 - 1e-6),
                                "initial gate drop rate"),
    }
    penalty_strength = penalty_alias

    def init_parameters(self) -> None:
        if "log_alpha" not in self._parameters:
            self.log_alpha = nn.Parameter(torch.empty_like(self.raw_weight))
        with torch.no_grad():
            self.log_alpha.fill_(math.log((1 - self.droprate_init) / self.droprate_init))

    def init_from_dense(self) -> None:
        with torch.no_grad():
            self.raw_weight.div_(BF.hard_concrete_test_gate(self.log_alpha))

    def gates(self) -> HardConcrete:
        """The gates' distribution."""
        return HardConcrete(self.log_alpha)

    def keep_score(self) -> Tensor:
        """log alpha, and -inf where the test-time gate is exactly 0 (such a weight cannot be kept)."""
        return self.log_alpha.masked_fill(~self.criterion_mask(), float("-inf"))

    def criterion_mask(self, threshold: float | None = None) -> Tensor:
        self.check_threshold(threshold, 0.0)
        return BF.hard_concrete_test_gate(self.log_alpha) > 0

    def hard_mask(self) -> Tensor:
        """The fixed mask, and never a weight whose test-time gate is 0."""
        mask = super().hard_mask()
        return mask & self.criterion_mask() if self.mask_fixed else mask

    def masked_weight(self) -> Tensor:
        w = self.raw_weight
        return w * BF.hard_concrete_test_gate(self.log_alpha) * self.hard_mask().to(w.dtype)

    def regularizer(self) -> Tensor:
        """``penalty * sum P(gate != 0)`` over the kept weights; a training forward computes the sum in the same
        fused pass as its gates, and the next call here takes it while the parameters are unchanged."""
        cached = self._reuse_for_regularizer()
        if cached is not None:
            return self.penalty * cached
        return self.penalty * self._masked_sum(BF.hard_concrete_prob_nonzero(self.log_alpha))

    def sample_weight(self) -> Tensor:
        weight, l0 = BF.hard_concrete_weight(self._train_weight(), self.log_alpha,
                                             self.weight_mask if self.mask_fixed else None)
        self._keep_for_regularizer(l0)
        return weight


L0Linear = L0[nn.Linear]
L0Conv1d = L0[nn.Conv1d]
L0Conv2d = L0[nn.Conv2d]
L0Conv3d = L0[nn.Conv3d]
