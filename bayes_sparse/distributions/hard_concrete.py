"""The hard-concrete distribution (Louizos, Welling, Kingma 2018) as a Pyro distribution."""

from __future__ import annotations

from typing import Optional

import math

import torch
import torch.nn.functional as F
from pyro.distributions.torch_distribution import TorchDistribution
from torch import Tensor
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all

from .. import functional as BF

__all__ = ["HardConcrete"]


class HardConcrete(TorchDistribution):
    """Stretched, clamped binary concrete: a gate in [0, 1] with point masses at exactly 0 and 1.

    Args:
        log_alpha: Location (real).
        beta: Temperature (> 0), default 2/3.
        gamma: Lower stretch bound (< 0), default -0.1.
        zeta: Upper stretch bound (> 1), default 1.1.

    ``log_prob`` is taken with respect to Lebesgue measure on (0, 1) plus unit atoms at 0 and 1: it is the log
    density inside (0, 1), ``log P(Z=0)`` at 0 and ``log P(Z=1)`` at 1.

    Example:
        >>> d = HardConcrete(torch.zeros(3))
        >>> d.rsample((2,)).shape
        torch.Size([2, 3])

    References:
        Louizos, Welling, Kingma. Learning Sparse Neural Networks through L0 Regularization. ICLR 2018.
    """

    arg_constraints = {"log_alpha": constraints.real}
    support = constraints.unit_interval
    has_rsample = True

    def __init__(self, log_alpha: Tensor, beta: float = BF.HC_BETA, gamma: float = BF.HC_GAMMA,
                 zeta: float = BF.HC_ZETA, validate_args: Optional[bool] = None) -> None:
        if not (beta > 0 and gamma < 0 and zeta > 1):
            raise ValueError(f"HardConcrete needs beta > 0, gamma < 0 < 1 < zeta; got beta={beta}, gamma={gamma}, "
                             f"zeta={zeta}")
        (self.log_alpha,) = broadcast_all(log_alpha)
        self.beta, self.gamma, self.zeta = float(beta), float(gamma), float(zeta)
        super().__init__(self.log_alpha.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):  # noqa: ANN001, ANN201
        new = self._get_checked_instance(HardConcrete, _instance)
        new.log_alpha = self.log_alpha.expand(torch.Size(batch_shape))
        new.beta, new.gamma, new.zeta = self.beta, self.gamma, self.zeta
        super(HardConcrete, new).__init__(torch.Size(batch_shape), validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        u = torch.rand(shape, dtype=self.log_alpha.dtype, device=self.log_alpha.device)
        return BF.hard_concrete_sample(self.log_alpha.expand(shape), u, self.beta, self.gamma, self.zeta)

    @property
    def prob_nonzero(self) -> Tensor:
        """P(Z != 0), whose sum over gates is the expected L0 norm."""
        return BF.hard_concrete_prob_nonzero(self.log_alpha, self.beta, self.gamma, self.zeta)

    @property
    def prob_one(self) -> Tensor:
        """P(Z = 1)."""
        return 1 - torch.sigmoid(BF._hc_cdf_logit(torch.ones_like(self.log_alpha), self.log_alpha, self.beta,
                                                  self.gamma, self.zeta))

    def cdf(self, value: Tensor) -> Tensor:
        return BF.hard_concrete_cdf(value, self.log_alpha, self.beta, self.gamma, self.zeta)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        dens = BF.hard_concrete_log_density(value, self.log_alpha, self.beta, self.gamma, self.zeta)
        at0 = F.logsigmoid(self.beta * math.log(-self.gamma / self.zeta) - self.log_alpha).expand_as(dens)
        one = torch.ones_like(self.log_alpha)
        at1 = F.logsigmoid(-BF._hc_cdf_logit(one, self.log_alpha, self.beta, self.gamma, self.zeta)).expand_as(dens)
        return torch.where(value <= 0, at0, torch.where(value >= 1, at1, dens))
