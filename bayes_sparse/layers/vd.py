"""Sparse Variational Dropout layers (Molchanov, Ashukha, Vetrov 2017).

Each weight has a Gaussian posterior ``N(theta, alpha theta^2)`` parameterized additively by ``theta``
(the layer's ``weight``) and ``log_sigma2``; ``log alpha = log sigma^2 - log theta^2`` is clipped to
[-8, 8]. Training uses the local reparameterization trick; evaluation uses ``theta`` masked where
``log alpha >= 3`` (or the mask fixed by :func:`bayes_sparse.threshold_`). The KL to the log-uniform
prior, read with :func:`bayes_sparse.kl`, enters the ELBO.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional as BF
from .._validation import check_number
from .base import SparseLayer

__all__ = ["DEFAULT_LOG_ALPHA_THRESHOLD", "INIT_LOG_SIGMA2", "VDConv1d", "VDConv2d", "VDConv3d", "VDLinear"]

#: Weights with log alpha at or above this value are pruned (official code and paper).
DEFAULT_LOG_ALPHA_THRESHOLD = 3.0
#: Initial value of log sigma^2 (official code).
INIT_LOG_SIGMA2 = -10.0


class _VDLayer(SparseLayer):
    """Implementation shared by every Sparse VD layer; the torch base class supplies the operation."""

    method = "vd"
    bayesian = True

    def _init_method_parameters(self) -> None:
        self.log_sigma2 = nn.Parameter(torch.full_like(self.weight, INIT_LOG_SIGMA2))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if "log_sigma2" in self._parameters:
            with torch.no_grad():
                self.log_sigma2.fill_(INIT_LOG_SIGMA2)

    @classmethod
    def from_dense(cls, layer: nn.Module, *, init_log_sigma2: float = INIT_LOG_SIGMA2,
                   init_log_alpha_max: float | None = 0.0) -> "_VDLayer":
        """Build the Sparse VD layer from a trained torch layer, copying ``weight`` and ``bias``.

        ``log sigma^2`` starts at ``init_log_sigma2`` (-10, the official recipe), lowered for the smallest
        weights so that no weight starts with ``log alpha`` above ``init_log_alpha_max`` (default 0, a
        dropout rate of at most 1/2). So nothing starts pruned and, until training moves it, the layer in
        eval computes exactly what ``layer`` did. ``init_log_alpha_max=None`` keeps -10 everywhere.

        Args:
            layer: A plain torch layer of this class's :attr:`dense_type`.
            init_log_sigma2: Initial log variance, a finite number.
            init_log_alpha_max: Cap on the initial log alpha, in [-8, 3), or ``None`` for no cap.

        Raises:
            TypeError: wrong layer type.
            ValueError: inconsistent layer shapes or option values out of range.

        Example:
            >>> dense = nn.Linear(3, 2)
            >>> torch.equal(VDLinear.from_dense(dense).eval()(torch.ones(1, 3)), dense(torch.ones(1, 3)))
            True
        """
        init_log_sigma2 = check_number(init_log_sigma2, "init_log_sigma2")
        if init_log_alpha_max is not None:
            init_log_alpha_max = check_number(init_log_alpha_max, "init_log_alpha_max", low=-BF.LOG_ALPHA_CLIP,
                                              high=DEFAULT_LOG_ALPHA_THRESHOLD - 1e-3,
                                              hint="It must stay below the pruning threshold 3.")
        new = cls._copy_from_dense(layer)
        with torch.no_grad():
            new.log_sigma2.fill_(init_log_sigma2)
            if init_log_alpha_max is not None:
                cap = torch.log(new.weight * new.weight + BF._THETA2_EPS) + init_log_alpha_max
                torch.minimum(new.log_sigma2, cap, out=new.log_sigma2)
        return new

    @property
    def log_alpha(self) -> Tensor:
        """Clipped log dropout rate per weight."""
        return BF.log_alpha(self.weight, self.log_sigma2)

    def keep_score(self) -> Tensor:
        return -self.log_alpha

    def posterior_std(self) -> Tensor:
        """Posterior standard deviation ``sqrt(alpha) |theta|`` per weight (detached)."""
        with torch.no_grad():
            return (torch.exp(0.5 * self.log_alpha) * self.weight.abs()).detach()

    def criterion_mask(self, threshold: float | None = None) -> Tensor:
        t = DEFAULT_LOG_ALPHA_THRESHOLD if threshold is None else threshold
        return self.log_alpha < t

    def regularizer(self) -> Tensor:
        """KL(q || log-uniform prior) of the kept weights (pruned weights are fixed at 0 and carry none)."""
        return self._masked_sum(BF.kl_log_uniform(self.log_alpha))

    def _forward_train(self, x: Tensor) -> Tensor:
        return BF.local_reparam(x, self._train_weight(), self.log_alpha, self.bias, self._affine)


class VDLinear(_VDLayer, nn.Linear):
    """Drop-in ``nn.Linear`` with Sparse Variational Dropout; same constructor arguments.

    Example:
        >>> layer = VDLinear(784, 300)
        >>> layer(torch.randn(2, 784)).shape
        torch.Size([2, 300])

    References:
        Molchanov, Ashukha, Vetrov. Variational Dropout Sparsifies Deep Neural Networks. ICML 2017.
    """


class VDConv1d(_VDLayer, nn.Conv1d):
    """Drop-in ``nn.Conv1d`` with Sparse Variational Dropout (see :class:`VDLinear`)."""


class VDConv2d(_VDLayer, nn.Conv2d):
    """Drop-in ``nn.Conv2d`` with Sparse Variational Dropout (see :class:`VDLinear`).

    Example:
        >>> VDConv2d(1, 20, 5)(torch.randn(1, 1, 28, 28)).shape
        torch.Size([1, 20, 24, 24])
    """


class VDConv3d(_VDLayer, nn.Conv3d):
    """Drop-in ``nn.Conv3d`` with Sparse Variational Dropout (see :class:`VDLinear`)."""
