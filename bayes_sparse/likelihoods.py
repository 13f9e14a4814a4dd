"""Likelihoods for :class:`bayes_sparse.SVIModel`: the distribution of the targets given the network output.

A likelihood is an ``nn.Module`` (so its learned parameters, such as a Gaussian noise scale, are trained
and saved with the model) that maps the output of the network on a minibatch of ``B`` examples to a Pyro
distribution with ``batch_shape == (B,)``; every other dimension of an example belongs to the event.

* :class:`Categorical`: the network returns logits ``(B, ..., C)``, the targets are integer labels
  ``(B, ...)``.
* :class:`Gaussian`: the network returns means shaped like the targets; the noise scale is fixed or learned.
* Any callable ``f(out) -> pyro distribution`` (an ``nn.Module`` keeps its parameters trainable).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import pyro.distributions as dist
import torch
from torch import Tensor, nn

from ._validation import check_number

__all__ = ["LIKELIHOODS", "Categorical", "Gaussian", "Likelihood", "as_likelihood", "checks_targets"]

#: Likelihood names :func:`as_likelihood` (and :class:`bayes_sparse.SVIModel`) accept.
LIKELIHOODS = ("categorical", "gaussian")


class Likelihood(nn.Module):
    """Base class: ``likelihood(out)`` is the distribution of a minibatch's targets given the network output.

    Subclasses implement :meth:`forward` and may refine :meth:`check_target`.

    Attributes:
        checks_targets: ``True`` when :meth:`check_target` checks everything Pyro's validation would check of
            the targets (dtype, shape, support): then :class:`~bayes_sparse.SVIStep` runs its steps after the
            first without Pyro's validation. ``False`` by default (user likelihoods are validated every step).
            Only a class's own setting counts: a subclass of ``Categorical`` or ``Gaussian`` is validated every
            step unless it sets ``checks_targets = True`` itself (see :func:`checks_targets`).
    """

    checks_targets = False

    def forward(self, out: Tensor) -> dist.Distribution:  # pragma: no cover - abstract
        """The distribution of the targets, ``batch_shape == (out.shape[0],)``."""
        raise NotImplementedError

    def check_target(self, out: Tensor, y: Tensor) -> None:
        """Raise a ``TypeError``/``ValueError`` naming the fix when ``y`` cannot be scored against ``out``.

        The default accepts anything (the distribution itself will complain).
        """


def checks_targets(likelihood: object) -> bool:
    """Whether ``likelihood``'s own class (not a base class) declares ``checks_targets = True``: a subclass that
    changes ``forward`` or ``check_target`` must say so itself before Pyro's validation is skipped for it."""
    return bool(type(likelihood).__dict__.get("checks_targets", False))


class Categorical(Likelihood):
    """Categorical likelihood over the last dimension of the network output (logits).

    Example:
        >>> lik = Categorical()
        >>> lik(torch.zeros(4, 3)).batch_shape
        torch.Size([4])
    """

    checks_targets = True

    def forward(self, out: Tensor) -> dist.Distribution:
        if out.dim() < 2:
            raise ValueError(f"the categorical likelihood needs logits shaped (batch, ..., classes), got shape "
                             f"{tuple(out.shape)}; make the network's last layer output one logit per class")
        return dist.Categorical(logits=out).to_event(out.dim() - 2)

    def check_target(self, out: Tensor, y: Tensor) -> None:
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise TypeError(f"the categorical likelihood needs integer class labels, got y of dtype {y.dtype}; "
                            "convert with y.long()")
        if y.shape != out.shape[:-1]:
            raise ValueError(f"the network returns logits of shape {tuple(out.shape)} but y has shape "
                             f"{tuple(y.shape)}; labels must have shape {tuple(out.shape[:-1])} (e.g. y.squeeze(-1))")
        classes = out.shape[-1]
        if y.numel() == 0:
            return
        low, high = torch.aminmax(y)  # one reduction, one synchronisation
        if int(low) < 0 or int(high) >= classes:
            bad = y[(y < 0) | (y >= classes)]
            raise ValueError(f"labels must lie in [0, {classes - 1}] for a network with {classes} logits, got "
                             f"{int(bad[0])} ({bad.numel()} labels out of range); check the label encoding or the "
                             "size of the last layer")


class Gaussian(Likelihood):
    """Gaussian likelihood ``Normal(out, scale)``, the network output being the mean (shaped like ``y``).

    Args:
        scale: The noise standard deviation, a positive number; ``None`` learns it.
        init_scale: Initial value of the learned scale (ignored when ``scale`` is given).

    Attributes:
        log_scale: The learned scale in unconstrained form, an ``nn.Parameter`` (only when ``scale=None``),
            so it is in ``state_dict()`` and reaches every optimizer over ``parameters()``.

    Raises:
        ValueError: ``scale`` or ``init_scale`` is not a finite positive number.

    Example:
        >>> lik = Gaussian()  # learned scale
        >>> sorted(lik.state_dict())
        ['log_scale']
        >>> float(lik.scale.detach())
        1.0
    """

    checks_targets = True

    def __init__(self, scale: Optional[float] = None, *, init_scale: float = 1.0) -> None:
        super().__init__()
        if scale is None:
            init_scale = check_number(init_scale, "init_scale", low=0.0, low_inclusive=False)
            self.log_scale = nn.Parameter(torch.tensor(init_scale).log())
            self.fixed_scale: Optional[float] = None
        else:
            self.fixed_scale = check_number(scale, "obs_scale", low=0.0, low_inclusive=False,
                                            hint="Pass None to learn it.")

    @property
    def learned(self) -> bool:
        """Whether the scale is a learned parameter."""
        return self.fixed_scale is None

    @property
    def scale(self) -> Union[Tensor, float]:
        """The noise standard deviation: a differentiable tensor when learned, else the fixed float."""
        return self.log_scale.exp() if self.fixed_scale is None else self.fixed_scale

    def forward(self, out: Tensor) -> dist.Distribution:
        scale = self.scale
        if isinstance(scale, Tensor):
            scale = scale.to(out.dtype)
        return dist.Normal(out, scale).to_event(out.dim() - 1)

    def check_target(self, out: Tensor, y: Tensor) -> None:
        if not y.dtype.is_floating_point:
            raise TypeError(f"the gaussian likelihood needs floating targets, got y of dtype {y.dtype}; "
                            "convert with y.float()")
        if y.shape != out.shape:
            raise ValueError(f"the network returns shape {tuple(out.shape)} but y has shape {tuple(y.shape)}; "
                             "reshape y (e.g. y.unsqueeze(-1)) so they match")

    def extra_repr(self) -> str:
        return "scale=learned" if self.learned else f"scale={self.fixed_scale}"


class _FunctionLikelihood(Likelihood):
    """Wraps a plain callable ``f(out) -> distribution`` (no parameters of its own)."""

    def __init__(self, fn: Callable[[Tensor], dist.Distribution]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, out: Tensor) -> dist.Distribution:
        return self.fn(out)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))


def as_likelihood(likelihood: Union[str, nn.Module, Callable[[Tensor], dist.Distribution]],
                  obs_scale: Optional[float] = None) -> nn.Module:
    """The likelihood module for a name, a module or a callable.

    Args:
        likelihood: ``"categorical"``, ``"gaussian"``, a :class:`Likelihood`, any ``nn.Module`` or callable
            mapping the network output to a Pyro distribution with ``batch_shape == (batch,)``.
        obs_scale: Only with ``"gaussian"``: the fixed noise scale, ``None`` to learn it.

    Returns:
        An ``nn.Module``: modules are returned as they are (their parameters stay theirs), plain callables
        are wrapped.

    Raises:
        ValueError: unknown name, or ``obs_scale`` given with another likelihood than ``"gaussian"``.
        TypeError: ``likelihood`` is neither a name nor callable.

    Example:
        >>> as_likelihood("gaussian", obs_scale=0.1)
        Gaussian(scale=0.1)
    """
    if isinstance(likelihood, str):
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; known: {', '.join(LIKELIHOODS)} "
                             "(or pass a callable returning a Pyro distribution)")
        if likelihood == "gaussian":
            return Gaussian(obs_scale)
        if obs_scale is not None:
            raise ValueError(f"obs_scale={obs_scale!r} only applies to likelihood='gaussian', not {likelihood!r}; "
                             "drop obs_scale")
        return Categorical()
    if obs_scale is not None:
        raise ValueError(f"obs_scale={obs_scale!r} only applies to likelihood='gaussian'; give the scale to the "
                         f"likelihood object itself (e.g. bayes_sparse.likelihoods.Gaussian(scale={obs_scale!r}))")
    if isinstance(likelihood, nn.Module):
        return likelihood
    if callable(likelihood):
        return _FunctionLikelihood(likelihood)
    raise TypeError(f"likelihood must be 'categorical', 'gaussian', a Likelihood module or a callable returning a "
                    f"Pyro distribution, got {type(likelihood).__name__} ({likelihood!r:.60})")
