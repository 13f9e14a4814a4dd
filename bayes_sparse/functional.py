"""Pure maths shared by the sparse layers: no state, no modules.

Everything here is a plain function of tensors, differentiable where the maths is, and safe to
``torch.autograd.gradcheck`` in float64.

References:
    Molchanov, Ashukha, Vetrov. "Variational Dropout Sparsifies Deep Neural Networks", ICML 2017.
    Kingma, Salimans, Welling. "Variational Dropout and the Local Reparameterization Trick", NeurIPS 2015.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _fusedkernel

__all__ = [
    "HC_BETA",
    "HC_GAMMA",
    "HC_ZETA",
    "KL_K1",
    "KL_K2",
    "KL_K3",
    "LOG_ALPHA_CLIP",
    "conv_nd",
    "hard_concrete_cdf",
    "hard_concrete_gates",
    "hard_concrete_log_density",
    "hard_concrete_prob_nonzero",
    "hard_concrete_sample",
    "hard_concrete_test_gate",
    "hard_concrete_weight",
    "kl_log_uniform",
    "l1_norm",
    "local_reparam",
    "local_reparam_moments",
    "log_alpha",
    "soft_threshold",
    "soft_threshold_mask",
    "vd_weight_stats",
]

#: Constants of the Molchanov et al. (2017) approximation of -KL(q || log-uniform).
KL_K1 = 0.63576
KL_K2 = 1.87320
KL_K3 = 1.48695
#: log alpha is clipped to this range, as in the official SparseVD code.
LOG_ALPHA_CLIP = 8.0
#: Added to the output variance of the local reparameterization (official code) so the std is finite.
VAR_EPS = 1e-8
#: Added to theta^2 inside the log so a zero weight gives a large, finite log alpha.
_THETA2_EPS = 1e-16

#: Hard-concrete constants of Louizos, Welling, Kingma (2018): temperature and stretch interval.
HC_BETA = 2.0 / 3.0
HC_GAMMA = -0.1
HC_ZETA = 1.1

AffineOp = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]


def log_alpha(theta: Tensor, log_sigma2: Tensor, clip: float = LOG_ALPHA_CLIP) -> Tensor:
    """Log dropout rate from the additive parameterization.

    ``log alpha = log sigma^2 - log theta^2``, clipped to ``[-clip, clip]``.

    Args:
        theta: Weight means.
        log_sigma2: Log variances of the additive noise, same shape as ``theta``.
        clip: Symmetric clipping bound (the official code uses 8).

    Returns:
        Tensor of the same shape as ``theta``.

    Example:
        >>> log_alpha(torch.ones(2), torch.zeros(2))
        tensor([0., 0.])

    References:
        Molchanov et al. 2017, Section 4.2 (additive reparameterization).
    """
    return torch.clamp(log_sigma2 - torch.log(theta * theta + _THETA2_EPS), -clip, clip)


def kl_log_uniform(log_alpha: Tensor) -> Tensor:
    """Approximate KL(N(theta, alpha theta^2) || log-uniform) per weight, up to an additive constant.

    ``KL ~= k1 - k1 sigmoid(k2 + k3 log alpha) + 0.5 log1p(exp(-log alpha))``. The constant is chosen so
    that the KL tends to 0 as alpha tends to infinity; it is non-negative and decreasing in log alpha.

    Args:
        log_alpha: Log dropout rates (any shape).

    Returns:
        Element-wise KL, same shape as ``log_alpha``; sum it for the layer's KL.

    Example:
        >>> float(kl_log_uniform(torch.tensor(8.0))) < 1e-3
        True

    References:
        Molchanov et al. 2017, Eq. 14.
    """
    return KL_K1 - KL_K1 * torch.sigmoid(KL_K2 + KL_K3 * log_alpha) + 0.5 * F.softplus(-log_alpha)


def local_reparam_moments(
    x: Tensor, theta: Tensor, log_alpha: Tensor, bias: Optional[Tensor], op: AffineOp
) -> tuple[Tensor, Tensor]:
    """Mean and variance of a layer's pre-activations under Gaussian multiplicative weight noise.

    With ``w ~ N(theta, alpha theta^2)`` independent per weight and ``op`` linear in its weight argument
    (``F.linear`` or a convolution), the output is Gaussian with mean ``op(x, theta) + bias`` and variance
    ``op(x^2, alpha theta^2) + 1e-8``.

    Args:
        x: Input batch.
        theta: Weight means.
        log_alpha: Log dropout rates, same shape as ``theta``.
        bias: Optional bias (deterministic).
        op: ``op(x, weight, bias)``, e.g. ``F.linear`` or :func:`conv_nd` with bound arguments.

    Returns:
        ``(mean, variance)``, each shaped like the layer output.

    References:
        Kingma, Salimans, Welling 2015 (local reparameterization trick).
    """
    mean = op(x, theta, bias)
    var = op(x * x, torch.exp(log_alpha) * theta * theta, None) + VAR_EPS
    return mean, var


def local_reparam(
    x: Tensor,
    theta: Tensor,
    log_alpha: Tensor,
    bias: Optional[Tensor],
    op: AffineOp,
    eps: Optional[Tensor] = None,
) -> Tensor:
    """One sample of the pre-activations by the local reparameterization trick.

    Args:
        x: Input batch.
        theta: Weight means.
        log_alpha: Log dropout rates, same shape as ``theta``.
        bias: Optional bias.
        op: ``op(x, weight, bias)``, linear in ``weight``.
        eps: Standard normal noise shaped like the output; drawn with ``torch.randn_like`` when omitted.

    Returns:
        ``mean + sqrt(var) * eps``.

    Example:
        >>> x, theta = torch.randn(4, 3), torch.randn(2, 3)
        >>> local_reparam(x, theta, torch.full_like(theta, -8.0), None, F.linear).shape
        torch.Size([4, 2])
    """
    mean, var = local_reparam_moments(x, theta, log_alpha, bias, op)
    if eps is None:
        eps = torch.randn_like(mean)
    return mean + var.sqrt() * eps


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_nd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[int, str, Sequence[int]] = 0,
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
) -> Tensor:
    """N-d convolution (1, 2 or 3 spatial dims) picked from the weight's rank; zero padding only.

    Bind the geometry with ``functools.partial`` to use it as the ``op`` of :func:`local_reparam`.
    """
    nd = weight.dim() - 2
    if nd not in _CONV:
        raise ValueError(f"conv_nd supports 1-3 spatial dims; got a weight of shape {tuple(weight.shape)}")
    return _CONV[nd](x, weight, bias, stride, padding, dilation, groups)


# ----- hard concrete (L0) ---------------------------------------------------------------------------
def hard_concrete_sample(log_alpha: Tensor, u: Optional[Tensor] = None, beta: float = HC_BETA,
                         gamma: float = HC_GAMMA, zeta: float = HC_ZETA) -> Tensor:
    """Reparameterized hard-concrete gate: ``clamp(sigmoid((logit u + log alpha) / beta) (zeta - gamma) + gamma, 0, 1)``.

    Args:
        log_alpha: Location parameters.
        u: Uniform(0, 1) noise shaped like the sample; drawn when omitted.
        beta, gamma, zeta: Temperature and stretch interval.

    Returns:
        Gates in [0, 1], exactly 0 or 1 with positive probability.

    References:
        Louizos, Welling, Kingma. Learning Sparse Neural Networks through L0 Regularization. ICLR 2018, Eq. 10-13.
    """
    if u is None:
        u = torch.rand_like(log_alpha)
    s = torch.sigmoid((torch.logit(u, 1e-6) + log_alpha) / beta)
    return torch.clamp(s * (zeta - gamma) + gamma, 0.0, 1.0)


def hard_concrete_prob_nonzero(log_alpha: Tensor, beta: float = HC_BETA, gamma: float = HC_GAMMA,
                               zeta: float = HC_ZETA) -> Tensor:
    """P(gate != 0) = ``sigmoid(log alpha - beta log(-gamma / zeta))``: the expected L0 norm per gate."""
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


def hard_concrete_test_gate(log_alpha: Tensor, gamma: float = HC_GAMMA, zeta: float = HC_ZETA) -> Tensor:
    """Deterministic test-time gate ``clamp(sigmoid(log alpha)(zeta - gamma) + gamma, 0, 1)`` (Louizos et al. code)."""
    return torch.clamp(torch.sigmoid(log_alpha) * (zeta - gamma) + gamma, 0.0, 1.0)


def _hc_cdf_logit(z: Tensor, log_alpha: Tensor, beta: float, gamma: float, zeta: float) -> Tensor:
    t = ((z - gamma) / (zeta - gamma)).clamp(1e-12, 1 - 1e-12)
    return beta * (torch.log(t) - torch.log1p(-t)) - log_alpha


def hard_concrete_cdf(z: Tensor, log_alpha: Tensor, beta: float = HC_BETA, gamma: float = HC_GAMMA,
                      zeta: float = HC_ZETA) -> Tensor:
    """P(gate <= z): 0 below 0, ``sigmoid(beta logit((z - gamma)/(zeta - gamma)) - log alpha)`` on [0, 1), 1 from 1."""
    inner = torch.sigmoid(_hc_cdf_logit(z, log_alpha, beta, gamma, zeta))
    return torch.where(z < 0, torch.zeros_like(inner), torch.where(z >= 1, torch.ones_like(inner), inner))


def hard_concrete_log_density(z: Tensor, log_alpha: Tensor, beta: float = HC_BETA, gamma: float = HC_GAMMA,
                              zeta: float = HC_ZETA) -> Tensor:
    """Log density of the continuous part on (0, 1), the derivative of :func:`hard_concrete_cdf`."""
    x = _hc_cdf_logit(z, log_alpha, beta, gamma, zeta)
    t = (z - gamma) / (zeta - gamma)
    return (F.logsigmoid(x) + F.logsigmoid(-x) + math.log(beta) - torch.log(t) - torch.log1p(-t)
            - math.log(zeta - gamma))


# ----- learned threshold (LTP) and L1 ---------------------------------------------------------------
def soft_threshold_mask(weight: Tensor, tau: Tensor, temperature: float) -> Tensor:
    """Soft mask ``sigmoid((w^2 - tau) / T)`` of learned-threshold pruning; its sum is the soft L0 norm.

    References:
        Azarian, Bhalgat, Lee, Blankevoort. Learned Threshold Pruning. 2020, Eq. 3.
    """
    return torch.sigmoid((weight * weight - tau) / temperature)


class _L1Norm(torch.autograd.Function):
    """``|w|_1`` with the backward ``sign(w) g`` in one allocation (``sign(w)`` scaled in place).

    Autograd's own ``w.abs().sum()`` back-propagates through the sum's expanded gradient into ``abs``'s
    ``grad * sgn(w)``: on a LeNet-300-100 step that made L1's penalty cost about 0.2 ms more than this form
    (``benchmarks/step_cost.py``). Under ``create_graph=True`` the backward is the out-of-place product, whose
    own derivatives are the true ones (``sign`` has derivative 0 almost everywhere).
    """

    @staticmethod
    def forward(ctx, weight: Tensor) -> Tensor:
        ctx.save_for_backward(weight)
        return weight.abs().sum()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (weight,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # a double backward: keep the product differentiable
            return torch.sign(weight) * grad
        return torch.sign(weight).mul_(grad)


def l1_norm(weight: Tensor) -> Tensor:
    """``weight.abs().sum()``, value and (sub)gradient ``sign(w)`` (0 at 0, as ``abs``), with a cheaper backward.

    Example:
        >>> w = torch.tensor([1.5, -2.0, 0.0], requires_grad=True)
        >>> l1_norm(w).backward()
        >>> w.grad
        tensor([ 1., -1.,  0.])
    """
    return _L1Norm.apply(weight)


def soft_threshold(weight: Tensor, threshold: float) -> Tensor:
    """Proximal operator of ``threshold * |w|_1``: ``sign(w) max(|w| - threshold, 0)`` (exact zeros)."""
    return torch.sign(weight) * torch.clamp(weight.abs() - threshold, min=0.0)


class _VDWeightStats(torch.autograd.Function):
    """Fused per-weight maths of a Sparse VD layer, one autograd node with a hand-derived backward.

    Forward: ``log alpha = clamp(log sigma^2 - log(theta^2 + eps), -clip, clip)``, the variance weight
    ``alpha theta^2`` of the local reparameterization and the summed KL (optionally over a mask). Backward:
    ``d var / d log alpha = var``; ``d log alpha / d log sigma^2 = 1`` and ``d log alpha / d theta =
    -2 theta / (theta^2 + eps)`` inside the clip range (0 outside, as ``clamp``'s gradient);
    ``d KL / d log alpha = -k1 k3 s (1 - s) - sigmoid(-log alpha) / 2`` with ``s = sigmoid(k2 + k3 log alpha)``.

    Speed: every pass is a vectorized ATen kernel, most in place. With ``a = exp(log alpha)`` (computed once
    for the variance) the KL's ``softplus(-log alpha)`` is ``log(1 + a) - log alpha`` and ``sigmoid(-log alpha)``
    is ``1 / (1 + a)``: on CPU ``softplus`` and ``log1p`` are scalar loops about ten times slower than
    ``log`` (2.5 ms against 0.2 ms on a 300x784 weight), and log alpha is clipped to [-8, 8], so ``1 + a``
    loses nothing that matters (``a >= 3e-4``; the KL term it feeds is then below 2e-4).
    """

    @staticmethod
    def forward(ctx, theta: Tensor, log_sigma2: Tensor, mask: Optional[Tensor], clip: float):
        t2 = theta * theta
        denom = t2 + _THETA2_EPS
        la = torch.sub(log_sigma2, torch.log(denom)).clamp_(-clip, clip)
        a = torch.exp(la)
        var_w = a * t2
        s = torch.mul(la, KL_K3).add_(KL_K2).sigmoid_()
        kl = torch.add(a, 1.0).log_().sub_(la).mul_(0.5).add_(s, alpha=-KL_K1).add_(KL_K1)
        kl_sum = torch.dot(kl.reshape(-1), mask.reshape(-1)) if mask is not None else kl.sum()
        ctx.save_for_backward(theta, denom, la, a, var_w, s, mask)
        ctx.clip = clip
        ctx.mark_non_differentiable(la)
        return var_w, kl_sum, la

    @staticmethod
    def backward(ctx, g_var: Optional[Tensor], g_kl: Optional[Tensor], _g_la: Optional[Tensor]):
        _refuse_double_backward("vd_weight_stats")
        theta, denom, la, a, var_w, s, mask = ctx.saved_tensors
        g_la = torch.zeros_like(la) if g_var is None else g_var * var_w
        if g_kl is not None:
            # dKL/dla = -k1 k3 s (1 - s) - 0.5 / (1 + a)
            dkl = torch.sub(s, 1.0).mul_(s).mul_(KL_K1 * KL_K3)
            dkl.sub_(torch.add(a, 1.0).reciprocal_().mul_(0.5))
            if mask is not None:
                dkl.mul_(mask)
            g_la.add_(dkl.mul_(g_kl))
        g_la.mul_(la.abs() < ctx.clip)
        # g_theta = -2 theta g_la / denom + 2 theta a g_var
        g_theta = torch.div(g_la, denom).mul_(-2.0)
        if g_var is not None:
            g_theta.add_(torch.mul(a, g_var).mul_(2.0))
        g_theta.mul_(theta)
        return g_theta, g_la, None, None


def vd_weight_stats(theta: Tensor, log_sigma2: Tensor, mask: Optional[Tensor] = None,
                    clip: float = LOG_ALPHA_CLIP) -> tuple[Tensor, Tensor, Tensor]:
    """Everything a Sparse VD layer needs per weight, in one fused pass with a hand-derived backward.

    Args:
        theta: Weight means.
        log_sigma2: Log variances, same shape.
        mask: Optional float/bool mask: the KL is summed over the kept weights only.
        clip: Clipping bound of log alpha.

    Returns:
        ``(alpha * theta^2, KL summed, log alpha)``: the variance weight of the local reparameterization,
        ``kl_log_uniform(log_alpha(theta, log_sigma2)).sum()`` (masked), and the clipped log alpha
        (not differentiable; use :func:`log_alpha` for a differentiable one). Equal, value and gradient,
        to composing :func:`log_alpha` and :func:`kl_log_uniform` (checked by ``gradcheck``).

    Example:
        >>> var_w, kl, la = vd_weight_stats(torch.ones(2, 2), torch.zeros(2, 2))
        >>> bool(torch.allclose(var_w, torch.ones(2, 2)))
        True
    """
    if mask is not None:
        mask = mask.to(theta.dtype)
    if _fusedkernel.usable(theta, log_sigma2):
        return _VDWeightStatsCPU.apply(theta, log_sigma2, mask, clip)
    return _VDWeightStats.apply(theta, log_sigma2, mask, clip)


def _refuse_double_backward(name: str) -> None:
    """The fused functions' hand-written gradients carry no graph of their own. A backward run with
    ``create_graph=True`` (gradient penalties, Hessian-vector products) would silently get second derivatives
    that are missing terms or zero: refuse it."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"a double backward (create_graph=True) through {name} is not supported: its fused "
                           "backward pass is hand-written and not itself differentiable. For second derivatives "
                           "compose the unfused formulas (log_alpha and kl_log_uniform; hard_concrete_sample and "
                           "hard_concrete_prob_nonzero)")


class _VDWeightStatsCPU(torch.autograd.Function):
    """:class:`_VDWeightStats` through the C++ kernel (:mod:`bayes_sparse._fusedkernel`): one pass each way."""

    @staticmethod
    def forward(ctx, theta: Tensor, log_sigma2: Tensor, mask: Optional[Tensor], clip: float):
        var_w, la, kl_sum = _fusedkernel.vd_forward(theta, log_sigma2, mask, clip)
        ctx.save_for_backward(theta, log_sigma2, mask)
        ctx.clip = clip
        ctx.mark_non_differentiable(la)
        return var_w, kl_sum, la

    @staticmethod
    def backward(ctx, g_var: Optional[Tensor], g_kl: Optional[Tensor], _g_la: Optional[Tensor]):
        _refuse_double_backward("vd_weight_stats")
        theta, log_sigma2, mask = ctx.saved_tensors
        g_kl_value = 0.0 if g_kl is None else float(g_kl)
        g_theta, g_ls = _fusedkernel.vd_backward(theta, log_sigma2, mask, g_var, g_kl_value, ctx.clip)
        return g_theta, g_ls, None, None


class _HardConcreteGates(torch.autograd.Function):
    """Fused hard-concrete gates and expected-L0 sum, one autograd node with a hand-derived backward.

    ``g = clamp(s (zeta - gamma) + gamma, 0, 1)`` with ``s = sigmoid((logit u + log alpha) / beta)``:
    ``dg / d log alpha = (zeta - gamma) s (1 - s) / beta`` where ``0 < g < 1`` (0 where clamped);
    ``P = sigmoid(log alpha - beta log(-gamma / zeta))``: ``dP / d log alpha = P (1 - P)``.
    ``logit u`` uses ``torch.logit`` (a vectorized kernel; ``log1p`` is a slow scalar loop on CPU).
    """

    @staticmethod
    def forward(ctx, log_alpha: Tensor, u: Tensor, mask: Optional[Tensor], beta: float, gamma: float, zeta: float):
        s = torch.logit(u, 1e-6).add_(log_alpha).div_(beta).sigmoid_()
        stretched = torch.mul(s, zeta - gamma).add_(gamma)
        gates = stretched.clamp(0.0, 1.0)
        p = torch.sub(log_alpha, beta * math.log(-gamma / zeta)).sigmoid_()
        l0 = torch.dot(p.reshape(-1), mask.reshape(-1)) if mask is not None else p.sum()
        ctx.save_for_backward(s, gates, p, mask)
        ctx.constants = (beta, gamma, zeta)
        return gates, l0

    @staticmethod
    def backward(ctx, g_gates: Optional[Tensor], g_l0: Optional[Tensor]):
        _refuse_double_backward("hard_concrete_gates")
        s, gates, p, mask = ctx.saved_tensors
        beta, gamma, zeta = ctx.constants
        if g_gates is not None:
            # (gates > 0) & (gates < 1) is where the clamp passed the stretched value through
            inside = (gates > 0).logical_and_(gates < 1)
            grad = torch.sub(1.0, s).mul_(s).mul_((zeta - gamma) / beta).mul_(g_gates).mul_(inside)
        else:
            grad = torch.zeros_like(s)
        if g_l0 is not None:
            dp = torch.sub(1.0, p).mul_(p)
            if mask is not None:
                dp.mul_(mask)
            grad.add_(dp.mul_(g_l0))
        return grad, None, None, None, None, None


def hard_concrete_gates(log_alpha: Tensor, mask: Optional[Tensor] = None, u: Optional[Tensor] = None,
                        beta: float = HC_BETA, gamma: float = HC_GAMMA,
                        zeta: float = HC_ZETA) -> tuple[Tensor, Tensor]:
    """One draw of the hard-concrete gates and the expected L0 (summed, optionally over a mask), fused.

    Equal, value and gradient, to :func:`hard_concrete_sample` with the same ``u`` and
    ``hard_concrete_prob_nonzero(log_alpha).sum()`` (checked by ``gradcheck``).

    Args:
        log_alpha: Gate locations.
        mask: Optional mask of the gates whose L0 counts.
        u: Uniform(0, 1) noise shaped like ``log_alpha``. When omitted it is drawn: on the CPU in float32 by the C++
            kernel (:mod:`bayes_sparse._fusedkernel`, a hash of a seed taken from torch's generator, so
            ``torch.manual_seed`` fixes it; one pass each way), elsewhere with ``torch.rand_like``.
        beta, gamma, zeta: Temperature and stretch interval.

    Returns:
        ``(gates, expected L0)``.
    """
    if mask is not None:
        mask = mask.to(log_alpha.dtype)
    if u is None:
        if _fusedkernel.usable(log_alpha):
            return _HardConcreteGatesCPU.apply(log_alpha, mask, _fusedkernel.new_seed(), beta, gamma, zeta)
        u = torch.rand_like(log_alpha)
    return _HardConcreteGates.apply(log_alpha, u, mask, beta, gamma, zeta)


class _HardConcreteGatesCPU(torch.autograd.Function):
    """:class:`_HardConcreteGates` through the C++ kernel: the noise comes from a seed (:mod:`bayes_sparse._fusedkernel`)."""

    @staticmethod
    def forward(ctx, log_alpha: Tensor, mask: Optional[Tensor], seed: int, beta: float, gamma: float, zeta: float):
        gates, l0, saved = _fusedkernel.hc_forward(log_alpha, mask, seed, beta, gamma, zeta)
        ctx.save_for_backward(log_alpha, mask, *saved)  # saved: (an empty tensor, the gates' derivatives)
        ctx.constants = (beta, gamma, zeta)
        return gates, l0

    @staticmethod
    def backward(ctx, g_gates: Optional[Tensor], g_l0: Optional[Tensor]):
        _refuse_double_backward("hard_concrete_gates")
        log_alpha, mask, *saved = ctx.saved_tensors
        beta, gamma, zeta = ctx.constants
        g_l0_value = 0.0 if g_l0 is None else float(g_l0)
        grad, _ = _fusedkernel.hc_backward(log_alpha, mask, g_gates, g_l0_value, tuple(saved), beta, gamma, zeta)
        return grad, None, None, None, None, None


class _HardConcreteWeightCPU(torch.autograd.Function):
    """``theta * gates`` and the expected L0 through the C++ kernel, one pass each way: the gated weight is
    written directly and the backward gives both gradients, so neither the gates nor the product's two
    gradient multiplications make a pass of their own."""

    @staticmethod
    def forward(ctx, theta: Tensor, log_alpha: Tensor, mask: Optional[Tensor], seed: int, beta: float,
                gamma: float, zeta: float):
        weight, l0, (gates, deriv) = _fusedkernel.hc_forward(log_alpha, mask, seed, beta, gamma, zeta, theta=theta)
        ctx.save_for_backward(theta, log_alpha, mask, gates, deriv)
        ctx.constants = (beta, gamma, zeta)
        return weight, l0

    @staticmethod
    def backward(ctx, g_weight: Optional[Tensor], g_l0: Optional[Tensor]):
        _refuse_double_backward("hard_concrete_weight")
        theta, log_alpha, mask, gates, deriv = ctx.saved_tensors
        beta, gamma, zeta = ctx.constants
        g_l0_value = 0.0 if g_l0 is None else float(g_l0)
        # without a gradient for the weight theta gets none (None, not a tensor of zeros) and only L0's remains
        grad, g_theta = _fusedkernel.hc_backward(log_alpha, mask, g_weight, g_l0_value, (gates, deriv), beta, gamma,
                                                 zeta, theta=theta if g_weight is not None else None)
        return g_theta, grad, None, None, None, None, None


def hard_concrete_weight(theta: Tensor, log_alpha: Tensor, mask: Optional[Tensor] = None,
                         beta: float = HC_BETA, gamma: float = HC_GAMMA,
                         zeta: float = HC_ZETA) -> tuple[Tensor, Tensor]:
    """One draw of the gated weight ``theta * gates`` and the expected L0 (summed, optionally over a mask).

    Equal, value and gradient, to ``gates, l0 = hard_concrete_gates(log_alpha, mask)`` followed by
    ``theta * gates`` (same noise for the same torch seed). On the CPU in float32 the C++ kernel computes the
    product in the gates' pass and both gradients in one backward pass (about three fewer passes over the
    weights each step); elsewhere it is exactly that composition.

    Args:
        theta: The weights (shaped like ``log_alpha``).
        log_alpha: Gate locations.
        mask: Optional mask of the gates whose L0 counts.
        beta, gamma, zeta: Temperature and stretch interval.

    Returns:
        ``(theta * gates, expected L0)``.
    """
    if theta.shape != log_alpha.shape:
        raise ValueError(f"theta has shape {tuple(theta.shape)} but log_alpha {tuple(log_alpha.shape)}; "
                         "one gate per weight needs equal shapes")
    if mask is not None:
        mask = mask.to(log_alpha.dtype)
    if _fusedkernel.usable(theta, log_alpha):
        return _HardConcreteWeightCPU.apply(theta, log_alpha, mask, _fusedkernel.new_seed(), beta, gamma, zeta)
    gates, l0 = hard_concrete_gates(log_alpha, mask, None, beta, gamma, zeta)
    return theta * gates, l0
