"""A method on any parameter of any module: the route for layers without a drop-in sparse twin.

``nn.MultiheadAttention.in_proj_weight``, LSTM/GRU/RNN weights, ``nn.Embedding``, ``nn.ConvTranspose*d``,
Hugging Face's ``Conv1D`` or a raw ``nn.Parameter`` that a module hands to ``F.linear`` are all read by their
module as ``self.<name>``. :func:`attach_` moves such a parameter into a holder (``Method[ParameterHolder]``,
stored in the module's ``sparse_params`` dict) and swaps the module's class for a generated subclass in
which ``<name>`` is a property returning the holder's ``weight`` view: in training one draw of the
method's stochastic weight, in eval the masked weight. This is the mechanism of
``torch.nn.utils.parametrize``; the parameter object itself is kept, so optimizers and ties keep working,
and a parameter shared by several modules (tied embeddings) gets one holder, one mask, one set of
variational parameters. :func:`detach_` undoes it, writing the masked weight back (re-tied).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from torch import nn

from .base import ParameterHolder, SparseLayer, sparse_class

__all__ = ["attach_", "detach_", "held_parameters", "is_owner", "weight_parameter_names"]

_OWNER_CLASSES: dict[tuple[type, frozenset], type] = {}
HOLDERS = "sparse_params"


def _getter(name: str):
    def get(self: nn.Module):
        return self._modules[HOLDERS][name].weight
    get.__name__ = name
    return get


def _setter(name: str):
    def set_(self: nn.Module, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__}.{name} is sparsified (held in .{HOLDERS}[{name!r}]); change "
                             f".{HOLDERS}[{name!r}].raw_weight in place, or export with bayes_sparse.to_dense first")
    return set_


def _owner_reduce(self: nn.Module, protocol: Any) -> Any:
    cls = type(self)
    state = self.__getstate__()
    if "_flat_weights" in state:  # RNNs: views (possibly with a graph) are recomputed after unpickling
        state = dict(state, _flat_weights=[None if n in cls._sparse_param_names else w
                                           for n, w in zip(self._flat_weights_names, state["_flat_weights"])])
    return (_new_owner, (cls._sparse_owner_base, cls._sparse_param_names), state)


def _owner_setstate(self: nn.Module, state: dict) -> None:
    type(self)._sparse_owner_base.__setstate__(self, state)
    if hasattr(self, "_init_flat_weights"):
        self._init_flat_weights()


def _new_owner(base: type, names: frozenset) -> nn.Module:
    cls = _owner_class(base, names)
    return cls.__new__(cls)


def _owner_class(base: type, names: frozenset) -> type:
    key = (base, names)
    if key not in _OWNER_CLASSES:
        body: dict[str, Any] = {n: property(_getter(n), _setter(n)) for n in sorted(names)}
        body.update({"__module__": base.__module__, "__qualname__": f"Sparse{base.__qualname__}",
                     "_sparse_owner_base": base, "_sparse_param_names": names, "__reduce_ex__": _owner_reduce,
                     "__setstate__": _owner_setstate})
        _OWNER_CLASSES[key] = type(f"Sparse{base.__name__}", (base,), body)
    return _OWNER_CLASSES[key]


def is_owner(module: nn.Module) -> bool:
    """Whether some parameters of ``module`` are held by sparse holders (its class was swapped)."""
    return "_sparse_owner_base" in type(module).__dict__


def held_parameters(module: nn.Module) -> dict[str, SparseLayer]:
    """``{parameter name: holder}`` of an owner module (empty for any other module)."""
    if not is_owner(module):
        return {}
    return dict(module._modules[HOLDERS].items())


def weight_parameter_names(module: nn.Module) -> list[str]:
    """Names of ``module``'s own parameters with 2 or more dimensions (weight matrices and kernels)."""
    return [n for n, p in module._parameters.items() if p is not None and p.dim() >= 2]


def attach_(module: nn.Module, names: Iterable[str], method: type, options: dict[str, Any],
            memo: Optional[dict[int, SparseLayer]] = None) -> nn.Module:
    """Put the parameters ``names`` of ``module`` (in place) under ``method``; returns ``module``.

    Args:
        module: Any module whose forward reads the parameters as ``self.<name>``.
        names: Own parameter names of ``module`` (2+ dimensions).
        method: A method class (e.g. ``VD``).
        options: The method's options.
        memo: ``id(parameter) -> holder``: a parameter met again (tied to another module) reuses its holder.

    Raises:
        ValueError: a name that is not an own parameter of ``module``.
    """
    memo = {} if memo is None else memo
    names = [n for n in names if n not in held_parameters(module)]
    for n in names:
        if module._parameters.get(n) is None:
            raise ValueError(f"{type(module).__name__} has no parameter {n!r}; its parameters: "
                             f"{sorted(k for k, v in module._parameters.items() if v is not None)}")
    if not names:
        return module
    held = held_parameters(module)
    holder_cls = sparse_class(method, ParameterHolder)
    if HOLDERS not in module._modules:
        module._modules[HOLDERS] = nn.ModuleDict()
    for n in names:
        param = module._parameters.pop(n)
        if id(param) not in memo:
            memo[id(param)] = holder_cls.from_parameter(param, **options)
        module._modules[HOLDERS][n] = memo[id(param)]
        held[n] = memo[id(param)]
    base = type(module)._sparse_owner_base if is_owner(module) else type(module)
    module.__class__ = _owner_class(base, frozenset(held))
    if hasattr(module, "_init_flat_weights"):  # RNNs cache their weights in a list
        module._init_flat_weights()
    return module


def detach_(module: nn.Module, memo: Optional[dict[int, nn.Parameter]] = None) -> nn.Module:
    """Undo :func:`attach_` in place: plain class, plain parameters holding the masked weights.

    ``memo`` (``id(holder) -> exported parameter``) re-ties parameters that were tied before.
    """
    if not is_owner(module):
        return module
    memo = {} if memo is None else memo
    holders = module._modules.pop(HOLDERS)
    module.__class__ = type(module)._sparse_owner_base
    for n, holder in holders.items():
        if id(holder) not in memo:
            memo[id(holder)] = holder.dense_parameter()
        module._parameters[n] = memo[id(holder)]
    if hasattr(module, "_init_flat_weights"):
        module._init_flat_weights()
    return module
