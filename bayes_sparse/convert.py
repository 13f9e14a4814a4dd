"""Conversion of any model through a type-keyed registry: ``sparsify(model, method="vd", ...)``.

The registry maps ``method -> {torch layer type: converter}``. :func:`register_method` registers a method
class (a :class:`~bayes_sparse.layers.base.SparseLayer` subclass) in one call, for every torch layer type it
supports; :func:`register` adds a single (method, type, converter) entry. Lookup is by exact type, so a
subclass of ``nn.Linear`` that is used by its parent in a special way (e.g. ``MultiheadAttention.out_proj``)
is never swapped silently; register it to opt in.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from torch import nn

from ._validation import check_module
from .layers.base import SUPPORTED_DENSE_TYPES, SparseLayer, check_weight_dtype, replace_each_, sparse_class
from .layers import BUILTIN_METHODS
from .layers import parameter as _param

__all__ = ["ConversionReport", "ParameterRoute", "conversion_report", "method_class", "methods", "register", "register_method",
           "sparsify", "unregister_method"]

logger = logging.getLogger(__name__)

Selector = Union[type, str]
Converter = Callable[..., nn.Module]

_REGISTRY: dict[str, dict[type, Converter]] = {}
_METHODS: dict[str, type[SparseLayer]] = {}


@dataclass(frozen=True)
class ParameterRoute:
    """A converter that applies the method to parameters of the module itself (see
    :mod:`bayes_sparse.layers.parameter`) instead of swapping the module for a drop-in layer.

    Args:
        names: The parameter names (those the module has are taken); ``None``: every own parameter with 2
            or more dimensions.
        prefixes: Also take every own parameter whose name starts with one of these (RNN ``weight_``).
    """

    names: Optional[tuple[str, ...]] = None
    prefixes: tuple[str, ...] = ()

    def names_for(self, module: nn.Module) -> list[str]:
        candidates = _param.weight_parameter_names(module) + list(_param.held_parameters(module))
        if self.names is None and not self.prefixes:
            return candidates
        return [n for n in candidates if n in (self.names or ()) or any(n.startswith(p) for p in self.prefixes)]


#: Modules whose weights a method reaches through the parameter route, for every method class.
PARAMETER_ROUTES: dict[type, ParameterRoute] = {
    nn.MultiheadAttention: ParameterRoute(("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")),
    nn.LSTM: ParameterRoute(prefixes=("weight_",)), nn.GRU: ParameterRoute(prefixes=("weight_",)),
    nn.RNN: ParameterRoute(prefixes=("weight_",)), nn.LSTMCell: ParameterRoute(prefixes=("weight_",)),
    nn.GRUCell: ParameterRoute(prefixes=("weight_",)), nn.RNNCell: ParameterRoute(prefixes=("weight_",)),
    nn.Embedding: ParameterRoute(("weight",)), nn.EmbeddingBag: ParameterRoute(("weight",)),
    nn.ConvTranspose1d: ParameterRoute(("weight",)), nn.ConvTranspose2d: ParameterRoute(("weight",)),
    nn.ConvTranspose3d: ParameterRoute(("weight",)), nn.Bilinear: ParameterRoute(("weight",)),
}
#: Subclasses of the drop-in types that their parents read by ``.weight`` (now safe: readers see the view).
_DROP_IN_SUBCLASSES = {nn.modules.linear.NonDynamicallyQuantizableLinear: nn.Linear}


def register(method: str, dense_type: type, converter: Converter) -> None:
    """Register how ``method`` converts layers of exactly ``dense_type``.

    Args:
        method: Method name, e.g. ``"vd"``.
        dense_type: The torch layer type to convert (matched exactly, not by subclass).
        converter: A :class:`SparseLayer` subclass (its ``from_dense`` is used) or a callable
            ``converter(layer, **method_options) -> nn.Module``.

    Raises:
        TypeError: ``dense_type`` is not an ``nn.Module`` subclass or ``converter`` is not callable.

    Example:
        >>> class MyLinear(nn.Linear): pass
        >>> from bayes_sparse import VDLinear
        >>> register("vd", MyLinear, VDLinear)
    """
    if not (isinstance(dense_type, type) and issubclass(dense_type, nn.Module)):
        raise TypeError(f"dense_type must be an nn.Module subclass, got {dense_type!r}")
    if not (callable(converter) or isinstance(converter, ParameterRoute)):
        raise TypeError(f"converter must be a SparseLayer class, a ParameterRoute or a callable, got {converter!r}")
    _REGISTRY.setdefault(method, {})[dense_type] = converter


def register_method(method: type[SparseLayer], dense_types: Optional[Iterable[type]] = None) -> type[SparseLayer]:
    """Register a method class under its name, for every torch layer type (its sparse layers are generated).

    Args:
        method: A :class:`~bayes_sparse.layers.base.SparseLayer` subclass with a non-empty ``method`` name.
        dense_types: The torch layer types it converts (default: Linear and Conv1d/2d/3d).

    Returns:
        ``method`` (so it can decorate the class).

    Raises:
        TypeError: ``method`` is not a method class.
        ValueError: its name is empty, or taken by another method class.

    Example:
        >>> from bayes_sparse.layers import VD
        >>> register_method(VD) is VD
        True
    """
    if not (isinstance(method, type) and issubclass(method, SparseLayer)) or "dense_type" in method.__dict__:
        raise TypeError(f"register_method expects a method class (a SparseLayer subclass such as "
                        f"bayes_sparse.layers.VD), got {method!r}")
    name = method.method
    if not isinstance(name, str) or not name:
        raise ValueError(f"{method.__name__}.method must be a non-empty name, got {name!r}")
    if _METHODS.get(name, method) is not method:
        raise ValueError(f"method name {name!r} is taken by {_METHODS[name].__qualname__}; choose another name")
    _METHODS[name] = method
    for dense_type in dense_types or SUPPORTED_DENSE_TYPES:
        register(name, dense_type, sparse_class(method, dense_type))
    if dense_types is None:
        for sub, base in _DROP_IN_SUBCLASSES.items():
            register(name, sub, sparse_class(method, base))
        for owner_type, route in PARAMETER_ROUTES.items():
            register(name, owner_type, route)
    return method


def unregister_method(name: str) -> None:
    """Remove a method and all its conversions from the registry (layers already built keep working)."""
    method_class(name)
    del _METHODS[name]
    _REGISTRY.pop(name, None)


def method_class(name: str) -> type[SparseLayer]:
    """The method class registered as ``name`` (raises ``ValueError`` naming the known ones)."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def methods() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_REGISTRY)


for _method in BUILTIN_METHODS:
    register_method(_method)


def _convert_fn(converter: Converter) -> Callable[..., nn.Module]:
    if isinstance(converter, ParameterRoute):
        raise TypeError("a ParameterRoute is applied by sparsify, not called")
    return converter.from_dense if isinstance(converter, type) and issubclass(converter, SparseLayer) else converter


def _accepted_options(converter: Converter) -> Optional[set[str]]:
    """Keyword options a converter accepts (None when it takes **kwargs)."""
    if isinstance(converter, type) and issubclass(converter, SparseLayer):
        return set(converter.options)
    if isinstance(converter, ParameterRoute):
        return None
    params = list(inspect.signature(_convert_fn(converter)).parameters.values())[1:]  # skip the layer
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _check_selectors(selectors: Optional[Iterable[Selector]], arg: str) -> list[Selector]:
    if selectors is None:
        return []
    if isinstance(selectors, (str, type)):
        selectors = [selectors]
    out = list(selectors)
    for s in out:
        if not (isinstance(s, str) or (isinstance(s, type) and issubclass(s, nn.Module))):
            raise TypeError(f"{arg} entries must be module types, names or name patterns, got {s!r}")
    return out


def _matches(selector: Selector, name: str, module: nn.Module) -> bool:
    """A type matches instances; a string matches the module's name or an ancestor's, exactly or as a glob."""
    if isinstance(selector, type):
        return isinstance(module, selector)
    parts = name.split(".") if name else [""]
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(p, selector) for p in prefixes)


@dataclass(frozen=True)
class ConversionReport:
    """What :func:`sparsify` converted and what it left as it was. ``print()`` it for a table.

    ``converted`` lists drop-in layers (``"fc1"``) and held parameters (``"attn.in_proj_weight"``); ``kept``
    lists the modules with weight parameters (2+ dimensions) that no method controls, with the reason.
    ``weights``/``controlled`` count the elements of all weight parameters (each shared one once) and of
    those a method controls; :attr:`coverage` is their ratio.
    """

    converted: tuple[tuple[str, str, str], ...]  # (name, original type, sparse type)
    kept: tuple[tuple[str, str, str], ...]  # (name, type, reason)
    weights: int = 0
    controlled: int = 0

    @property
    def coverage(self) -> float:
        """Fraction of weight-parameter elements under a method's control (1.0 for a model without weights)."""
        return self.controlled / self.weights if self.weights else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"converted": [dict(zip(("name", "from", "to"), r)) for r in self.converted],
                "kept": [dict(zip(("name", "type", "reason"), r)) for r in self.kept],
                "weights": self.weights, "controlled": self.controlled, "coverage": self.coverage}

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} layer(s) or parameter(s):"]
        lines += [f"  {n or '(root)'}: {a} -> {b}" for n, a, b in self.converted]
        lines.append(f"left as they were {len(self.kept)} layer(s) with weights:")
        lines += [f"  {n or '(root)'}: {t} ({why})" for n, t, why in self.kept]
        lines.append(f"weights under a method: {self.controlled:,} of {self.weights:,} ({100 * self.coverage:.1f}%)")
        return "\n".join(lines)


def conversion_report(model: nn.Module) -> ConversionReport:
    """List the sparse layers and held parameters of ``model``, and the modules with weights left dense.

    Every reader of a converted weight (the layer's forward, a parent's fused path, ``F.linear`` on
    ``module.weight``, a tied module) sees the method's view of it, so a converted weight is under the
    method's control wherever it is used.

    Example:
        >>> m = sparsify(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
        >>> len(conversion_report(m).converted), conversion_report(m).kept[0][1]
        (1, 'BatchNorm1d')
    """
    check_module(model)
    converted, kept = [], []
    seen: set[int] = set()
    weights = controlled = 0
    for name, m in model.named_modules():
        if isinstance(m, SparseLayer):
            if m.dense_type is not _param.ParameterHolder:
                converted.append((name, getattr(m, "_dense_origin", m.dense_type).__name__, type(m).__name__))
            w = m.raw_weight
            if id(w) not in seen:
                seen.add(id(w))
                weights, controlled = weights + w.numel(), controlled + w.numel()
            continue
        for pname, holder in _param.held_parameters(m).items():
            converted.append((f"{name}.{pname}" if name else pname, type(m)._sparse_owner_base.__name__,
                              type(holder).__name__))
        own = [p for p in m._parameters.values() if p is not None and p.dim() >= 2 and id(p) not in seen]
        for p in own:
            seen.add(id(p))
            weights += p.numel()
        if own or (_has_own_params(m) and not _param.is_owner(m)):
            registered = type(m) in _all_registered_types()
            reason = "excluded or not selected" if registered else "no conversion registered"
            kept.append((name, type(m).__name__, reason))
    return ConversionReport(tuple(converted), tuple(kept), weights, controlled)


def _has_own_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False))


def _all_registered_types() -> set[type]:
    return {t for table in _REGISTRY.values() for t in table}


def _route_shared(model: nn.Module, method: str, method_cls: Optional[type], drop_in: list[str],
                  by_params: dict[str, list[str]]) -> tuple[list[str], dict[str, list[str]]]:
    """Tied parameters: every module holding one must take the parameter route (one holder, one mask);
    refuse when a place sharing it is not being converted."""
    places: dict[int, list[tuple[str, str]]] = {}
    for name, m in model.named_modules():
        for pname, p in m._parameters.items():
            if p is not None:
                places.setdefault(id(p), []).append((name, pname))
    targeted = {(name, "weight") for name in drop_in}
    targeted |= {(name, n) for name, names in by_params.items() for n in names}
    drop_in = list(drop_in)
    for name in list(drop_in):
        p = model.get_submodule(name)._parameters.get("weight")
        if p is not None and len(places.get(id(p), [])) > 1:
            if method_cls is None:
                raise ValueError(f"{name}.weight is tied to {_where(places[id(p)], name)}; method {method!r} has no "
                                 "method class to share one mask between them (register_method)")
            drop_in.remove(name)
            by_params.setdefault(name, []).append("weight")
    for name, names in by_params.items():
        m = model.get_submodule(name)
        for n in names:
            for other in places.get(id(m._parameters[n]), []):
                if other not in targeted and other[0] not in by_params:
                    raise ValueError(
                        f"{name + '.' if name else ''}{n} is the same parameter as {other[0] or '(root)'}.{other[1]}, "
                        f"which is not being converted: sparsifying one would untie them. Convert both (include "
                        f"both modules, or drop the exclude) or untie them first")
                if other not in targeted:
                    by_params[other[0]].append(other[1])
                    targeted.add(other)
    return drop_in, by_params


def _where(places: list[tuple[str, str]], skip: str) -> str:
    return ", ".join(f"{n or '(root)'}.{p}" for n, p in places if n != skip)


def sparsify(model: nn.Module, method: str = "vd", include: Optional[Sequence[Selector]] = None,
             exclude: Optional[Sequence[Selector]] = None, inplace: bool = False, generic: bool = True,
             **method_options: Any) -> nn.Module:
    """Swap every supported layer of ``model`` for its sparse twin, copying the pretrained weights.

    Args:
        model: Any module (a torchvision network, a user model, or a single layer).
        method: Registered method name (see :func:`methods`).
        include: Only convert modules matching one of these: module types, qualified names or glob
            patterns (``"features.*"``); a name also selects everything below it. ``None`` selects all.
        exclude: Never convert modules matching one of these (same forms); wins over ``include``.
        inplace: Change ``model`` itself (returned) instead of a deep copy.
        generic: Also apply the method to the weight parameters (2+ dimensions) of modules with no
            registered conversion (e.g. Hugging Face's ``Conv1D``, a module calling ``F.linear`` on its own
            ``nn.Parameter``), through the parameter route. Attention, recurrent, embedding and transposed
            convolution layers always take that route.
        **method_options: Passed to the method's converter, e.g. ``init_log_sigma2=-10.0`` for ``"vd"``.

    Returns:
        The converted model. :func:`conversion_report` lists what was converted and what was left.

    Raises:
        TypeError: ``model`` is not a module; an option the method does not accept (the accepted ones are
            listed); a layer explicitly included by name or type whose conversion is not registered.
        ValueError: unknown method; an ``include``/``exclude`` entry that matches nothing; a model with no
            supported layers.

    Example:
        >>> net = sparsify(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), exclude=["2"])
        >>> [type(m).__name__ for m in net]
        ['VDLinear', 'ReLU', 'Linear']
    """
    check_module(model)
    if method not in _REGISTRY:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(methods())}")
    table = _REGISTRY[method]
    include_l, exclude_l = _check_selectors(include, "include"), _check_selectors(exclude, "exclude")
    named = list(model.named_modules(remove_duplicate=False))  # a shared layer is listed at each of its places
    for arg, sel_list in (("include", include_l), ("exclude", exclude_l)):
        for s in sel_list:
            if not any(_matches(s, n, m) for n, m in named):
                sample = ", ".join(repr(n) for n, _ in named[1:13]) + (" ..." if len(named) > 13 else "")
                raise ValueError(f"{arg} entry {s!r} matches no module of {type(model).__name__}; "
                                 f"module names are: {sample}")
    for opt_owner in {table[t] for t in table}:
        accepted = _accepted_options(opt_owner)
        unknown = set(method_options) - accepted if accepted is not None else set()
        if unknown:
            raise TypeError(f"method {method!r} has no option(s) {sorted(unknown)}; accepted: {sorted(accepted)}")

    method_cls = _METHODS.get(method)
    drop_in: list[str] = []
    by_params: dict[str, list[str]] = {}
    for name, m in named:
        if isinstance(m, (SparseLayer, _param.ParameterHolder)):
            continue
        if exclude_l and any(_matches(s, name, m) for s in exclude_l):
            continue
        explicit = [s for s in include_l if _matches(s, name, m)]
        if include_l and not explicit:
            continue
        converter = table.get(type(m))
        if isinstance(converter, ParameterRoute) or (converter is None and generic and method_cls is not None):
            route = converter if converter is not None else ParameterRoute()
            names = [n for n in route.names_for(m) if n not in _param.held_parameters(m)]
            if names:
                by_params[name] = names
                continue
            if converter is not None:
                continue
        if converter is not None:
            drop_in.append(name)
        elif _has_own_params(m) and any((isinstance(s, type) and type(m) is s) or (isinstance(s, str) and s == name)
                                        for s in explicit):
            raise TypeError(f"{name!r} ({type(m).__name__}) was explicitly included but method {method!r} has no "
                            f"conversion for {type(m).__name__}; supported: "
                            f"{', '.join(t.__name__ for t in table)}. Register one with bayes_sparse.register(...)")
    drop_in, by_params = _route_shared(model, method, method_cls, drop_in, by_params)
    for name in drop_in:
        check_weight_dtype(model.get_submodule(name).weight.dtype, f"sparsify: layer {name or '(root)'!r}")
    for name, names in by_params.items():
        for n in names:
            check_weight_dtype(model.get_submodule(name)._parameters[n].dtype,
                               f"sparsify: parameter {(name + '.' if name else '') + n!r}")
    targets = drop_in + list(by_params)
    if not targets:
        found = sorted({type(m).__name__ for _, m in named if _has_own_params(m)})
        raise ValueError(f"no layer of {type(model).__name__} can be converted by method {method!r} with the given "
                         f"include/exclude; layers with weights found: {found or 'none'}; supported: "
                         f"{', '.join(t.__name__ for t in table)}")

    out = model if inplace else copy.deepcopy(model)
    memo: dict[int, SparseLayer] = {}
    for name, names in by_params.items():
        _param.attach_(out.get_submodule(name), names, method_cls, method_options, memo)
    chosen = set(drop_in)
    out = replace_each_(out, lambda name, _: name in chosen,
                        lambda _, layer: _convert_fn(table[type(layer)])(layer, **method_options))
    logger.info("sparsify(%s): converted %d layer(s)", method, len(targets))
    return out
