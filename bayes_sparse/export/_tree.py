"""The module-tree recipe: a tree of standard torch modules (``nn.Sequential`` of Linear, Conv, ReLU,
pooling, Flatten ...) described as JSON (type name and constructor arguments), and rebuilt from such a
description on the meta device, refusing anything it does not know.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn

from ._spec import NODE_COST, CorruptFileError

__all__ = ["ARGUMENTS", "SPECS", "build", "count_nodes", "describe", "recordable"]

#: Deepest nesting of ``nn.Sequential`` that :func:`build` accepts.
MAX_DEPTH = 64


def _attrs(*names: str) -> Callable[[nn.Module], dict[str, Any]]:
    fn = lambda m: {n: _jsonable(getattr(m, n)) for n in names}  # noqa: E731
    fn.names = names  # type: ignore[attr-defined]
    return fn


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


_CONV_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias",
              "padding_mode")


def _conv(m: nn.Module) -> dict[str, Any]:
    return {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": list(m.kernel_size),
            "stride": list(m.stride), "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
            "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None,
            "padding_mode": m.padding_mode}


_conv.names = _CONV_ARGS  # type: ignore[attr-defined]


def _linear(m: nn.Module) -> dict[str, Any]:
    return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}


_linear.names = ("in_features", "out_features", "bias")  # type: ignore[attr-defined]


_MAXPOOL = ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")
_AVGPOOL = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
#: The recordable module types and, for each, its constructor arguments as JSON values.
SPECS: dict[type, Callable[[nn.Module], dict[str, Any]]] = {
    nn.Linear: _linear,
    **{c: _conv for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d)},
    nn.ReLU: _attrs("inplace"), nn.ReLU6: _attrs("inplace"), nn.Tanh: _attrs(), nn.Sigmoid: _attrs(),
    nn.GELU: _attrs("approximate"), nn.Identity: _attrs(), nn.Dropout: _attrs("p"),
    nn.Flatten: _attrs("start_dim", "end_dim"), nn.Unflatten: _attrs("dim", "unflattened_size"),
    nn.Softmax: _attrs("dim"), nn.LogSoftmax: _attrs("dim"),
    nn.MaxPool1d: _attrs(*_MAXPOOL), nn.MaxPool2d: _attrs(*_MAXPOOL), nn.AvgPool2d: _attrs(*_AVGPOOL),
    nn.AdaptiveAvgPool2d: _attrs("output_size"),
    **{c: _attrs("num_features", "eps", "momentum", "affine", "track_running_stats")
       for c in (nn.BatchNorm1d, nn.BatchNorm2d)},
}
_BY_NAME = {c.__name__: c for c in SPECS}
#: The constructor arguments :func:`build` takes from a file, per type: those :func:`describe` writes, never
#: ``device`` or ``dtype``.
ARGUMENTS: dict[str, frozenset] = {c.__name__: frozenset(f.names)  # type: ignore[attr-defined]
                                   for c, f in SPECS.items()}


def describe(module: nn.Module) -> Optional[dict[str, Any]]:
    """JSON description of a tree of standard modules.

    Args:
        module: Any module.

    Returns:
        ``{"type": "Sequential", "children": [...]}`` or ``{"type": name, "kwargs": {...}}``; ``None`` when
        some module in the tree is neither an ``nn.Sequential`` nor of a type in :data:`SPECS` (exactly,
        not a subclass), or is one of those types but has children.
    """
    if type(module) is nn.Sequential:
        children = [describe(c) for c in module]
        return None if any(c is None for c in children) else {"type": "Sequential", "children": children}
    spec = SPECS.get(type(module))
    if spec is None or any(True for _ in module.children()):
        return None
    return {"type": type(module).__name__, "kwargs": spec(module)}


def recordable(module: nn.Module, state: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The description of ``module`` if it rebuilds to exactly its state dict, else None.

    :func:`describe` looks at module types only; a module may also hold tensors of its own (a buffer
    registered on an ``nn.Sequential``, a parameter of an unusual dtype kind). A file records the tree only
    when the rebuilt tree has the same keys, shapes and dtype kinds (floating point, or exactly the integer
    dtype), so that every recorded tree loads.

    Args:
        module: The model to save.
        state: Its state dict.

    Returns:
        The description, or None.
    """
    node = describe(module)
    if node is None:
        return None
    try:
        rebuilt = build(node).state_dict()
    except CorruptFileError:
        return None
    if list(rebuilt) != list(state):
        return None
    for k, t in rebuilt.items():
        s = state[k]
        if tuple(t.shape) != tuple(s.shape) or (t.is_floating_point() != s.is_floating_point()) or (
                not t.is_floating_point() and t.dtype != s.dtype):
            return None
    return node


def _is_argument(v: Any) -> bool:
    """A constructor argument as :func:`describe` writes them: a JSON scalar or a list of numbers/None."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return not isinstance(v, str) or len(v) <= 64
    return isinstance(v, list) and len(v) <= 16 and all(x is None or type(x) in (int, float) for x in v)


def count_nodes(node: Any, limit: int) -> int:
    """Modules in a description, counted without building any (iteratively, so any nesting is safe).

    Args:
        node: The (untrusted) description.
        limit: Stop counting beyond this many.

    Returns:
        The count, or ``limit + 1`` if there are more than ``limit``.
    """
    count, stack = 0, [node]
    while stack:
        n = stack.pop()
        count += 1
        if count > limit:
            return count
        if isinstance(n, dict) and isinstance(n.get("children"), list):
            stack.extend(n["children"])
    return count


def build(node: Any, depth: int = 0, budget: Optional[list[int]] = None) -> nn.Module:
    """Rebuild a tree described by :func:`describe`, on the meta device (no memory until weights are assigned).

    Args:
        node: The (untrusted) description, as decoded from a file's header.
        depth: Nesting depth of ``node`` (for the recursion limit).
        budget: One-element list of elements the file may still use, or None for no limit: each module
            costs :data:`~bayes_sparse.export._spec.NODE_COST` (counted before any is built) plus the
            elements of its parameters and buffers.

    Returns:
        The module tree, its parameters and buffers on the meta device.

    Raises:
        CorruptFileError: a malformed entry, an unknown type or argument (``device`` and ``dtype`` are
            never taken from a file), nesting deeper than :data:`MAX_DEPTH`, more modules or elements than
            ``budget`` allows, or arguments the module's constructor refuses.
    """
    if budget is not None and depth == 0:
        allowed = max(budget[0], 0) // NODE_COST
        nodes = count_nodes(node, allowed)
        if nodes > allowed:
            raise CorruptFileError(f"the module tree has more than {allowed} modules, beyond max_numel (each costs "
                                   f"{NODE_COST} elements); pass a larger max_numel if the model really has them")
        budget[0] -= nodes * NODE_COST
    if depth > MAX_DEPTH or not isinstance(node, dict) or not isinstance(node.get("type"), str):
        raise CorruptFileError(f"malformed module entry in the header: {str(node)[:80]}")
    unknown = set(node) - {"type", "children", "kwargs"}
    if unknown:
        raise CorruptFileError(f"malformed module entry in the header: unknown field {sorted(unknown)[0]!r}")
    if node["type"] == "Sequential":
        children = node.get("children", [])
        if not isinstance(children, list):
            raise CorruptFileError("malformed Sequential entry in the header: children is not a list")
        return nn.Sequential(*[build(c, depth + 1, budget) for c in children])
    cls = _BY_NAME.get(node["type"])
    if cls is None:
        raise CorruptFileError(f"unknown module type {node['type']!r} in the header")
    kwargs = node.get("kwargs", {})
    if not isinstance(kwargs, dict) or "children" in node:
        raise CorruptFileError(f"malformed arguments for {node['type']}")
    bad = sorted(k for k, v in kwargs.items() if k not in ARGUMENTS[node["type"]] or not _is_argument(v))
    if bad:
        raise CorruptFileError(f"cannot build {node['type']} from the header's arguments: {bad[0]!r} is not one of "
                               f"its recorded arguments {sorted(ARGUMENTS[node['type']])} or not of their form")
    try:
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Initializing zero-element tensors is a no-op"
            module = cls(**kwargs)
    except (TypeError, ValueError, RuntimeError, OverflowError, ZeroDivisionError) as e:
        raise CorruptFileError(f"cannot build {node['type']} from the header's arguments {kwargs}: {e}") from e
    if budget is not None:
        budget[0] -= sum(t.numel() for t in [*module.parameters(), *module.buffers()])
        if budget[0] < 0:
            raise CorruptFileError(f"the module tree's {node['type']} takes the file beyond max_numel elements; pass "
                                   "a larger max_numel if the model really is that big")
    return module
