"""The module-tree recipe: a tree of standard torch modules (``nn.Sequential`` of Linear, Conv, ReLU,
pooling, Flatten ...) described as JSON (type name and constructor arguments), and rebuilt from such a
description on the meta device, refusing anything it does not know.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from ._spec import CorruptFileError

__all__ = ["SPECS", "build", "describe"]

#: Deepest nesting of ``nn.Sequential`` that :func:`build` accepts.
MAX_DEPTH = 64


def _attrs(*names: str) -> Callable[[nn.Module], dict[str, Any]]:
    return lambda m: {n: _jsonable(getattr(m, n)) for n in names}


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _conv(m: nn.Module) -> dict[str, Any]:
    return {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": list(m.kernel_size),
            "stride": list(m.stride), "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
            "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None,
            "padding_mode": m.padding_mode}


_MAXPOOL = ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")
_AVGPOOL = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
#: The recordable module types and, for each, its constructor arguments as JSON values.
SPECS: dict[type, Callable[[nn.Module], dict[str, Any]]] = {
    nn.Linear: lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None},
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


def build(node: Any, depth: int = 0) -> nn.Module:
    """Rebuild a tree described by :func:`describe`, on the meta device (no memory until weights are assigned).

    Args:
        node: The (untrusted) description, as decoded from a file's header.
        depth: Nesting depth of ``node`` (for the recursion limit).

    Returns:
        The module tree, its parameters and buffers on the meta device.

    Raises:
        CorruptFileError: a malformed entry, an unknown type, nesting deeper than :data:`MAX_DEPTH`, or
            arguments the module's constructor refuses.
    """
    if depth > MAX_DEPTH or not isinstance(node, dict) or not isinstance(node.get("type"), str):
        raise CorruptFileError(f"malformed module entry in the header: {str(node)[:80]}")
    if node["type"] == "Sequential":
        children = node.get("children", [])
        if not isinstance(children, list):
            raise CorruptFileError("malformed Sequential entry in the header: children is not a list")
        return nn.Sequential(*[build(c, depth + 1) for c in children])
    cls = _BY_NAME.get(node["type"])
    if cls is None:
        raise CorruptFileError(f"unknown module type {node['type']!r} in the header")
    kwargs = node.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise CorruptFileError(f"malformed arguments for {node['type']}")
    try:
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        with torch.device("meta"):
            return cls(**kwargs)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise CorruptFileError(f"cannot build {node['type']} from the header's arguments {kwargs}: {e}") from e
