"""Hard-concrete L0 layers (Louizos, Welling, Kingma 2018): one stochastic gate per weight.

Training multiplies ``weight`` by gates drawn from :class:`~bayes_sparse.distributions.HardConcrete`
(reparameterized); the penalty is ``penalty_strength * E[L0] = penalty_strength * sum P(gate != 0)``,
with the strength in units of 1/N (the paper uses 0.1/N on MNIST: ``penalty_strength=0.1``). Evaluation
uses the deterministic test-time gate ``clamp(sigmoid(log_alpha)(zeta - gamma) + gamma, 0, 1)``, which is
exactly 0 for pruned weights.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import functional as BF
from .._validation import check_number
from ..distributions import HardConcrete
from .base import HyperparameterState, SparseLayer

__all__ = ["L0Conv1d", "L0Conv2d", "L0Conv3d", "L0Linear"]

#: Default penalty strength in units of 1/N (paper: lambda = 0.1 / N on MNIST).
DEFAULT_L0_PENALTY = 0.1
#: Default initial drop rate p (log_alpha = log((1 - p) / p)); the paper uses 0.2 on an MLP's input layer.
DEFAULT_DROPRATE_INIT = 0.5


class _L0Layer(HyperparameterState, SparseLayer):
    hyperparameters = ("penalty_strength",)
    method = "l0"

    def _init_method_parameters(self) -> None:
        self.penalty_strength = DEFAULT_L0_PENALTY
        self.log_alpha = nn.Parameter(torch.empty_like(self.weight))
        self._reset_log_alpha(DEFAULT_DROPRATE_INIT)

    def _reset_log_alpha(self, droprate: float) -> None:
        with torch.no_grad():
            self.log_alpha.fill_(math.log((1 - droprate) / droprate))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if "log_alpha" in self._parameters:
            self._reset_log_alpha(DEFAULT_DROPRATE_INIT)

    @classmethod
    def from_dense(cls, layer: nn.Module, *, penalty: float = DEFAULT_L0_PENALTY,
                   droprate_init: float = DEFAULT_DROPRATE_INIT) -> "_L0Layer":
        """Build the L0 layer from a trained torch layer.

        The weight is stored divided by the initial test-time gate (x2 at the default drop rate 0.5), so in
        eval the converted layer computes exactly what ``layer`` did, and in training the gated weight has
        about the pretrained scale.

        Args:
            layer: A plain torch layer of this class's :attr:`dense_type`.
            penalty: Strength of the expected-L0 penalty in units of 1/N, finite and >= 0.
            droprate_init: Initial gate drop rate p in (0, 1); log_alpha starts at log((1 - p) / p).

        References:
            Louizos, Welling, Kingma. Learning Sparse Neural Networks through L0 Regularization. ICLR 2018.
        """
        penalty = check_number(penalty, "penalty", low=0.0, hint="The paper uses 0.1 (i.e. 0.1/N).")
        droprate_init = check_number(droprate_init, "droprate_init", low=1e-6, high=1 - 1e-6)
        new = cls._copy_from_dense(layer)
        new.penalty_strength = penalty
        new._reset_log_alpha(droprate_init)
        with torch.no_grad():
            new.weight.div_(BF.hard_concrete_test_gate(new.log_alpha))
        return new

    def gates(self) -> HardConcrete:
        """The gates' distribution."""
        return HardConcrete(self.log_alpha)

    def keep_score(self) -> Tensor:
        """log alpha, and -inf where the test-time gate is exactly 0 (such a weight cannot be kept)."""
        return self.log_alpha.masked_fill(~self.criterion_mask(), float("-inf"))

    def criterion_mask(self, threshold: float | None = None) -> Tensor:
        if threshold is not None:
            raise ValueError(f"L0 layers prune where the test-time gate is 0 and take no threshold (got {threshold}); "
                             "use threshold_(model) or threshold_(model, sparsity=...)")
        return BF.hard_concrete_test_gate(self.log_alpha) > 0

    def hard_mask(self) -> Tensor:
        """The fixed mask, and never a weight whose test-time gate is 0."""
        mask = super().hard_mask()
        return mask & self.criterion_mask() if bool(self.mask_fixed) else mask

    def masked_weight(self) -> Tensor:
        return self.weight * BF.hard_concrete_test_gate(self.log_alpha) * self.hard_mask().to(self.weight.dtype)

    def regularizer(self) -> Tensor:
        return self.penalty_strength * self._masked_sum(BF.hard_concrete_prob_nonzero(self.log_alpha))

    def _forward_train(self, x: Tensor) -> Tensor:
        return self._affine(x, self._train_weight() * self.gates().rsample(), self.bias)


class L0Linear(_L0Layer, nn.Linear):
    """Drop-in ``nn.Linear`` with a hard-concrete L0 gate per weight.

    Example:
        >>> L0Linear(784, 300)(torch.randn(2, 784)).shape
        torch.Size([2, 300])

    References:
        Louizos, Welling, Kingma. Learning Sparse Neural Networks through L0 Regularization. ICLR 2018.
    """


class L0Conv1d(_L0Layer, nn.Conv1d):
    """Drop-in ``nn.Conv1d`` with hard-concrete L0 gates (see :class:`L0Linear`)."""


class L0Conv2d(_L0Layer, nn.Conv2d):
    """Drop-in ``nn.Conv2d`` with hard-concrete L0 gates (see :class:`L0Linear`)."""


class L0Conv3d(_L0Layer, nn.Conv3d):
    """Drop-in ``nn.Conv3d`` with hard-concrete L0 gates (see :class:`L0Linear`)."""
