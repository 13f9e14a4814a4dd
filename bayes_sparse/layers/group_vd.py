"""Bayesian group variational dropout, one multiplicative scale per output unit: the method ``"group_vd"``.

Each output neuron / output channel ``j`` has a scale ``z_j ~ N(theta_j, alpha_j theta_j^2)`` multiplying its
pre-activation, ``h_j = z_j (W_j x + b_j)``, with a log-uniform prior on ``z_j``: the group variational dropout
of Bayesian Compression (Louizos, Ullrich, Welling 2017) with its log-uniform scale prior (their
"Normal-Jeffreys" model). The KL per unit is then exactly Sparse VD's (Molchanov et al. 2017 approximation,
:func:`~bayes_sparse.functional.kl_log_uniform` of ``log alpha_j``), so the method fits the same ELBO
machinery (``bayesian = True``: read by :func:`bayes_sparse.kl`, trained by :class:`bayes_sparse.SVIModel`).
Chosen over the horseshoe variant of the same paper because it is simpler (two parameters per unit, no
hierarchy) and shares Sparse VD's prior, KL and pruning rule (``log alpha >= 3``).

Training samples ``z`` per example and unit (the local reparameterization at unit level:
``out = (W x + b) * (theta + sqrt(alpha) |theta| eps)``, one ``eps`` per example and unit; for a convolution
one per example and channel). Evaluation multiplies by ``theta`` and removes units with
``log alpha_z >= 3`` (or the mask fixed by :func:`bayes_sparse.threshold_`), bias included. With
``per_weight=True`` the weights also carry Sparse VD's per-weight posterior (``log_sigma2`` per weight, the
local reparameterization of the weights, the KL of both levels summed, a weight pruned where either its own
or its unit's log alpha reaches the threshold).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as BF
from .._validation import check_number
from . import _units as U
from .base import COMMON_OPTIONS, Option, SparseLayer
from .vd import DEFAULT_LOG_ALPHA_THRESHOLD, INIT_LOG_SIGMA2, _check_alpha_cap, cap_initial_log_alpha_

__all__ = ["GroupVD", "GroupVDConv1d", "GroupVDConv2d", "GroupVDConv3d", "GroupVDLinear", "INIT_LOG_ALPHA_Z"]

#: Initial log alpha of the unit scales (theta_z starts at 1, so log sigma_z^2 starts here too): a dropout
#: rate of 0.25%, low enough that a converted model starts almost deterministic, and inside the clip range
#: [-8, 8] (below it the clipped log alpha would give the KL no gradient).
INIT_LOG_ALPHA_Z = -6.0


def _check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


class GroupVD(SparseLayer):
    """Group variational dropout: a Gaussian multiplicative scale per output unit, log-uniform prior.

    Options:
        per_weight: Also put Sparse VD's per-weight posterior on the weights (default False). Fixed at
            construction (it decides whether the layer has a per-weight ``log_sigma2``).
        init_log_alpha_z: Initial log alpha of the unit scales, in [-8, 3) (default -6).
        init_log_sigma2: ``per_weight`` only: initial per-weight log sigma^2 (Sparse VD's -10).
        init_log_alpha_max: ``per_weight`` only: cap on the initial per-weight log alpha after conversion,
            as in Sparse VD (default 0); ``None`` for no cap.
        warmup: See :data:`bayes_sparse.layers.base.COMMON_OPTIONS`.

    Parameters: ``theta_z`` (one per output unit, starts at 1), ``log_sigma2_z`` (starts at
    ``init_log_alpha_z``), and with ``per_weight`` a ``log_sigma2`` per weight. ``threshold_(model,
    threshold=t)`` (alias ``log_alpha=t``) removes units (and, with ``per_weight``, weights) whose log alpha
    is ``>= t`` (t >= 0).

    Example:
        >>> layer = GroupVDLinear(784, 300)
        >>> layer(torch.randn(2, 784)).shape, layer.theta_z.shape
        (torch.Size([2, 300]), torch.Size([300]))

    References:
        Louizos, Ullrich, Welling. Bayesian Compression for Deep Learning. NeurIPS 2017.
        Molchanov, Ashukha, Vetrov. Variational Dropout Sparsifies Deep Neural Networks. ICML 2017.
    """

    method = "group_vd"
    prefix = "GroupVD"
    bayesian = True
    threshold_name = "log_alpha"
    threshold_low = 0.0
    options = {
        **COMMON_OPTIONS,
        "per_weight": Option(False, _check_bool, "also a Sparse VD posterior per weight"),
        "init_log_alpha_z": Option(INIT_LOG_ALPHA_Z, lambda v, n: check_number(
            v, n, low=-BF.LOG_ALPHA_CLIP, high=DEFAULT_LOG_ALPHA_THRESHOLD - 1e-3,
            hint="It must stay below the pruning threshold 3."), "initial log alpha of the unit scales"),
        "init_log_sigma2": Option(INIT_LOG_SIGMA2, check_number, "per_weight: initial per-weight log sigma^2"),
        "init_log_alpha_max": Option(0.0, _check_alpha_cap, "per_weight: cap on the initial log alpha"),
    }

    def init_parameters(self) -> None:
        w = self.raw_weight
        n = w.shape[0]
        if "theta_z" not in self._parameters:
            self.theta_z = nn.Parameter(torch.empty(n, device=w.device, dtype=w.dtype))
            self.log_sigma2_z = nn.Parameter(torch.empty(n, device=w.device, dtype=w.dtype))
        if self.per_weight and "log_sigma2" not in self._parameters:
            self.log_sigma2 = nn.Parameter(torch.empty_like(w))
        with torch.no_grad():
            self.theta_z.fill_(1.0)
            self.log_sigma2_z.fill_(self.init_log_alpha_z)
            if self.per_weight:
                self.log_sigma2.fill_(self.init_log_sigma2)

    def init_from_dense(self) -> None:
        self.init_parameters()
        if self.per_weight:
            cap_initial_log_alpha_(self.log_sigma2, self.raw_weight, self.init_log_alpha_max)

    @property
    def log_alpha_z(self) -> Tensor:
        """Clipped log dropout rate per unit."""
        return BF.log_alpha(self.theta_z, self.log_sigma2_z)

    @property
    def log_alpha(self) -> Tensor:
        """Per weight: the larger of its unit's log alpha and (``per_weight``) its own."""
        la = U.to_weight(self, self.log_alpha_z, "out")
        if self.per_weight:
            la = torch.maximum(la, BF.log_alpha(self.raw_weight, self.log_sigma2))
        return la

    def keep_score(self) -> Tensor:
        return -self.log_alpha

    def criterion_mask(self, threshold: Optional[float] = None) -> Tensor:
        return self.log_alpha < self.check_threshold(threshold, DEFAULT_LOG_ALPHA_THRESHOLD)

    def masked_weight(self) -> Tensor:
        """``theta_z`` folded into the rows, with the hard mask applied."""
        w = self.raw_weight
        return w * U.to_weight(self, self.theta_z, "out").to(w.dtype) * self.hard_mask().to(w.dtype)

    def masked_bias(self) -> Optional[Tensor]:
        """The bias times ``theta_z``, 0 for a unit none of whose weights is kept."""
        b = getattr(self, "bias", None)
        if b is None:
            return None
        alive = U.unit_alive(self, self.hard_mask(), "out")
        return b * self.theta_z.to(b.dtype) * alive.to(b.dtype)

    def posterior_std(self) -> Tensor:
        """Posterior standard deviation of each effective weight ``z_j w_ij`` (detached)."""
        with torch.no_grad():
            w = self.raw_weight
            var_z = U.to_weight(self, torch.exp(self.log_alpha_z) * self.theta_z ** 2, "out")
            mean_z = U.to_weight(self, self.theta_z, "out")
            if not self.per_weight:
                return (var_z.sqrt() * w.abs()).detach()
            var_w = torch.exp(BF.log_alpha(w, self.log_sigma2)) * w * w
            return (var_z * (w * w + var_w) + mean_z ** 2 * var_w).sqrt().detach()

    def _unit_kl(self) -> Tensor:
        kl = BF.kl_log_uniform(self.log_alpha_z)
        if self.mask_fixed:  # a removed unit is fixed at 0 and carries no KL
            kl = kl * U.unit_alive(self, self.weight_mask, "out").to(kl.dtype)
        return kl.sum()

    def regularizer(self) -> Tensor:
        """KL(q || log-uniform) of the unit scales (kept units), plus, with ``per_weight``, of the kept weights."""
        kl = self._unit_kl()
        if self.per_weight:
            kl = kl + BF.vd_weight_stats(self.raw_weight, self.log_sigma2,
                                         self.weight_mask if self.mask_fixed else None)[1]
        return kl

    def _train_bias(self) -> Optional[Tensor]:
        b = getattr(self, "bias", None)
        if b is None or not self.mask_fixed:
            return b
        return b * U.unit_alive(self, self.weight_mask, "out").to(b.dtype)

    def _sample_z(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """Scales ``theta + sqrt(alpha) |theta| eps``, one per entry of ``shape`` (per example and unit)."""
        theta = U.channel_view(self.theta_z, like, self)
        std = U.channel_view(torch.exp(0.5 * self.log_alpha_z) * self.theta_z.abs(), like, self)
        return theta + std * torch.randn(shape, device=like.device, dtype=like.dtype)

    def sample_weight(self) -> Tensor:
        """One draw of the whole weight (one scale per unit for the batch; with ``per_weight`` weight noise too)."""
        w = self._train_weight()
        if self.per_weight:
            w = w + torch.exp(0.5 * BF.log_alpha(w, self.log_sigma2)) * w.abs() * torch.randn_like(w)
        z = self.theta_z + torch.exp(0.5 * self.log_alpha_z) * self.theta_z.abs() * torch.randn_like(self.theta_z)
        return w * U.to_weight(self, z, "out").to(w.dtype)

    def _forward_train(self, x: Tensor) -> Tensor:
        """``(W x + b) * z`` with ``z`` drawn per example and unit; with ``per_weight``, ``W x`` drawn by the
        local reparameterization of Sparse VD first."""
        w, b = self._train_weight(), self._train_bias()
        h = self._affine(x, w, b)
        if self.per_weight:
            var_w = BF.vd_weight_stats(w, self.log_sigma2, self.weight_mask if self.mask_fixed else None)[0]
            var = self._affine(x * x, var_w, None) + BF.VAR_EPS
            h = h + var.sqrt() * torch.randn_like(h)
        return h * self._sample_z(U.per_example(self.theta_z, h, self), h)


GroupVDLinear = GroupVD[nn.Linear]
GroupVDConv1d = GroupVD[nn.Conv1d]
GroupVDConv2d = GroupVD[nn.Conv2d]
GroupVDConv3d = GroupVD[nn.Conv3d]
