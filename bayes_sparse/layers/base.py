"""The method protocol every sparse layer follows, the generated layer classes, and model walkers.

A sparsification *method* is one class, a subclass of :class:`SparseLayer`, holding its whole contract:
its options (defaults and validation, :attr:`SparseLayer.options`), its parameters
(:meth:`~SparseLayer.init_parameters`, :meth:`~SparseLayer.init_from_dense`), its objective
(:meth:`~SparseLayer.regularizer`), its pruning criterion (:meth:`~SparseLayer.keep_score`,
:meth:`~SparseLayer.criterion_mask`), its posterior (:meth:`~SparseLayer.posterior_std`) and its schedule
(:meth:`~SparseLayer.on_epoch_start`, :meth:`~SparseLayer.after_step`). The sparse layer for a
(method, torch layer) pair is generated on demand and cached, as ``PyroModule[nn.Linear]`` is:
``VD[nn.Linear]`` is the class ``VDLinear``, a subclass of both ``VD`` and ``nn.Linear``.

Masks, gates and noise reach every reader of a weight: on a sparse layer ``layer.weight`` is a read-only
view computed from the stored parameter (``layer.raw_weight``): in eval the masked (L0: gated) weight the
layer computes with, in training one draw of the method's stochastic weight (:meth:`SparseLayer.sample_weight`:
Sparse VD's multiplicative noise, L0's sampled gates, LTP's soft mask, with the fixed mask). So PyTorch's
fused attention paths, ``F.linear(x, layer.weight)`` and a parent module's own forward see what the
method means, and train it, even where the layer's ``forward`` is never called (``forward`` itself uses
the cheaper local reparameterization where the method has one). This is the route of
``torch.nn.utils.parametrize`` (a property in a generated subclass), chosen over writing zeros into the
weight because it also carries L0's gates, training noise and soft masks, and keeps parameter identity. The ``state_dict`` keeps the torch
layer's keys (``weight`` is the raw parameter), plus the method's parameters, the ``weight_mask`` buffer
and ``_extra_state`` (the method's name, its options and whether the mask is fixed: Python state, so
``forward`` has no control flow on tensors and compiles without graph breaks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_module, check_number

__all__ = ["COMMON_OPTIONS", "SUPPORTED_DENSE_TYPES", "Option", "ParameterHolder", "SparseLayer", "check_weight_dtype", "dense_kwargs", "penalty_alias", "replace_each_",
           "replace_module_", "sparse_class", "sparse_layers", "top_k_mask", "warmup_weight"]

#: The torch layer types a sparse layer can stand in for.
SUPPORTED_DENSE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Option:
    """One option of a method: its default, how a value is checked, and a line of documentation.

    ``check(value, name)`` returns the value to store (normalised) or raises ``TypeError``/``ValueError``
    saying the name, the value and the accepted range.
    """

    default: Any
    check: Callable[[Any, str], Any]
    doc: str = ""


def _check_warmup(value: Any, name: str) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (start, end) of fractions of the training epochs, got {value!r}")
    start = check_number(value[0], f"{name}[0]", low=0.0, high=1.0)
    end = check_number(value[1], f"{name}[1]", low=start, high=1.0,
                       hint="The ramp ends after it starts, e.g. (0.025, 0.1), the official SparseVD recipe.")
    return (start, end)


def warmup_weight(epoch: int, epochs: int, warmup: tuple[float, float]) -> float:
    """Weight of the regularizer at ``epoch`` of ``epochs``: 0 before ``warmup[0]``, linear to 1 at ``warmup[1]``
    (both fractions of ``epochs``), then 1. ``(0, 0)`` means no warm-up."""
    start, end = warmup[0] * epochs, warmup[1] * epochs
    if end <= start:
        return 1.0 if epoch >= start else 0.0
    return min(1.0, max(0.0, (epoch - start) / (end - start)))


#: Options every method has.
COMMON_OPTIONS: dict[str, Option] = {
    "warmup": Option((0.0, 0.0), _check_warmup,
                     "(start, end) fractions of the epochs over which the regularizer's weight ramps from 0 to 1 "
                     "(run by on_epoch_start); (0, 0): no warm-up"),
}


#: ``penalty_strength``, the older name of the ``penalty`` option, for methods that have one.
penalty_alias = property(lambda self: self.penalty, lambda self, value: self.set_options_(penalty=value),
                         doc="Alias of the ``penalty`` option.")


def _expected_weight_shape(layer: nn.Module) -> tuple[int, ...]:
    if isinstance(layer, nn.Linear):
        return (layer.out_features, layer.in_features)
    return (layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)


def _raw(layer: nn.Module) -> Tensor:
    return layer.raw_weight if isinstance(layer, SparseLayer) else layer.weight


def dense_kwargs(layer: nn.Module) -> dict[str, Any]:
    """Constructor arguments that rebuild ``layer``'s geometry (Linear or ConvNd), device and dtype included."""
    w = _raw(layer)
    common = {"bias": layer.bias is not None, "device": w.device, "dtype": w.dtype}
    if isinstance(layer, nn.Linear):
        return {"in_features": layer.in_features, "out_features": layer.out_features, **common}
    if isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed:
        return {
            "in_channels": layer.in_channels, "out_channels": layer.out_channels,
            "kernel_size": layer.kernel_size, "stride": layer.stride, "padding": layer.padding,
            "dilation": layer.dilation, "groups": layer.groups, "padding_mode": layer.padding_mode, **common,
        }
    raise TypeError(f"no dense geometry known for {type(layer).__name__}; supported: "
                    + ", ".join(t.__name__ for t in SUPPORTED_DENSE_TYPES))


def check_weight_dtype(dtype: torch.dtype, where: str) -> None:
    """Refuse float16 weights: the per-weight maths (log alpha, gate probabilities, soft masks, the KL)
    overflows or underflows in float16 and would silently give inf/NaN."""
    if dtype == torch.float16:
        raise TypeError(f"{where}: float16 weights are not supported by the sparse layers (log alpha, gate "
                        "probabilities and the KL overflow in float16); use bfloat16 (model.to(torch.bfloat16)), "
                        "or keep float32 weights and train under torch.autocast(device, dtype=torch.float16)")


def top_k_mask(score: Tensor, k: int) -> Tensor:
    """Boolean mask shaped like ``score`` keeping its ``k`` highest entries."""
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        mask[torch.topk(score.flatten(), k).indices] = True
    return mask.view_as(score)


def global_top_k_masks(scores: "list[Tensor]", sparsity: float) -> "list[Tensor]":
    """Masks shaped like ``scores`` keeping the ``1 - sparsity`` highest entries of all of them ranked together
    (global magnitude pruning, Gale et al. 2019)."""
    flat = torch.cat([s.flatten() for s in scores])
    keep = top_k_mask(flat, flat.numel() - round(sparsity * flat.numel()))
    out, offset = [], 0
    for s in scores:
        out.append(keep[offset:offset + s.numel()].view_as(s))
        offset += s.numel()
    return out


class ParameterHolder(nn.Module):
    """Stand-in "layer" holding one parameter of another module as its ``weight``.

    ``Method[ParameterHolder]`` applies a method to any parameter (``MultiheadAttention.in_proj_weight``,
    LSTM weights, an ``nn.Embedding``, a raw ``nn.Parameter`` passed to ``F.linear``): the owner module reads
    the parameter through a property that returns the holder's ``weight`` view, so the method's noise, gates
    and masks act wherever the owner uses it (see :mod:`bayes_sparse.layers.parameter`).
    """

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        if not isinstance(weight, nn.Parameter):
            raise TypeError(f"ParameterHolder expects an nn.Parameter, got {type(weight).__name__}")
        self.weight = weight

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        raise RuntimeError(f"{type(self).__name__} holds a parameter of its parent module and is not called; "
                           "the parent reads its weight")

    def extra_repr(self) -> str:
        return "shape=" + "x".join(map(str, self._parameters["weight"].shape))


class SparseLayer:
    """Base of every method: the protocol, and what all sparse layers share.

    A method subclasses this and sets :attr:`method` (its registered name), :attr:`options`, and
    implements :meth:`init_parameters`, :meth:`keep_score`, :meth:`criterion_mask` and
    :meth:`regularizer`; it may override :meth:`init_from_dense`, :meth:`posterior_std`,
    :meth:`masked_weight`, :meth:`masked_bias`, :meth:`_forward_train` and the schedule hooks. ``Method[nn.Linear]`` is then
    its drop-in ``nn.Linear`` (same constructor arguments, plus the method's options as keywords).

    Attributes:
        dense_type: The torch class a generated layer stands in for.
        method: Registered name of the method ("vd", ...), used in reports, errors and the state_dict.
        bayesian: True when :meth:`regularizer` is a KL divergence (read by ``kl``), False for a penalty.
        criterion_in_eval: Whether evaluation applies the method's criterion before ``threshold_`` fixes a
            mask: True where the mask is part of the learned model (Sparse VD, L0, LTP), False where pruning
            is a separate decision (L1, magnitude), which then evaluates unpruned until thresholded.
        threshold_name: What ``threshold_(model, threshold=t)`` means for this method (e.g. ``"log_alpha"``),
            or ``None`` when the method prunes by its own learned criterion and takes no threshold.
        threshold_low: Smallest threshold value the method accepts.
        options: Option name -> :class:`Option`; each is an attribute of the layer and travels in the
            ``state_dict``.
        reg_weight: Current weight of the regularizer (the warm-up schedule sets it; 1.0 otherwise).
        mask_fixed: Whether :func:`bayes_sparse.threshold_` has fixed ``weight_mask`` (a Python bool).
    """

    dense_type: ClassVar[type[nn.Module]]
    method: ClassVar[str] = ""
    bayesian: ClassVar[bool] = False
    criterion_in_eval: ClassVar[bool] = True
    threshold_name: ClassVar[Optional[str]] = None
    threshold_low: ClassVar[Optional[float]] = None
    options: ClassVar[dict[str, Option]] = dict(COMMON_OPTIONS)
    #: Further plain attributes (besides the options) saved in the ``state_dict``.
    state_attributes: ClassVar[tuple[str, ...]] = ()

    def __class_getitem__(cls, dense_type: type) -> type:
        return sparse_class(cls, dense_type)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        opts = {k: kwargs.pop(k) for k in list(kwargs) if k in self.options}
        super().__init__(*args, **kwargs)  # the torch layer's own constructor, same arguments
        w = self._parameters["weight"]
        check_weight_dtype(w.dtype, type(self).__name__)
        self.register_buffer("weight_mask", torch.ones(w.shape, dtype=torch.bool, device=w.device))
        self.mask_fixed = False
        self.reg_weight = 1.0
        for name, value in self.check_options(opts, defaults=True).items():
            setattr(self, name, value)
        self.init_parameters()
        self._sparse_ready = True

    # ----- options ---------------------------------------------------------------------------------
    @classmethod
    def check_options(cls, given: dict[str, Any], defaults: bool = False) -> dict[str, Any]:
        """Validate option values (unknown names refused); with ``defaults`` fill in the missing ones."""
        unknown = sorted(set(given) - set(cls.options))
        if unknown:
            raise TypeError(f"method {cls.method!r} has no option(s) {unknown}; accepted: {sorted(cls.options)}")
        out = {name: opt.check(given[name], name) for name, opt in cls.options.items() if name in given}
        if defaults:
            out = {name: out.get(name, opt.default) for name, opt in cls.options.items()}
        return out

    def set_options_(self, **options: Any) -> "SparseLayer":
        """Change options of this layer (validated like the constructor's); returns the layer."""
        for name, value in self.check_options(options).items():
            setattr(self, name, value)
        return self

    # ----- to be provided by a method --------------------------------------------------------------
    def init_parameters(self) -> None:
        """Create the method's parameters and buffers (called by the constructor, options already set)."""

    def init_from_dense(self) -> None:
        """Adjust the method's parameters to freshly copied trained weights (called by :meth:`from_dense`)."""

    def keep_score(self) -> Tensor:
        """Per-weight score, higher means more worth keeping (what thresholding ranks on)."""
        raise NotImplementedError(f"method {self.method!r} does not define keep_score()")

    def criterion_mask(self, threshold: Optional[float] = None) -> Tensor:
        """Boolean mask by the method's own criterion (its default threshold when ``None``)."""
        raise NotImplementedError(f"method {self.method!r} does not define criterion_mask()")

    def regularizer(self) -> Tensor:
        """The layer's KL divergence or penalty in whole-data units, summed over its kept weights."""
        raise NotImplementedError(f"method {self.method!r} does not define regularizer()")

    def posterior_std(self) -> Optional[Tensor]:
        """Per-weight posterior standard deviation (detached), or ``None`` for methods without a posterior."""
        return None

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Schedule hook run by :func:`bayes_sparse.on_epoch_start` before each epoch; sets the warm-up
        weight of the regularizer. Methods extend it (``super().on_epoch_start(...)`` first)."""
        self.reg_weight = warmup_weight(epoch, epochs, self.warmup)

    @classmethod
    def on_epoch_start_model(cls, layers: "list[tuple[str, SparseLayer]]", epoch: int, epochs: int) -> None:
        """Model-level schedule hook, run by :func:`bayes_sparse.on_epoch_start` after every layer's own hook,
        once per method with all of the model's layers of that method (a schedule that needs them together,
        e.g. global magnitude pruning, lives here). By default nothing."""

    def after_step(self, lr: float, num_data: int) -> None:
        """Schedule hook run by :func:`bayes_sparse.after_step` after each optimizer step."""

    def sample_weight(self) -> Tensor:
        """One draw of the training-mode weight, for code that reads ``layer.weight`` instead of calling
        ``forward`` (a parent's fused path, ``F.linear(x, layer.weight)``): the fixed mask applied, and the
        method's noise, gates or soft mask. By default the raw weight with the fixed mask."""
        return self._train_weight()

    def _forward_train(self, x: Tensor) -> Tensor:
        """Training forward; by default the layer's own operation on :meth:`sample_weight`."""
        return self._affine(x, self.sample_weight(), self.bias)

    # ----- helpers for methods ---------------------------------------------------------------------
    def _stats_key(self) -> tuple:
        """Versions of everything a per-step statistic depends on (parameters, buffers, options, mask)."""
        return (*(p._version for p in self._parameters.values() if p is not None),
                *(b._version for b in self._buffers.values() if b is not None),
                *(getattr(self, k) for k in (*self.options, *self.state_attributes)), self.mask_fixed)

    def _keep_for_regularizer(self, value: Tensor) -> None:
        """Remember a regularizer term the training forward computed anyway (see :meth:`_reuse_for_regularizer`)."""
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self._reg_cache = (value, self._stats_key())

    def _reuse_for_regularizer(self) -> Optional[Tensor]:
        """The term kept by the last training forward, once, if no parameter or mask changed since."""
        if torch.compiler.is_compiling():
            return None
        cached = self.__dict__.pop("_reg_cache", None)
        if cached is not None and torch.is_grad_enabled() and cached[1] == self._stats_key():
            return cached[0]
        return None

    def check_threshold(self, threshold: Optional[float], default: float) -> float:
        """``default`` when ``threshold`` is None, else ``threshold`` checked against the method's range."""
        if threshold is None:
            return default
        if self.threshold_name is None:
            raise ValueError(f"method {self.method!r} prunes by its own learned criterion and takes no threshold "
                             f"(got {threshold}); use threshold_(model) or threshold_(model, sparsity=...)")
        return check_number(threshold, f"threshold ({self.threshold_name}) of method {self.method!r}",
                            low=self.threshold_low)

    @property
    def raw_weight(self) -> nn.Parameter:
        """The stored weight parameter (what the optimizer updates and the ``state_dict`` holds as ``weight``)."""
        return self._parameters["weight"]

    def _affine(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """The torch layer's own operation with a substituted weight (padding_mode included)."""
        if isinstance(self, nn.Linear):
            return F.linear(x, weight, bias)
        return self._conv_forward(x, weight, bias)

    def hard_mask(self) -> Tensor:
        """The fixed mask after thresholding; before it, the default criterion's mask (or all ones for methods
        whose :attr:`criterion_in_eval` is False)."""
        if self.mask_fixed:
            return self.weight_mask
        return self.criterion_mask() if self.criterion_in_eval else torch.ones_like(self.weight_mask)

    def masked_weight(self) -> Tensor:
        """The weight evaluation and the dense export use: the raw weight with the hard mask applied."""
        w = self.raw_weight
        if not self.mask_fixed and not self.criterion_in_eval:
            return w
        return w * self.hard_mask().to(w.dtype)

    def masked_bias(self) -> Optional[Tensor]:
        """The bias evaluation and the dense export use (``None`` when the layer has none). By default the
        bias as stored; structured methods (``group_l0``, ``group_vd``) zero the bias of a removed output unit
        and fold their unit scales into it, so a removed unit outputs exactly 0."""
        return getattr(self, "bias", None)

    def _train_weight(self) -> Tensor:
        """The raw weight with the fixed mask applied once thresholding has fixed one."""
        w = self.raw_weight
        return w * self.weight_mask.to(w.dtype) if self.mask_fixed else w

    def _masked_sum(self, per_weight: Tensor) -> Tensor:
        """Sum of a per-weight regularizer over the weights still kept."""
        return (per_weight * self.weight_mask).sum() if self.mask_fixed else per_weight.sum()

    def set_mask_(self, mask: Tensor) -> "SparseLayer":
        """Fix the hard mask (bool, shaped like ``weight``); later forwards in both modes use it."""
        if mask.shape != self.raw_weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape "
                             f"{tuple(self.raw_weight.shape)}")
        with torch.no_grad():
            self.weight_mask.copy_(mask.to(torch.bool))
        self.mask_fixed = True
        return self

    def clear_mask_(self) -> "SparseLayer":
        """Forget a fixed mask: evaluation goes back to the default criterion."""
        with torch.no_grad():
            self.weight_mask.fill_(True)
        self.mask_fixed = False
        return self

    def ranking_score(self) -> Tensor:
        """:meth:`keep_score` (detached, float32) with ``-inf`` where a fixed mask already pruned: what every
        ranking (target sparsities, the min-density guard) uses, so a pruned weight stays pruned."""
        score = self.keep_score().detach().float()
        if self.mask_fixed:
            score = score.masked_fill(~self.weight_mask, float("-inf"))
        return score

    def prune_to_(self, sparsity: float) -> "SparseLayer":
        """Fix a mask keeping the ``1 - sparsity`` highest keep-scores of this layer (pruned weights stay pruned)."""
        sparsity = check_number(sparsity, "sparsity", low=0.0, high=1.0)
        score = self.ranking_score()
        available = int((score > float("-inf")).sum())
        keep = min(available, score.numel() - round(sparsity * score.numel()))
        return self.set_mask_(top_k_mask(score, keep))

    @property
    def density(self) -> float:
        """Fraction of weights kept by :meth:`hard_mask`."""
        m = self.hard_mask()
        return float(m.sum()) / m.numel()

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor input, got {type(x).__name__}; "
                            "convert with torch.as_tensor(x, dtype=torch.float32)")
        w = self.raw_weight
        if w.dtype == torch.float16:
            check_weight_dtype(w.dtype, type(self).__name__)
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"{type(self).__name__} got input of dtype {x.dtype} but its weights are {w.dtype}; "
                            f"convert the data with x.to({w.dtype}) (images stored as uint8: x.float() / 255), "
                            f"the model with model.to({w.dtype}), or run under torch.autocast")
        if self.training:
            return self._forward_train(x)
        return self._affine(x, self.masked_weight(), self.masked_bias())

    # ----- conversion ------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, layer: nn.Module, **options: Any) -> "SparseLayer":
        """Build this sparse layer from a trained torch layer, copying ``weight`` and ``bias``.

        Args:
            layer: An instance of :attr:`dense_type` (not already a sparse layer).
            **options: The method's options (see :attr:`options`); the others take their defaults.

        Returns:
            A new layer on the same device and dtype. ``to_dense`` gives back ``layer``'s exact class.

        Raises:
            TypeError: ``layer`` is not a plain ``dense_type`` instance, or an unknown option.
            ValueError: ``layer.weight``/``layer.bias`` do not have the shapes its attributes imply, or an
                option value out of range.
        """
        opts = cls.check_options(options)
        if isinstance(layer, SparseLayer) or not isinstance(layer, cls.dense_type):
            raise TypeError(f"{cls.__name__}.from_dense expects a torch.nn.{cls.dense_type.__name__}, got "
                            f"{type(layer).__name__}; pick the sparse class matching the layer type")
        expected = _expected_weight_shape(layer)
        if tuple(layer.weight.shape) != expected:
            raise ValueError(f"{type(layer).__name__}.weight has shape {tuple(layer.weight.shape)} but its attributes "
                             f"imply {expected}; fix the layer's weight or its in/out sizes before converting")
        if layer.bias is not None and tuple(layer.bias.shape) != (expected[0],):
            raise ValueError(f"{type(layer).__name__}.bias has shape {tuple(layer.bias.shape)}, expected ({expected[0]},)")
        new = cls(**dense_kwargs(layer), **opts)
        with torch.no_grad():
            new.raw_weight.copy_(layer.weight)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        new.init_from_dense()
        new.train(layer.training)
        new._dense_origin = type(layer)
        return new

    @classmethod
    def from_parameter(cls, param: nn.Parameter, **options: Any) -> "SparseLayer":
        """Apply this method to an existing parameter (``cls`` is ``Method[ParameterHolder]``).

        The holder takes the very ``param`` object as its ``weight`` (so optimizers and ties keep it) and
        adjusts the method's parameters to its trained values.

        Raises:
            TypeError: ``cls`` is not a parameter holder class, ``param`` is not an ``nn.Parameter``, or an
                unknown option.
            ValueError: an option value out of range, or a parameter with fewer than 2 dimensions.
        """
        if cls.dense_type is not ParameterHolder:
            raise TypeError(f"{cls.__name__}.from_parameter: use sparse_class(method, ParameterHolder)")
        opts = cls.check_options(options)
        if not isinstance(param, nn.Parameter) or param.dim() < 2:
            raise ValueError(f"methods apply to weight matrices and kernels (2 or more dimensions); got "
                             f"{type(param).__name__} of shape {tuple(getattr(param, 'shape', ()))}")
        new = cls(param, **opts)
        new.init_from_dense()
        return new

    def dense_parameter(self) -> nn.Parameter:
        """A new plain ``nn.Parameter`` holding the masked weight (what export writes for a held parameter)."""
        raw = self.raw_weight
        return nn.Parameter(self.masked_weight().detach().clone(), requires_grad=raw.requires_grad)

    def to_dense(self) -> nn.Module:
        """The plain torch twin with the masked weights (the class this layer was converted from, if any)."""
        # built without its random initialisation (every value is overwritten below)
        dense = torch.nn.utils.skip_init(getattr(self, "_dense_origin", self.dense_type), **dense_kwargs(self))
        with torch.no_grad():
            dense.weight.copy_(self.masked_weight())
            if self.bias is not None:
                dense.bias.copy_(self.masked_bias())
        dense.train(self.training)
        return dense

    # ----- state -----------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        state = {"method": self.method, "mask_fixed": self.mask_fixed, "reg_weight": self.reg_weight}
        for k in (*self.options, *self.state_attributes):
            v = getattr(self, k)
            state[k] = list(v) if isinstance(v, tuple) else v
        return state

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise RuntimeError(f"{type(self).__name__}: malformed extra state {state!r:.80}")
        method = state.get("method", self.method)
        if method != self.method:
            raise RuntimeError(f"this state_dict holds a {method!r} layer, but {type(self).__name__} is method "
                               f"{self.method!r}; load it into a model sparsified with method={method!r}")
        self.mask_fixed = bool(state.get("mask_fixed", self.mask_fixed))
        self.reg_weight = float(state.get("reg_weight", self.reg_weight))
        for k in self.state_attributes:
            if k in state:
                setattr(self, k, state[k])
        opts = {k: state[k] for k in self.options if k in state}
        for k, v in self.check_options(opts).items():
            setattr(self, k, v)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # state_dicts written before the fixed-mask flag moved to the extra state: a bool buffer "mask_fixed"
        legacy = state_dict.pop(prefix + "mask_fixed", None)
        if prefix + "_extra_state" not in state_dict and (legacy is not None or not strict):
            extra = self.get_extra_state()
            if legacy is not None:
                extra["mask_fixed"] = bool(legacy)
            state_dict[prefix + "_extra_state"] = extra
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state = dict(state) if state is not None else dict(self.__dict__)
        state.pop("_reg_cache", None)  # a per-step value carrying an autograd graph, never part of the model
        return state

    def __reduce_ex__(self, protocol: Any) -> Any:
        if type(self).__dict__.get("_generated"):  # rebuilt through the cache, so on-demand classes pickle too
            return (_new_sparse_layer, (type(self)._method_class, type(self).dense_type), self.__getstate__())
        return super().__reduce_ex__(protocol)

    def extra_repr(self) -> str:  # type: ignore[override]
        return super().extra_repr() + f", method={self.method}"


def _weight_view(self: SparseLayer) -> Tensor:
    """``weight`` as every reader sees it (see the module docstring)."""
    d = self.__dict__
    w = d["_parameters"].get("weight")
    if w is None:
        raise AttributeError("weight")
    if not d.get("_sparse_ready", False) or d.get("_raw_access", False):
        return w
    if self.training:
        return self.sample_weight()
    return self.masked_weight()


_CLASSES: dict[tuple[type, type], type] = {}


def sparse_class(method: type, dense_type: type) -> type:
    """The sparse layer class of ``method`` for ``dense_type`` (generated once, then cached).

    ``method[dense_type]`` is the same call. The class subclasses both, is named ``<Prefix><DenseName>``
    (e.g. ``VDLinear``), pickles by rebuilding through this cache, and reads its weight through the
    masked view.

    Raises:
        TypeError: ``method`` is not a method class or ``dense_type`` is not a supported torch layer type.
    """
    if not (isinstance(method, type) and issubclass(method, SparseLayer)) or "dense_type" in method.__dict__ \
            or method is SparseLayer:
        raise TypeError(f"sparse_class expects a method class (a SparseLayer subclass such as VD), got {method!r}")
    if dense_type not in SUPPORTED_DENSE_TYPES and dense_type is not ParameterHolder:
        raise TypeError(f"method {method.method!r} has no layer for {getattr(dense_type, '__name__', dense_type)}; "
                        f"supported: {', '.join(t.__name__ for t in SUPPORTED_DENSE_TYPES)}")
    key = (method, dense_type)
    if key not in _CLASSES:
        name = getattr(method, "prefix", method.__name__) + dense_type.__name__
        doc = (f"Drop-in ``torch.nn.{dense_type.__name__}`` for method ``{method.method!r}``: same constructor "
               f"arguments, plus the method's options as keywords. See :class:`{method.__module__}."
               f"{method.__qualname__}`.")
        body = {"__module__": method.__module__, "__qualname__": name, "__doc__": doc, "dense_type": dense_type,
                "_generated": True, "_method_class": method, "weight": property(_weight_view)}
        if dense_type is not ParameterHolder:
            body["reset_parameters"] = _reset_parameters
        _CLASSES[key] = type(name, (method, dense_type), body)
    return _CLASSES[key]


def _reset_parameters(self: SparseLayer) -> None:
    """The torch layer's initialisation applied to the raw weight, then the method's parameters anew."""
    self.__dict__["_raw_access"] = True
    try:
        super(type(self)._method_class, self).reset_parameters()
    finally:
        self.__dict__["_raw_access"] = False
    if self.__dict__.get("_sparse_ready", False):
        self.init_parameters()


def _new_sparse_layer(method: type, dense_type: type) -> SparseLayer:
    cls = sparse_class(method, dense_type)
    return cls.__new__(cls)


def sparse_layers(model: nn.Module) -> Iterator[tuple[str, SparseLayer]]:
    """Yield ``(qualified_name, layer)`` for every sparse layer in ``model`` (the root included, named "")."""
    check_module(model)
    for name, module in model.named_modules():
        if isinstance(module, SparseLayer):
            yield name, module


def replace_module_(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the qualified ``name`` inside ``root`` (in place); returns ``new`` when ``name`` is ""."""
    if name == "":
        return new
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
    return root


def replace_each_(root: nn.Module, select: Callable[[str, nn.Module], bool],
                  make: Callable[[str, nn.Module], nn.Module]) -> nn.Module:
    """Replace, in place, every module for which ``select(name, module)`` holds by ``make(name, module)``.

    A module used at several places is made once and stays shared. Returns ``root`` (or its replacement
    when the root itself is selected).
    """
    made: dict[int, nn.Module] = {}
    for name, module in list(root.named_modules(remove_duplicate=False)):
        if select(name, module):
            if id(module) not in made:
                made[id(module)] = make(name, module)
            root = replace_module_(root, name, made[id(module)])
    return root

