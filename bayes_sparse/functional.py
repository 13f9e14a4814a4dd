"""Pure maths shared by the sparse layers: no state, no modules.

Everything here is a plain function of tensors, differentiable where the maths is, and safe to
``torch.autograd.gradcheck`` in float64.

References:
    Molchanov, Ashukha, Vetrov. "Variational Dropout Sparsifies Deep Neural Networks", ICML 2017.
    Kingma, Salimans, Welling. "Variational Dropout and the Local Reparameterization Trick", NeurIPS 2015.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "KL_K1",
    "KL_K2",
    "KL_K3",
    "LOG_ALPHA_CLIP",
    "conv_nd",
    "kl_log_uniform",
    "local_reparam",
    "local_reparam_moments",
    "log_alpha",
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
