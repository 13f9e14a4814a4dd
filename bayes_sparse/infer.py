"""Training with Pyro: the Pyro model of a network with sparse layers, posterior predictive sampling, a fit loop.

The ELBO of a network with Sparse VD layers is

    ELBO = (N / B) * sum_{i in batch} log p(y_i | x_i, w) - sum_layers KL(q(w) || p(w)),

where the expectation over ``w`` is estimated by the layers' local reparameterization (their training-mode
forward). In the Pyro model the likelihood sits inside ``pyro.plate("data", size=N, subsample_size=B)``
(Pyro applies the N/B scale) and the KL (plus the penalties of non-Bayesian layers: L0, LTP, L1) enters as
``pyro.factor("regularizer", -regularizer(net))`` under ``pyro.poutine.scale(scale=kl_weight)``. The
variational parameters are ordinary module parameters, so the guide has no sample sites.

How the parameters reach Pyro
-----------------------------
:class:`SVIModel` is a :class:`~pyro.nn.PyroModule` that owns the network and the likelihood as ordinary
submodules, so ``model.parameters()`` and ``model.state_dict()`` hold everything that is learned (the
learned Gaussian noise scale included), exactly as in PyTorch. The module is the single owner of its
tensors: each call of the model records one ``param`` site per trainable parameter whose value is an alias
of the module's own tensor (``.unconstrained()`` gives the tensor back) and names that tensor in Pyro's
global param store, under the names ``pyro.module`` would use (``"net$$$0.weight"``,
``"net.likelihood$$$log_scale"``). Hence:

* ``pyro.infer.SVI`` with any ``pyro.optim`` optimizer finds and steps the module's tensors through the
  trace, and ``PyroOptim.get_state``/``set_state`` checkpoints keep their usual parameter names;
* ``torch.optim`` over ``pyro.infer.Trace_ELBO()(model, model.guide).parameters()`` (Pyro's recipe for
  Lightning and plain PyTorch loops) trains the same tensors, since the ELBO module holds the model;
* two models in one process never share or overwrite each other's tensors, even under the same name:
  the store entry always points at the tensor of the model that ran last, and nothing is read back from it;
* no weak reference is attached to the network's parameters, so ``pickle``/``copy.deepcopy`` of the
  network work after training.

The alternatives were rejected: ``pyro.module(name, net)`` and a plain ``PyroModule`` attribute (global
mode) let the param store win, so a second model with the same names silently trains the first one's
stale tensors (and Pyro's weak references on the parameters make the network unpicklable);
``to_pyro_module_(net)`` converts the user's network in place and has the same store-wins rule; Pyro's
``module_local_params=True`` setting is process-wide, must precede the model's construction, and its param
sites carry no ``.unconstrained()``, so ``SVI`` with a ``pyro.optim`` optimizer fails on them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import pyro
import pyro.distributions as dist
import torch
import torch.distributed as tdist
from pyro.distributions.util import scale_and_mask
from pyro.nn import PyroModule
from pyro.params.param_store import param_with_module_name
from pyro.poutine.runtime import _PYRO_STACK, effectful
from pyro.poutine.util import prune_subsample_sites
from pyro.infer.util import torch_item
from pyro.util import warn_if_nan
from torch import Tensor, nn
from torch.distributions import constraints
from tqdm.auto import tqdm

from . import schedule
from ._validation import check_module, check_number, check_positive_int
from .distributed import find_ddp
from .layers.base import SparseLayer
from .likelihoods import LIKELIHOODS, Gaussian, as_likelihood, checks_targets
from .objectives import regularizer

__all__ = ["LIKELIHOODS", "SVIModel", "SVIStep", "check_finite_", "error_rate", "fit_svi", "flat_then_linear_decay",
           "kl_warmup_weight", "sampling_mode"]

logger = logging.getLogger(__name__)


def _alias_of_own_param(name: str, param: nn.Parameter, constraint: constraints.Constraint = constraints.real,
                        event_dim: Optional[int] = None) -> Tensor:
    """Name ``param`` in the global param store (this tensor wins) and return an alias of it for the trace.

    Same signature and bookkeeping as ``ParamStoreDict.get_param`` / ``PyroModule`` (pyro/nn/module.py writes
    the store's dicts the same way); ``ParamStoreDict.__setitem__`` is not used because it would copy a
    non-contiguous tensor and set ``requires_grad`` on a frozen one. The previous tensor under ``name``
    keeps its reverse entry, so another model's ``pyro.optim`` state can still be saved by name. The weak
    reference goes on the alias, never on ``param`` (a weakref attribute makes ``pickle`` fail).
    """
    _register_own_param(name, param)
    alias = param.view_as(param)
    alias.unconstrained = weakref.ref(param)  # what SVI.step and JitTrace_ELBO read
    return alias


def _register_own_param(name: str, param: Tensor) -> None:
    """Point the global param store's ``name`` at ``param`` itself, unless it already does (see
    :func:`_alias_of_own_param` for the bookkeeping)."""
    store = pyro.get_param_store()
    if store._params.get(name) is not param:
        store._params[name] = param
        store._param_to_name[param] = name
        store._constraints[name] = constraints.real


_own_param = effectful(_alias_of_own_param, type="param")


@contextlib.contextmanager
def sampling_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: the sparse layers draw weight noise, every other module evaluates.

    Inside it, every :class:`~bayes_sparse.SparseLayer` of ``model`` is in training mode (its forward samples
    from the posterior, e.g. Sparse VD's local reparameterization) and every other module (BatchNorm,
    Dropout, ...) in eval mode, so forward passes are posterior samples that leave every buffer (BatchNorm
    running statistics included) untouched. Each module's ``training`` flag is restored on exit, whatever
    it was, also when the body raises.

    Args:
        model: Any module.

    Yields:
        ``model``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    Example:
        >>> import bayes_sparse as bs
        >>> net = torch.nn.Sequential(bs.VDLinear(4, 3), torch.nn.BatchNorm1d(3)).eval()
        >>> with sampling_mode(net):
        ...     draws = torch.stack([net(torch.ones(2, 4)) for _ in range(10)])
        >>> net.training, net[0].training
        (False, False)
    """
    check_module(model)
    modes = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in modes:
            m.training = isinstance(m, SparseLayer)
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


class SVIModel(PyroModule):
    """Pyro model (and empty guide) for a network whose sparse layers carry a KL term.

    Call it with a minibatch ``(x, y)`` drawn from a training set of ``num_data`` examples; with ``y=None``
    it draws posterior predictive samples (see :meth:`predictive`). The network and the likelihood are
    submodules, so ``parameters()``, ``state_dict()``, ``.to()`` and ``train()``/``eval()`` cover both; see
    the module docstring (:mod:`bayes_sparse.infer`) for how their parameters reach Pyro.

    Args:
        net: The network (any mix of sparse and dense layers), a plain ``nn.Module``; it is not converted.
        num_data: Size N of the training set, for the N/B minibatch scale.
        likelihood: ``"categorical"`` (``net`` returns logits, ``y`` holds integer labels), ``"gaussian"``
            (``net`` returns means shaped like ``y``), or a likelihood object: a
            :class:`bayes_sparse.likelihoods.Likelihood`, any ``nn.Module`` or callable mapping the network
            output to a Pyro distribution with ``batch_shape == (batch,)``.
        obs_scale: Only with ``"gaussian"``: the noise standard deviation; ``None`` learns it (a parameter of
            ``model.likelihood``, in ``state_dict`` as ``likelihood.log_scale``).
        name: Prefix of the names under which the parameters appear in Pyro's param store.

    Attributes:
        net: The network.
        likelihood: The likelihood module.
        num_data: The training set size N.
        kl_weight: Weight of the KL/penalty term (set it for KL warm-up; 1.0 gives the true ELBO).

    Raises:
        TypeError: ``net`` is not an ``nn.Module`` or is a ``PyroModule``; ``likelihood`` is not usable.
        ValueError: bad ``num_data``, ``obs_scale``, ``name`` or likelihood name.

    Example:
        >>> import bayes_sparse as bs, pyro
        >>> net = torch.nn.Sequential(bs.VDLinear(4, 3))
        >>> model = SVIModel(net, num_data=100)
        >>> svi = pyro.infer.SVI(model, model.guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO())
        >>> loss = svi.step(torch.randn(10, 4), torch.randint(0, 3, (10,)))
        >>> # or a plain torch loop (Pyro's Lightning recipe):
        >>> elbo = pyro.infer.Trace_ELBO()(model, model.guide)
        >>> opt = torch.optim.Adam(elbo.parameters(), lr=1e-3)
        >>> loss = elbo(torch.randn(10, 4), torch.randint(0, 3, (10,)))
        >>> opt.zero_grad(); loss.backward(); opt.step()

    References:
        Molchanov, Ashukha, Vetrov 2017, Eq. 3 and 14; Pyro's SVI tutorial part II (subsampling).
    """

    def __init__(self, net: nn.Module, num_data: int,
                 likelihood: Union[str, nn.Module, Callable[[Tensor], dist.Distribution]] = "categorical",
                 obs_scale: Optional[float] = None, name: str = "net") -> None:
        check_module(net, "net")
        if isinstance(net, PyroModule):
            raise TypeError(f"net is a PyroModule ({type(net).__name__}); SVIModel trains plain torch networks "
                            "whose sparse layers hold q(w). Pass the network before pyro.nn.to_pyro_module_, or "
                            "write your own Pyro model for a PyroModule")
        num_data = check_positive_int(num_data, "num_data", hint="the training set size")
        if not isinstance(name, str) or not name or "$$$" in name:
            raise ValueError(f"name must be a non-empty str without '$$$' (Pyro's module divider), got {name!r}")
        lik = as_likelihood(likelihood, obs_scale)
        if isinstance(likelihood, str):  # a likelihood built here follows the network's device and dtype
            p = next((t for t in net.parameters() if t.is_floating_point()), None)
            if p is not None:
                lik = lik.to(device=p.device, dtype=p.dtype)
        super().__init__(name)
        self.net = net
        self.likelihood = lik
        self.num_data = num_data
        self.kl_weight = 1.0

    # PyroModule turns reading a plain submodule inside the model into ``pyro.module(...)``, whose param store
    # wins over the module's own tensors; here the submodules are returned as they are and their parameters
    # are named by ``_name_params`` instead.
    def __getattr__(self, name: str) -> Any:
        modules = self.__dict__.get("_modules")
        if modules is not None and name in modules and not isinstance(modules[name], PyroModule):
            return modules[name]
        return super().__getattr__(name)

    @property
    def name(self) -> str:
        """Prefix of the param store names (the root name, or the qualified name inside a parent PyroModule)."""
        return self._pyro_name

    @property
    def kl_weight(self) -> float:
        """Weight of the KL/penalty term, >= 0 (applied with ``pyro.poutine.scale``; 0 masks the term out)."""
        return self._kl_weight

    @kl_weight.setter
    def kl_weight(self, value: float) -> None:
        self._kl_weight = check_number(value, "kl_weight", low=0.0, hint="1.0 gives the true ELBO.")

    @property
    def obs_scale(self) -> Optional[float]:
        """The current noise scale of a :class:`~bayes_sparse.likelihoods.Gaussian` likelihood, else ``None``."""
        lik = self.likelihood
        if not isinstance(lik, Gaussian):
            return None
        scale = lik.scale
        return float(scale.detach()) if isinstance(scale, Tensor) else scale

    def _param_name(self, qualified: str) -> str:
        child, _, rest = qualified.partition(".")
        return param_with_module_name(self.name if child == "net" else f"{self.name}.{child}", rest)

    def _name_params(self) -> None:
        """One ``param`` site per trainable parameter (frozen ones are left alone, as ``pyro.module`` does)."""
        for qualified, p in self.named_parameters():
            if p.requires_grad:
                fullname = self._param_name(qualified)
                _own_param(fullname, p, constraint=constraints.real, event_dim=None, name=fullname)

    def _check_batch(self, x: Tensor, y: Optional[Tensor]) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0:
            raise ValueError("x must have a batch dimension first, got a 0-d tensor; use x.unsqueeze(0)")
        if x.shape[0] == 0:
            raise ValueError(f"the minibatch is empty (x has shape {tuple(x.shape)}); skip empty batches, e.g. "
                             "check the sampler or use DataLoader(..., drop_last=True)")
        if y is None:
            return
        if x.shape[0] > self.num_data:
            raise ValueError(f"the batch has {x.shape[0]} examples but num_data={self.num_data}; "
                             "num_data must be the full training set size")
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
        if y.dim() == 0 or y.shape[0] != x.shape[0]:
            raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0] if y.dim() else 'none (0-d)'}")

    def _net_output(self, x: Tensor, y: Optional[Tensor]) -> Tensor:
        """The network's output for ``x``, checked to be a tensor, and ``y`` checked by the likelihood (if given)."""
        out = self.net(x)
        if not isinstance(out, Tensor):
            raise TypeError(f"the network must return a tensor, got {type(out).__name__}")
        check = getattr(self.likelihood, "check_target", None)
        if y is not None and check is not None:
            check(out, y)
        return out

    def _obs_dist(self, out: Tensor) -> dist.Distribution:
        d = self.likelihood(out)
        if not isinstance(d, torch.distributions.Distribution):
            raise TypeError(f"the likelihood must return a Pyro distribution, got {type(d).__name__}; e.g. "
                            "lambda out: pyro.distributions.Normal(out, 0.1).to_event(1)")
        if tuple(d.batch_shape) != (out.shape[0],):
            raise ValueError(f"the likelihood returned a distribution with batch_shape {tuple(d.batch_shape)} for a "
                             f"minibatch of {out.shape[0]}; it must be ({out.shape[0]},): move the per-example "
                             "dimensions into the event with .to_event(n)")
        return d

    def forward(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """Run the model on a minibatch: the likelihood of ``y`` (or a draw of it) and the weighted regularizer.

        Args:
            x: Inputs, batch dimension first.
            y: Targets of the minibatch, or ``None`` to sample them (posterior predictive): then the sparse
                layers draw weight noise and every other module evaluates (:func:`sampling_mode`), whatever
                the modes were, and no buffer changes.

        Returns:
            The network output (also recorded as the deterministic site ``"out"``).

        Raises:
            TypeError, ValueError: bad inputs (the message names the fix).
        """
        self._check_batch(x, y)
        self._name_params()
        net, batch = self.net, x.shape[0]
        # The minibatch was drawn by the data loader; handing Pyro its positions keeps the N/B scale
        # without a second, unused random draw of indices. Prediction (y=None) needs no scale.
        size = self.num_data if y is not None else max(batch, self.num_data)
        mode = sampling_mode(net) if y is None else contextlib.nullcontext()
        with mode, pyro.plate("data", size=size, subsample_size=batch,
                              subsample=torch.arange(batch, device=x.device)):
            out = self._net_output(x, y)
            pyro.deterministic("out", out)
            pyro.sample("obs", self._obs_dist(out), obs=y)
        # KL of the Bayesian layers plus the penalties of the others (all in whole-data units)
        weight = self.kl_weight
        with pyro.poutine.scale(scale=weight) if weight > 0 else pyro.poutine.mask(mask=False):
            pyro.factor("regularizer", -regularizer(net))
        return out

    def guide(self, x: Tensor, y: Optional[Tensor] = None) -> None:
        """The guide: empty, because q(w) lives in the layers, whose parameters the model names."""

    def predictive(self, x: Tensor, num_samples: int = 100,
                   return_sites: Iterable[str] = ("out", "obs")) -> dict[str, Tensor]:
        """Posterior predictive samples for inputs ``x``, in any train/eval mode, leaving every buffer as it was.

        Args:
            x: Inputs, batch dimension first.
            num_samples: Number of draws.
            return_sites: ``"out"`` (network outputs under weight noise) and/or ``"obs"`` (targets drawn from
                the likelihood).

        Returns:
            A dict site -> tensor with a leading dimension of ``num_samples``.

        Raises:
            ValueError: ``num_samples`` is not a positive int, or ``x`` is empty.

        Example:
            >>> import bayes_sparse as bs
            >>> model = SVIModel(torch.nn.Sequential(bs.VDLinear(4, 1)), 100, likelihood="gaussian")
            >>> model.predictive(torch.randn(5, 4), num_samples=20)["obs"].shape
            torch.Size([20, 5, 1])
        """
        num_samples = check_positive_int(num_samples, "num_samples")
        with torch.no_grad():
            return pyro.infer.Predictive(self, guide=self.guide, num_samples=num_samples,
                                         return_sites=list(return_sites))(x)


def kl_warmup_weight(epoch: int, start: int = 5, end: int = 20) -> float:
    """KL weight of the official SparseVD recipe: 0 before ``start``, linear to 1 at ``end``, then 1."""
    if end <= start:
        return 1.0 if epoch >= start else 0.0
    return min(1.0, max(0.0, (epoch - start) / (end - start)))


def flat_then_linear_decay(epochs: int, flat_fraction: float = 0.5) -> Callable[[int], float]:
    """Learning-rate factor: 1 for the first ``flat_fraction`` of the epochs, then linear towards 0."""
    flat = int(round(epochs * flat_fraction))

    def factor(epoch: int) -> float:
        if epoch < flat:
            return 1.0
        return max(0.0, (epochs - epoch) / max(1, epochs - flat))

    return factor


@torch.no_grad()
def error_rate(net: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Classification error of ``net`` in eval mode on tensors ``x``, ``y`` (mode restored afterwards)."""
    was_training = net.training
    net.eval()
    wrong = 0
    for i in range(0, x.shape[0], batch_size):
        wrong += int((net(x[i:i + batch_size]).argmax(-1) != y[i:i + batch_size]).sum())
    net.train(was_training)
    return wrong / x.shape[0]


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every entry of every tensor is finite (one pass over the data, one synchronisation per device).

    A NaN or an inf makes a sum NaN or infinite, so a finite sum of sums proves every entry finite; only a
    non-finite sum (which finite values can also give, by overflow) is checked entry by entry.
    """
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    for group in by_device.values():
        with torch.no_grad():
            total = torch.stack([t.detach().sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
                                 for t in group]).sum()
        if not bool(total.isfinite()) and not all(bool(t.detach().isfinite().all()) for t in group):
            return False
    return True


def _first_nonfinite(named: Sequence[tuple[str, Tensor]]) -> Optional[tuple[str, int, int]]:
    """``(name, non-finite count, size)`` of the first tensor holding a NaN or inf, else ``None``."""
    for name, t in named:
        bad = int((~t.detach().isfinite()).sum())
        if bad:
            return name, bad, t.numel()
    return None


def _owner(model: nn.Module, param_name: str) -> str:
    """``"layer 'net.0' (VDLinear)"`` for a qualified parameter name of ``model``."""
    module_name = param_name.rpartition(".")[0]
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return "no layer of the model (a Pyro param)"
    return f"layer {module_name or '(root)'!r} ({type(module).__name__})"


def _other_ranks_failed(model: nn.Module, failed: bool, device: torch.device) -> list[int]:
    """Ranks (of the DDP wrapper's process group) that failed the check; one collective call per step.

    Every rank of a ``DistributedDataParallel`` model runs the check, so all of them raise together and
    none waits forever in the next step's gradient all-reduce. Without a wrapper there is no collective.
    """
    ddp = find_ddp(model)
    if ddp is None or not (tdist.is_available() and tdist.is_initialized()):
        return []
    group = ddp.process_group
    flags = torch.zeros(tdist.get_world_size(group), dtype=torch.int32, device=device)
    flags[tdist.get_rank(group)] = int(failed)
    tdist.all_reduce(flags, group=group)
    return [r for r, f in enumerate(flags.tolist()) if f]


def _where(epoch: Optional[int], step: Optional[int]) -> str:
    parts = [f"{k} {v}" for k, v in (("epoch", epoch), ("step", step)) if v is not None]
    return " at " + ", ".join(parts) if parts else ""


_KEPT = ". The optimizer did not step: the parameters keep their values from the last good step"


def _guard_batch(model: nn.Module, batch: Sequence[tuple[str, Any]], *, epoch: Optional[int], step: Optional[int],
                 device: torch.device) -> None:
    """Raise ``FloatingPointError`` before the forward pass when a floating tensor of the batch holds NaN/inf
    (on every rank of a DDP model together: the flag is exchanged before the gradient all-reduce)."""
    floats = [(name, t) for name, t in batch if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())]
    failed = not _all_finite([t for _, t in floats]) if floats else False
    ranks = _other_ranks_failed(model, failed, device)
    if not failed and not ranks:
        return
    where = _where(epoch, step)
    if not failed:
        raise FloatingPointError(f"rank(s) {ranks} found NaN/inf in their minibatch{where}, so every rank stops "
                                 f"(this rank's minibatch is finite); check the data for NaN/inf{_KEPT}")
    details = []
    for name, t in floats:
        bad = ~t.detach().isfinite()
        if bool(bad.any()):
            rows = bad.reshape(bad.shape[0], -1).any(1).nonzero().flatten().tolist() if t.dim() else []
            shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
            where_rows = f" (example{'s' if len(rows) > 1 else ''} {shown})" if rows else ""
            details.append(f"{name} has {int(bad.sum())} non-finite entries{where_rows}")
    raise FloatingPointError(f"the minibatch{where} holds NaN/inf: {'; '.join(details)}; check the data for NaN/inf "
                             f"(no layer is at fault; the step was not run){_KEPT}")


def _guard(model: nn.Module, loss: Optional[float], named: Sequence[tuple[str, Tensor]], *, epoch: Optional[int],
           step: Optional[int], advice: str) -> None:
    """Raise ``FloatingPointError`` (with the gradients cleared) unless the loss, every gradient and every value
    of ``named`` are finite; runs between the backward pass and the optimizer step."""
    grads = [p.grad for _, p in named if p.grad is not None]
    loss_ok = loss is None or math.isfinite(loss)
    failed = not (loss_ok and _all_finite(grads) and _all_finite([p for _, p in named]))
    device = named[0][1].device if named else torch.device("cpu")
    ranks = _other_ranks_failed(model, failed, device)
    if not failed and not ranks:
        return
    where = _where(epoch, step)
    bad_grad = _first_nonfinite([(n, p.grad) for n, p in named if p.grad is not None])
    bad_value = _first_nonfinite(list(named))
    if not loss_ok:
        head = f"the loss became {loss}{where}"
    elif failed:
        head = f"training became non-finite{where} (the loss is {loss})" if loss is not None else \
            f"training became non-finite{where}"
    else:
        head = (f"rank(s) {ranks} found a non-finite loss or gradient{where}, so every rank stops (this rank's "
                "loss and gradients are finite)")
    sentences = [f"{head}; {advice}"]
    if bad_grad is not None:
        name, bad, size = bad_grad
        sentences.append(f"First non-finite gradient: {name!r} of {_owner(model, name)}, {bad} of {size} entries")
    if bad_value is not None:
        name, bad, size = bad_value
        sentences.append(f"First non-finite parameter: {name!r} of {_owner(model, name)}, {bad} of {size} values "
                         "(already non-finite before this step: restore a checkpoint)")
    elif failed:
        sentences.append("Every parameter is still finite" if bad_grad is not None else
                         "Every gradient and parameter is finite")
    for _, p in named:  # a caught error followed by optimizer.step() writes nothing
        p.grad = None
    if bad_value is None:
        sentences.append(_KEPT[2:])
    raise FloatingPointError(". ".join(sentences))


def check_finite_(model: nn.Module, loss: Optional[Union[Tensor, float]] = None, step: Optional[int] = None, *,
                  epoch: Optional[int] = None) -> None:
    """Stop a plain training loop at the first non-finite loss, gradient or parameter, before the optimizer step.

    Call it between ``loss.backward()`` and ``optimizer.step()``. When the loss, a gradient or a parameter
    of ``model`` is NaN or infinite, it clears every gradient (``grad = None``, so a caught error followed by
    ``optimizer.step()`` changes nothing) and raises; the parameters and the optimizer state then still hold
    the last good step's values. On a model containing a ``DistributedDataParallel`` wrapper (pass the
    wrapper) it is a collective call: every rank raises when any rank fails, so no rank waits forever in
    the next gradient all-reduce.

    ::

        for step, (x, y) in enumerate(loader):
            loss = F.cross_entropy(net(x), y) + bs.regularizer(net) / N
            opt.zero_grad(); loss.backward()
            bs.infer.check_finite_(net, loss, step, epoch=epoch)
            opt.step(); bs.after_step(net, lr, N)

    Args:
        model: The module being trained (its trainable parameters are checked).
        loss: The step's loss (a tensor or a float); ``None`` checks gradients and parameters only.
        step: The step number, for the message.
        epoch: The epoch, for the message.

    Raises:
        FloatingPointError: naming the epoch, the step, the loss, and the first parameter (with its layer)
            whose gradient or value is non-finite.
        TypeError: ``model`` is not a module.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> net(torch.tensor([[float("nan"), 0.0]])).sum().backward()
        >>> check_finite_(net, step=7)
        Traceback (most recent call last):
        ...
        FloatingPointError: training became non-finite at step 7; ...
    """
    check_module(model)
    if isinstance(loss, Tensor):
        loss = float(loss.detach())
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    _guard(model, loss, named, epoch=epoch, step=step,
           advice="check the batch for NaN/inf, or lower the learning rate")


def _raise_nonfinite_output(model: nn.Module, error: ValueError, *, epoch: int, step: int, advice: str) -> None:
    """Turn Pyro's refusal of a NaN/inf network output (its distribution validation, before any gradient) into
    a ``FloatingPointError`` naming the first non-finite parameter, if any."""
    bad_value = _first_nonfinite([(n, p) for n, p in model.named_parameters()])
    for p in model.parameters():
        p.grad = None
    if bad_value is not None:
        name, bad, size = bad_value
        detail = (f"First non-finite parameter: {name!r} of {_owner(model, name)}, {bad} of {size} values (already "
                  "non-finite before this step: restore a checkpoint)")
    else:
        detail = "Every parameter and the minibatch are finite: an activation overflowed inside the network"
    raise FloatingPointError(f"the network output became non-finite{_where(epoch, step)} (Pyro's likelihood refused "
                             f"it); {advice}. {detail}" + ("" if bad_value is not None else _KEPT)) from error


def _rng_state(device: torch.device) -> tuple[Tensor, Optional[Tensor]]:
    """torch's CPU generator state and, for a CUDA model, its device's (what a step's noise is drawn from)."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state: tuple[Tensor, Optional[Tensor]]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def _svi_loss_and_grads(elbo: pyro.infer.ELBO, model: SVIModel, x: Tensor, y: Tensor,
                        full_trace: bool = False) -> tuple[float, list[Tensor], Any]:
    """``SVI.step`` up to the optimizer: the loss, gradients in ``.grad``, the parameters of the trace and (with
    ``full_trace``, else only its param sites) the trace of the model and guide."""
    with pyro.poutine.trace(param_only=not full_trace) as capture:
        loss = elbo.loss_and_grads(model, model.guide, x, y)
    params = {id(p): p for p in (site["value"].unconstrained() for site in capture.trace.nodes.values()
                                 if site["type"] == "param")}
    return float(loss), list(params.values()), capture.trace


# The sample sites of SVIModel's own trace, in order (the plate's subsample site is pruned, as Trace_ELBO does).
_SVIMODEL_SITES = ("out", "obs", "regularizer")


def _is_svimodel_structure(model: SVIModel, trace: Any, params: list[Tensor]) -> bool:
    """Whether a traced step of ``model`` had exactly :class:`SVIModel`'s own structure, so that
    :func:`_direct_loss_and_grads` computes the same ELBO: the class's own methods, nothing that
    :func:`_still_plain` refuses, only the sample sites ``out``, ``obs`` (observed) and ``regularizer``, and one
    param site per trainable parameter of the model (a ``pyro.param`` of the network's own is not one)."""
    cls = type(model)
    if any(getattr(cls, name) is not getattr(SVIModel, name)
           for name in ("__call__", "forward", "guide", "_net_output", "_obs_dist", "_check_batch", "_name_params")):
        return False
    if not _still_plain(model):
        return False
    trace = prune_subsample_sites(trace)
    if any(site["type"] not in ("sample", "param") for site in trace.nodes.values()):
        return False
    sites = tuple(name for name, site in trace.nodes.items() if site["type"] == "sample")
    if sites != _SVIMODEL_SITES or not trace.nodes["obs"]["is_observed"]:
        return False
    return {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _still_plain(model: SVIModel) -> bool:
    """The per-step part of the structure check (cheap): no Pyro module inside the network or likelihood, no
    hooks on the model or global module hooks (calling the model runs them; the untraced step does not call
    it), and no ``forward``/``guide`` set on the instance."""
    from torch.nn.modules import module as torch_module
    if any(getattr(torch_module, name, None) for name in _GLOBAL_HOOKS):
        return False
    if any(getattr(model, name, None) for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                                   "_backward_pre_hooks")):
        return False
    if "forward" in vars(model) or "guide" in vars(model):
        return False
    if any(isinstance(m, PyroModule) for m in model.net.modules()):
        return False
    lik = model.likelihood
    return not (isinstance(lik, nn.Module) and any(isinstance(m, PyroModule) for m in lik.modules()))


def _direct_loss_and_grads(model: SVIModel, x: Tensor, y: Tensor) -> tuple[float, list[Tensor]]:
    """``Trace_ELBO.loss_and_grads`` of :class:`SVIModel`'s own structure, evaluated without Pyro's tracing.

    The same terms as ``Trace_ELBO`` with the empty guide: the observed site's log-likelihood scaled by the
    plate's ``num_data / batch``, plus the ``regularizer`` factor scaled by ``kl_weight`` (masked out at 0), the
    ``out`` site contributing zero; computed in the model's order (network, target check, regularizer, then the
    log-likelihood, as ``Trace.compute_log_prob`` does after the model ran), so the same random draws; the float
    loss summed as Trace_ELBO sums it, with its NaN warning. Only used after :func:`_is_svimodel_structure`
    accepted a traced step and while :func:`_still_plain` holds.
    """
    model._check_batch(x, y)
    out = model._net_output(x, y)
    obs_dist = model._obs_dist(out)
    log_factor = -regularizer(model.net)
    weight = model.kl_weight
    reg = (scale_and_mask(log_factor, weight) if weight > 0 else scale_and_mask(log_factor, 1.0, False)).sum()
    obs = scale_and_mask(obs_dist.log_prob(y), model.num_data / x.shape[0]).sum()
    elbo = 0 + torch_item(obs) + torch_item(reg)
    surrogate = -(obs + reg)
    if surrogate.requires_grad:
        surrogate.backward()
    loss = 0.0 + -elbo
    warn_if_nan(loss, "loss")
    return loss, [p for p in model.parameters() if p.requires_grad]


class SVIStep:
    """One guarded SVI step, the one :func:`fit_svi` takes: ``Trace_ELBO`` gradients, the finiteness check, Adam.

    Use it to write your own loop with :func:`fit_svi`'s behaviour (or to time that step)::

        step = bs.infer.SVIStep(model, lr=1e-3)
        for epoch in range(epochs):
            bs.schedule.on_epoch_start(model.net, epoch, epochs)
            step.lr = 1e-3 * lr_factor(epoch)
            for i, (x, y) in enumerate(loader):
                loss = step(x, y, epoch=epoch, step=i)
                bs.schedule.after_step(model.net, step.lr, model.num_data)

    A call checks the batch, computes the loss and gradients, checks that the loss, every gradient and every
    parameter are finite (else ``FloatingPointError`` naming the epoch, step, parameter and layer, before
    anything is written), then takes one Adam step.

    The first step runs with Pyro's validation as the user has it (distribution arguments, supports, site
    shapes and the model/guide structure, which stay fixed from step to step). Later steps switch Pyro's
    validation off when the likelihood checks every minibatch's targets itself, label ranges included (the
    package's ``"categorical"`` and ``"gaussian"``: ``Likelihood.checks_targets``): the guard above already
    stops at a non-finite output, loss or gradient, and on a LeNet validation was most of the step's Pyro
    overhead (``benchmarks/step_cost.py``). With any other likelihood every step is validated. A step whose loss
    is not finite is run again on the same noise with validation, for the diagnosis (in a single process only).
    Pyro's validation switch is process-wide: other threads running Pyro during a step run unvalidated too.

    ``pyro.optim`` keeps a separate single-tensor Adam (and scheduler) per parameter, which costs about a
    millisecond a step on a LeNet; here one ``torch.optim.Adam`` (fused where every parameter allows it,
    else the default implementation) takes them all, and a parameter that first appears in a later trace
    joins it as a new group. The update of each parameter is Adam's, as before.

    Those unvalidated steps also skip Pyro's tracing when the first traced step with a finite loss showed
    :class:`SVIModel`'s own structure (the class's own methods, the sites ``out``, ``obs`` and ``regularizer``,
    one param site per trainable parameter) and, checked again on every step, no Pyro module inside the network
    or likelihood, no hooks on the model nor global module hooks, no ``forward``/``guide`` set on the instance,
    and no handler of the caller's on Pyro's stack. They evaluate the very terms ``Trace_ELBO`` sums for that
    structure (the observed log-likelihood scaled by ``num_data / batch``, the regularizer factor scaled by
    ``kl_weight``), on the same random draws, back-propagate them and keep the parameters named in Pyro's
    param store. The saving is Pyro's tracing of each step (``benchmarks/step_cost.py``).
    ``direct=False`` (or setting ``step.direct = False`` at any time) traces every step with ``Trace_ELBO``; the
    two give the same losses and parameters (tested for every method). A step whose loss is not finite is
    diagnosed by a traced, validated step as above. The network must not start calling ``pyro.param`` or
    ``pyro.sample`` itself after the first step: the structure is traced once.

    Args:
        model: The :class:`SVIModel`.
        lr: The learning rate of the next steps (set ``step.lr`` to change it).
        direct: Allow the untraced evaluation of the same ELBO described above (default ``True``).

    Attributes:
        optimizer: The ``torch.optim.Adam`` (``None`` before the first step).
        direct: Whether later steps may evaluate the ELBO without Pyro's tracing (read on every step).
        last_step_direct: Whether the last step evaluated the ELBO without Pyro's tracing.
    """

    def __init__(self, model: "SVIModel", lr: float = 1e-3, direct: bool = True) -> None:
        if not isinstance(model, SVIModel):
            raise TypeError(f"model must be a bayes_sparse.SVIModel, got {type(model).__name__}; wrap the network: "
                            "SVIModel(net, num_data=N)")
        self.model = model
        self.lr = check_number(lr, "lr", low=0.0)
        self.optimizer: Optional[torch.optim.Adam] = None
        self._elbo = pyro.infer.Trace_ELBO()
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._known: set[int] = set()
        self._validated = False  # the first step ran with Pyro's validation (see the class docstring)
        self.direct = bool(direct)
        self._structure: Optional[bool] = None  # whether a traced step with a finite loss had SVIModel's own
        self.last_step_direct = False           # structure (None: not decided yet)
        self._store_names: tuple[tuple[int, ...], list[tuple[str, Tensor]]] = ((), [])

    def __call__(self, x: Tensor, y: Tensor, *, epoch: Optional[int] = None, step: Optional[int] = None) -> float:
        """Take one step on the minibatch ``(x, y)``; returns its loss (the negative ELBO estimate)."""
        model = self.model
        advice = f"lower the learning rate (lr={self.lr}) or check the data for NaN/inf"
        _guard_batch(model, (("x", x), ("y", y)), epoch=epoch, step=step, device=self._device)
        checked = self._validated and checks_targets(model.likelihood)
        # a single process can re-run a failed step for the diagnosis; with several ranks a forward or backward
        # on one rank alone would wait forever in a collective (the guard below stops every rank together)
        rerun = checked and not (tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1)
        rng = _rng_state(self._device) if rerun else None
        # later steps of SVIModel's own structure skip Pyro's tracing (same ELBO, see _direct_loss_and_grads),
        # unless a handler of the caller's is on Pyro's stack: it could change the sites
        direct = (self.direct and checked and self._structure is True and not _PYRO_STACK
                  and _still_plain(model))
        try:
            with pyro.validation_enabled(False) if checked else contextlib.nullcontext():
                if direct:
                    loss, params = _direct_loss_and_grads(model, x, y)
                    self._keep_store_names(params)
                else:
                    decide = self.direct and self._structure is None
                    loss, params, trace = _svi_loss_and_grads(self._elbo, model, x, y, full_trace=decide)
                    if decide and math.isfinite(loss):
                        self._structure = _is_svimodel_structure(model, trace, params)
            self.last_step_direct = direct
            if rerun and not math.isfinite(loss):
                # diagnose as a validated step would: the same step on the same noise with Pyro's validation,
                # which refuses a non-finite network output (the error below); nothing has been written yet
                for p in params:
                    p.grad = None
                _set_rng_state(rng)
                with pyro.validation_enabled(True):
                    _svi_loss_and_grads(self._elbo, model, x, y)
            self._validated = True
        except ValueError as e:  # Pyro's validation of the likelihood refused a non-finite network output
            if "found invalid values" not in str(e):
                raise
            _raise_nonfinite_output(model, e, epoch=epoch, step=step, advice=advice)
        store = pyro.get_param_store()
        if any(id(p) not in self._names for p in params):  # a parameter added since: name it too
            self._names = {id(p): n for n, p in model.named_parameters()}
        named = [(self._names.get(id(p)) or store.param_name(p) or "(unnamed)", p) for p in params]
        _guard(model, loss, named, epoch=epoch, step=step, advice=advice)
        self._adam(params)
        return loss

    def _keep_store_names(self, params: list[Tensor]) -> None:
        """What a traced step's ``_name_params`` does for Pyro's param store: each trainable parameter stays
        registered under its name (after ``pyro.clear_param_store()``, or another model of the same name)."""
        ids = tuple(id(p) for p in params)
        if ids != self._store_names[0]:
            model = self.model
            self._store_names = (ids, [(model._param_name(q), p) for q, p in model.named_parameters()
                                       if p.requires_grad])
        for name, p in self._store_names[1]:
            _register_own_param(name, p)

    def _adam(self, params: list[Tensor]) -> None:
        new = [p for p in params if id(p) not in self._known]
        if self.optimizer is None:
            fused = bool(new) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in new)
            self.optimizer = torch.optim.Adam(new, lr=self.lr, fused=fused or None)
        elif new:
            self.optimizer.add_param_group({"params": new})
        self._known.update(id(p) for p in new)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def fit_svi(model: SVIModel, batches: Callable[[], Iterable[tuple[Tensor, Tensor]]], epochs: int, lr: float = 1e-3,
            kl_warmup: Optional[tuple[int, int]] = None, lr_lambda: Optional[Callable[[int], float]] = None,
            progress: bool = True, on_epoch_end: Optional[Callable[[int, dict], None]] = None,
            on_epoch_start: Optional[Callable[[int], None]] = None,
            on_step_end: Optional[Callable[[float], None]] = None) -> list[dict]:
    """Train an :class:`SVIModel` with ``Trace_ELBO`` and one Adam (per-epoch learning rates), guarded against NaN/inf.

    Each step is an :class:`SVIStep` (``pyro.infer.SVI.step``'s work with a check between the gradients and
    the update, and one fused Adam for every parameter): the loss, every
    gradient and every parameter must be finite, else it raises ``FloatingPointError`` naming the epoch,
    the step and the first parameter (and its layer) that went non-finite, before the optimizer writes
    anything: the parameters and Adam's state keep the last good step's values.

    Data parallel: wrap the network, ``SVIModel(DistributedDataParallel(net), num_data=N)``, and give each
    rank its share of the same global batches (:func:`bayes_sparse.distributed.rank_batches`); the
    averaged gradient is the single-process one (see :mod:`bayes_sparse.distributed`), the check runs on
    every rank together, and the reported loss is this rank's (its local batches).

    Before each epoch it runs the sparse layers' schedule hooks (each method's ``warmup`` option ramps its KL
    or penalty in; ``kl_warmup`` adds a model-wide ramp as ``model.kl_weight``) with
    :func:`bayes_sparse.schedule.on_epoch_start`; after each SVI step it runs
    :func:`bayes_sparse.schedule.after_step` with the step's learning rate (proximal L1 steps, LTP
    temperature, magnitude pruning rounds live in those hooks). A plain loop does the same::

        elbo = pyro.infer.Trace_ELBO()(model, model.guide)
        opt = torch.optim.Adam(elbo.parameters(), lr=lr)
        for epoch in range(epochs):
            bs.schedule.on_epoch_start(model.net, epoch, epochs)
            for step, (x, y) in enumerate(loader):
                opt.zero_grad(); loss = elbo(x, y); loss.backward()
                bs.infer.check_finite_(model, loss, step, epoch=epoch)  # optional: the same guard
                opt.step()
                bs.schedule.after_step(model.net, lr, model.num_data)

    Args:
        model: The :class:`SVIModel`; it is put in training mode.
        batches: Called once per epoch; returns an iterable of ``(x, y)`` minibatches (e.g. a DataLoader's
            ``__iter__`` or a function that shuffles tensors).
        epochs: Number of passes.
        lr: Adam learning rate.
        kl_warmup: ``(start, end)`` epochs of a model-wide linear ramp of the KL/penalty weight (see
            :func:`kl_warmup_weight`; the official SparseVD recipe is (5, 20) of 200 epochs), applied as
            ``model.kl_weight`` on top of the layers' own ``warmup`` option; ``None`` (default): weight 1,
            only the layers' hooks ramp.
        lr_lambda: Epoch -> learning-rate factor; default :func:`flat_then_linear_decay`.
        progress: Show a tqdm bar.
        on_epoch_end: Called as ``on_epoch_end(epoch, stats)`` after each epoch.
        on_epoch_start: Called as ``on_epoch_start(epoch)`` after the schedule hooks, before each epoch.
        on_step_end: Called as ``on_step_end(lr)`` after each SVI step and its schedule hooks, with the
            step's learning rate.

    Returns:
        One dict per epoch with ``epoch``, ``loss`` (mean negative ELBO per example), ``kl_weight``, ``lr``.

    Raises:
        TypeError: ``model`` is not an :class:`SVIModel` or ``batches`` is not callable.
        ValueError: bad ``epochs``/``lr``, ``batches()`` yielded nothing, or an empty minibatch.
        FloatingPointError: the loss, a gradient or a parameter of a step is NaN or infinite (the message names
            the epoch, the step and the first non-finite parameter with its layer); the step is not taken.
        RuntimeError: a schedule hook failed (the message names the layer and the hook).

    Example:
        >>> import bayes_sparse as bs
        >>> x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
        >>> model = bs.SVIModel(torch.nn.Sequential(bs.VDLinear(4, 2)), num_data=64)
        >>> history = fit_svi(model, lambda: [(x[:32], y[:32]), (x[32:], y[32:])], epochs=2, progress=False)
        >>> len(history)
        2
    """
    if not isinstance(model, SVIModel):
        raise TypeError(f"model must be a bayes_sparse.SVIModel, got {type(model).__name__}; wrap the network: "
                        "SVIModel(net, num_data=N)")
    if not callable(batches):
        raise TypeError(f"batches must be a callable returning an iterable of (x, y) minibatches, got "
                        f"{type(batches).__name__}; pass e.g. lambda: iter(loader)")
    epochs = check_positive_int(epochs, "epochs")
    lr = check_number(lr, "lr", low=0.0, low_inclusive=False)
    lr_lambda = lr_lambda or flat_then_linear_decay(epochs)
    svi_step = SVIStep(model, lr)
    model.train()
    history = []
    bar = tqdm(range(epochs), desc="SVI", unit="epoch", disable=not progress)
    for epoch in bar:
        model.kl_weight = 1.0 if kl_warmup is None else kl_warmup_weight(epoch, *kl_warmup)
        schedule.on_epoch_start(model.net, epoch, epochs)
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        current_lr = lr * lr_lambda(epoch)
        total, count = 0.0, 0
        svi_step.lr = current_lr
        for x, y in batches():
            loss = svi_step(x, y, epoch=epoch, step=count)
            total += loss
            count += 1
            schedule.after_step(model.net, current_lr, model.num_data)
            if on_step_end is not None:
                on_step_end(current_lr)
        if count == 0:
            raise ValueError("batches() yielded no minibatch; check the data loader")
        stats = {"epoch": epoch, "loss": total / count / model.num_data, "kl_weight": model.kl_weight,
                 "lr": current_lr}
        history.append(stats)
        if on_epoch_end is not None:
            on_epoch_end(epoch, stats)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", kl_w=f"{model.kl_weight:.2f}")
        logger.info("epoch %d: %s", epoch, stats)
    return history
