"""Sparse Variational Dropout (Molchanov, Ashukha, Vetrov 2017): the method ``"vd"``.

Each weight has a Gaussian posterior ``N(theta, alpha theta^2)`` parameterized additively by ``theta``
(the layer's ``weight``) and ``log_sigma2``; ``log alpha = log sigma^2 - log theta^2`` is clipped to
[-8, 8]. Training uses the local reparameterization trick; evaluation uses ``theta`` masked where
``log alpha >= 3`` (or the mask fixed by :func:`bayes_sparse.threshold_`). The KL to the log-uniform
prior, read with :func:`bayes_sparse.kl`, enters the ELBO.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as BF
from .._validation import check_number
from .base import COMMON_OPTIONS, Option, SparseLayer

__all__ = ["DEFAULT_LOG_ALPHA_THRESHOLD", "INIT_LOG_SIGMA2", "VD", "VDConv1d", "VDConv2d", "VDConv3d", "VDLinear",
           "cap_initial_log_alpha_"]

#: Weights with log alpha at or above this value are pruned (official code and paper).
DEFAULT_LOG_ALPHA_THRESHOLD = 3.0
#: Initial value of log sigma^2 (official code).
INIT_LOG_SIGMA2 = -10.0


def _check_alpha_cap(value, name):
    if value is None:
        return None
    return check_number(value, name, low=-BF.LOG_ALPHA_CLIP, high=DEFAULT_LOG_ALPHA_THRESHOLD - 1e-3,
                        hint="It must stay below the pruning threshold 3, or be None for no cap.")


def cap_initial_log_alpha_(log_sigma2: Tensor, weight: Tensor, log_alpha_max: Optional[float]) -> None:
    """Lower ``log_sigma2`` in place where the weight's log alpha would exceed ``log_alpha_max`` (``None``: no cap),
    so that no converted weight starts near pruning."""
    if log_alpha_max is None:
        return
    with torch.no_grad():
        torch.minimum(log_sigma2, torch.log(weight * weight + BF._THETA2_EPS) + log_alpha_max, out=log_sigma2)


class VD(SparseLayer):
    """Sparse Variational Dropout: a per-weight Gaussian posterior with a learned dropout rate alpha.

    Options:
        init_log_sigma2: Initial log variance (-10, the official recipe), a finite number.
        init_log_alpha_max: On conversion (:meth:`from_dense`), log sigma^2 is lowered for the smallest
            weights so that no weight starts with log alpha above this (default 0, a dropout rate of at most
            1/2): nothing starts pruned and the converted layer computes exactly what the dense one did.
            ``None`` keeps ``init_log_sigma2`` everywhere. In [-8, 3). The cap is meant for converting a
            *trained* network. For training from scratch (``sparsify`` of a freshly built net) the paper starts
            every weight at log sigma^2 = -10 uncapped: pass ``init_log_alpha_max=None``, or ``2.99`` to keep
            every weight just below the pruning threshold (what ``benchmarks/configs`` use). With the default
            cap a from-scratch LeNet-300-100 run reached 36x instead of 56x (200 epochs, same seed).
        warmup: See :data:`bayes_sparse.layers.base.COMMON_OPTIONS`.

    ``threshold_(model, threshold=t)`` (alias ``log_alpha=t``) prunes where ``log alpha >= t`` (t >= 0).

    Example:
        >>> layer = VDLinear(784, 300)
        >>> layer(torch.randn(2, 784)).shape
        torch.Size([2, 300])
        >>> dense = nn.Linear(3, 2)
        >>> torch.equal(VDLinear.from_dense(dense).eval()(torch.ones(1, 3)), dense(torch.ones(1, 3)))
        True

    References:
        Molchanov, Ashukha, Vetrov. Variational Dropout Sparsifies Deep Neural Networks. ICML 2017.
    """

    method = "vd"
    bayesian = True
    threshold_name = "log_alpha"
    threshold_low = 0.0
    options = {
        **COMMON_OPTIONS,
        "init_log_sigma2": Option(INIT_LOG_SIGMA2, partial(check_number), "initial log sigma^2"),
        "init_log_alpha_max": Option(0.0, _check_alpha_cap, "cap on the initial log alpha after conversion"),
    }

    def init_parameters(self) -> None:
        w = self.raw_weight
        if "log_sigma2" not in self._parameters:
            self.log_sigma2 = nn.Parameter(torch.empty_like(w))
        with torch.no_grad():
            self.log_sigma2.fill_(self.init_log_sigma2)

    def init_from_dense(self) -> None:
        with torch.no_grad():
            self.log_sigma2.fill_(self.init_log_sigma2)
        cap_initial_log_alpha_(self.log_sigma2, self.raw_weight, self.init_log_alpha_max)

    @property
    def log_alpha(self) -> Tensor:
        """Clipped log dropout rate per weight."""
        return BF.log_alpha(self.raw_weight, self.log_sigma2)

    def keep_score(self) -> Tensor:
        return -self.log_alpha

    def criterion_mask(self, threshold: float | None = None) -> Tensor:
        return self.log_alpha < self.check_threshold(threshold, DEFAULT_LOG_ALPHA_THRESHOLD)

    def posterior_std(self) -> Tensor:
        """Posterior standard deviation ``sqrt(alpha) |theta|`` per weight (detached)."""
        with torch.no_grad():
            return (torch.exp(0.5 * self.log_alpha) * self.raw_weight.abs()).detach()

    def regularizer(self) -> Tensor:
        """KL(q || log-uniform prior) of the kept weights (pruned weights are fixed at 0 and carry none).

        A training forward computes this sum in the same fused pass as its noise variance
        (:func:`~bayes_sparse.functional.vd_weight_stats`); the next call here takes it from there while the
        parameters are unchanged, so a step pays for the per-weight maths once.
        """
        cached = self._reuse_for_regularizer()
        if cached is not None:
            return cached
        mask = self.weight_mask if self.mask_fixed else None
        return BF.vd_weight_stats(self.raw_weight, self.log_sigma2, mask)[1]


    def sample_weight(self) -> Tensor:
        """``theta + sqrt(alpha) |theta| eps``: one draw of the whole weight (readers outside ``forward``)."""
        w = self._train_weight()
        return w + torch.exp(0.5 * self.log_alpha) * w.abs() * torch.randn_like(w)

    def _forward_train(self, x: Tensor) -> Tensor:
        """Local reparameterization: ``N(op(x, theta) + b, op(x^2, alpha theta^2))``, the per-weight maths fused."""
        w = self._train_weight()
        var_w, kl, _ = BF.vd_weight_stats(w, self.log_sigma2, self.weight_mask if self.mask_fixed else None)
        self._keep_for_regularizer(kl)
        mean = self._affine(x, w, self.bias)
        var = self._affine(x * x, var_w, None) + BF.VAR_EPS
        return mean + var.sqrt() * torch.randn_like(mean)


VDLinear = VD[nn.Linear]
VDConv1d = VD[nn.Conv1d]
VDConv2d = VD[nn.Conv2d]
VDConv3d = VD[nn.Conv3d]
