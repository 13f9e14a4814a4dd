"""The protocol every sparse layer follows, and helpers to walk a model's sparse layers.

A sparse layer is a subclass of the torch layer it replaces (``nn.Linear``, ``nn.Conv2d``, ...) mixed
with :class:`SparseLayer`. It keeps the torch layer's constructor, attributes and ``state_dict`` keys
(``weight``, ``bias``), adds its own parameters (e.g. ``log_sigma2``) and two buffers:

* ``weight_mask`` (bool, shaped like ``weight``): the hard mask fixed by thresholding;
* ``mask_fixed`` (bool scalar): whether ``weight_mask`` has been fixed. Until it is, evaluation uses the
  method's own default criterion (for Sparse VD: ``log alpha < 3``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_input_dtype, check_module

__all__ = ["SUPPORTED_DENSE_TYPES", "HyperparameterState", "SparseLayer", "dense_kwargs", "replace_each_",
           "replace_module_", "sparse_layers"]

#: The torch layer types a sparse layer can stand in for, in the order their subclasses are searched.
SUPPORTED_DENSE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _expected_weight_shape(layer: nn.Module) -> tuple[int, ...]:
    if isinstance(layer, nn.Linear):
        return (layer.out_features, layer.in_features)
    return (layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)


def dense_kwargs(layer: nn.Module) -> dict[str, Any]:
    """Constructor arguments that rebuild ``layer``'s geometry (Linear or ConvNd), device and dtype included."""
    common = {"bias": layer.bias is not None, "device": layer.weight.device, "dtype": layer.weight.dtype}
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


class SparseLayer:
    """Mixin holding what all sparse layers share. Subclasses implement :meth:`keep_score`,
    :meth:`criterion_mask`, :meth:`regularizer` and the training-mode :meth:`_forward_train`.

    Attributes:
        dense_type: The torch class this layer stands in for (set automatically from the bases).
    """

    dense_type: type[nn.Module]
    #: Name of the method family ("vd", ...), used in reports and error messages.
    method: str = ""
    #: True when :meth:`regularizer` is a KL divergence (read by ``kl``), False for a penalty (``penalty``).
    bayesian: bool = False
    #: Whether evaluation applies the method's criterion before ``threshold_`` fixes a mask: True where the
    #: mask is part of the learned model (Sparse VD's log alpha, L0's gates, LTP's threshold), False where
    #: pruning is a separate decision (L1, magnitude), which then evaluates unpruned until thresholded.
    criterion_in_eval: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in cls.__mro__:
            if base in SUPPORTED_DENSE_TYPES:
                cls.dense_type = base
                break

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # the torch layer's own constructor, same arguments
        w = self.weight
        self.register_buffer("weight_mask", torch.ones(w.shape, dtype=torch.bool, device=w.device))
        self.register_buffer("mask_fixed", torch.zeros((), dtype=torch.bool, device=w.device))
        self._init_method_parameters()

    # ----- to be provided by a method family -------------------------------------------------------
    def _init_method_parameters(self) -> None:
        raise NotImplementedError

    def keep_score(self) -> Tensor:
        """Per-weight score, higher means more worth keeping (what thresholding ranks on)."""
        raise NotImplementedError

    def criterion_mask(self, threshold: float | None = None) -> Tensor:
        """Boolean mask by the method's own criterion (default threshold when ``None``)."""
        raise NotImplementedError

    def regularizer(self) -> Tensor:
        """The layer's KL divergence or penalty, summed over its weights (a scalar tensor)."""
        raise NotImplementedError

    def posterior_std(self) -> Tensor | None:
        """Per-weight posterior standard deviation, for methods with a posterior (else ``None``)."""
        return None

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Schedule hook, called by :func:`bayes_sparse.on_epoch_start` before each epoch."""

    def after_step(self, lr: float, num_data: int) -> None:
        """Schedule hook, called by :func:`bayes_sparse.after_step` after each optimizer step."""

    def _forward_train(self, x: Tensor) -> Tensor:
        """Training forward; by default the layer's own operation on the (fixed-mask) weight."""
        return self._affine(x, self._train_weight(), self.bias)

    # ----- shared behaviour ------------------------------------------------------------------------
    def _affine(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The torch layer's own operation with a substituted weight (padding_mode included)."""
        if isinstance(self, nn.Linear):
            return F.linear(x, weight, bias)
        return self._conv_forward(x, weight, bias)

    def hard_mask(self) -> Tensor:
        """The fixed mask after thresholding; before it, the default criterion's mask (or all ones for methods
        whose :attr:`criterion_in_eval` is False)."""
        if bool(self.mask_fixed):
            return self.weight_mask
        return self.criterion_mask() if self.criterion_in_eval else torch.ones_like(self.weight_mask)

    def masked_weight(self) -> Tensor:
        """The weight evaluation and the dense export use: ``weight`` with the hard mask applied."""
        return self.weight * self.hard_mask().to(self.weight.dtype)

    def _train_weight(self) -> Tensor:
        """``weight`` with the fixed mask applied once thresholding has fixed one."""
        return self.weight * self.weight_mask if bool(self.mask_fixed) else self.weight

    def _masked_sum(self, per_weight: Tensor) -> Tensor:
        """Sum of a per-weight regularizer over the weights still kept."""
        return (per_weight * self.weight_mask).sum() if bool(self.mask_fixed) else per_weight.sum()

    def set_mask_(self, mask: Tensor) -> "SparseLayer":
        """Fix the hard mask (bool, shaped like ``weight``); later forwards in both modes use it."""
        if mask.shape != self.weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(self.weight.shape)}")
        with torch.no_grad():
            self.weight_mask.copy_(mask.to(torch.bool))
            self.mask_fixed.fill_(True)
        return self

    def clear_mask_(self) -> "SparseLayer":
        """Forget a fixed mask: evaluation goes back to the default criterion."""
        with torch.no_grad():
            self.weight_mask.fill_(True)
            self.mask_fixed.fill_(False)
        return self

    @property
    def density(self) -> float:
        """Fraction of weights kept by :meth:`hard_mask`."""
        m = self.hard_mask()
        return float(m.sum()) / m.numel()

    def forward(self, x: Tensor) -> Tensor:
        check_input_dtype(self, x, self.weight)
        if self.training:
            return self._forward_train(x)
        return self._affine(x, self.masked_weight(), self.bias)

    @classmethod
    def from_dense(cls, layer: nn.Module) -> "SparseLayer":
        """Build this sparse layer from a trained torch layer, copying ``weight`` and ``bias``.

        Method families override this to add their own keyword-only initialisation options.

        Args:
            layer: An instance of :attr:`dense_type` (not already a sparse layer).

        Returns:
            A new layer on the same device and dtype. ``to_dense`` gives back ``layer``'s exact class.

        Raises:
            TypeError: ``layer`` is not a plain ``dense_type`` instance.
            ValueError: ``layer.weight``/``layer.bias`` do not have the shapes its attributes imply.
        """
        return cls._copy_from_dense(layer)

    @classmethod
    def _copy_from_dense(cls, layer: nn.Module) -> "SparseLayer":
        if isinstance(layer, SparseLayer) or not isinstance(layer, cls.dense_type):
            raise TypeError(f"{cls.__name__}.from_dense expects a torch.nn.{cls.dense_type.__name__}, got "
                            f"{type(layer).__name__}; pick the sparse class matching the layer type")
        expected = _expected_weight_shape(layer)
        if tuple(layer.weight.shape) != expected:
            raise ValueError(f"{type(layer).__name__}.weight has shape {tuple(layer.weight.shape)} but its attributes "
                             f"imply {expected}; fix the layer's weight or its in/out sizes before converting")
        if layer.bias is not None and tuple(layer.bias.shape) != (expected[0],):
            raise ValueError(f"{type(layer).__name__}.bias has shape {tuple(layer.bias.shape)}, expected ({expected[0]},)")
        new = cls(**dense_kwargs(layer))
        with torch.no_grad():
            new.weight.copy_(layer.weight)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        new.train(layer.training)
        new._dense_origin = type(layer)
        return new

    def to_dense(self) -> nn.Module:
        """The plain torch twin with the masked weights (the class this layer was converted from, if any)."""
        dense = getattr(self, "_dense_origin", self.dense_type)(**dense_kwargs(self))
        with torch.no_grad():
            dense.weight.copy_(self.masked_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        dense.train(self.training)
        return dense

    def extra_repr(self) -> str:  # type: ignore[override]
        return super().extra_repr() + f", method={self.method}"


class HyperparameterState:
    """Mixin: saves the plain-attribute hyperparameters named in ``hyperparameters`` in the ``state_dict``
    (as ``<layer>._extra_state``), so a checkpoint restores the objective, not just the tensors."""

    hyperparameters: tuple[str, ...] = ()

    def get_extra_state(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.hyperparameters}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        for k in self.hyperparameters:
            if k in state:
                setattr(self, k, state[k])


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
