"""Units of a layer for the structured methods (``group_l0``, ``group_vd``): one scale or gate per unit.

A unit is an output neuron / output channel (``"out"``: dimension 0 of the weight) or an input feature /
input channel (``"in"``). For a grouped convolution the weight holds ``in_channels / groups`` input
positions per output channel; input channel ``g * (in_channels / groups) + j`` meets output channels of group
``g`` only, at position ``j``. These helpers map a per-unit vector to weight shape and back, and to the
shape that multiplies a batch of activations (one value per example and unit).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["UNITS", "channel_view", "check_unit", "num_units", "per_example", "reduce_to_units", "to_weight", "unit_alive"]

#: The accepted values of the ``unit`` option.
UNITS = ("out", "in")


def check_unit(value: object, name: str) -> str:
    """Validate the ``unit`` option: ``"out"`` (output neurons/channels) or ``"in"`` (input features/channels)."""
    if value not in UNITS:
        raise ValueError(f"{name} must be 'out' (one gate per output neuron/channel) or 'in' (one per input "
                         f"feature/channel), got {value!r}")
    return str(value)


def _groups(layer: nn.Module) -> int:
    return int(getattr(layer, "groups", 1))


def num_units(layer: nn.Module, unit: str) -> int:
    """How many units ``layer`` has: output rows, or input features/channels (``in_channels`` for convolutions)."""
    w = layer._parameters["weight"]
    return w.shape[0] if unit == "out" else w.shape[1] * _groups(layer)


def to_weight(layer: nn.Module, v: Tensor, unit: str) -> Tensor:
    """The per-unit vector ``v`` broadcast (materialized) to the weight's shape."""
    w = layer._parameters["weight"]
    tail = (1,) * (w.dim() - 2)
    if unit == "out":
        return v.view(-1, *((1,) * (w.dim() - 1))).expand(w.shape)
    g = _groups(layer)
    out, in_g = w.shape[0], w.shape[1]
    per_row = v.view(g, 1, in_g).expand(g, out // g, in_g).reshape(out, in_g)
    return per_row.view(out, in_g, *tail).expand(w.shape)


def reduce_to_units(layer: nn.Module, t: Tensor, unit: str, op: Callable[..., Tensor] = torch.sum) -> Tensor:
    """Reduce a weight-shaped tensor to one value per unit with ``op(t, dim)`` (``torch.sum``, ``torch.any``)."""
    if unit == "out":
        return op(t.reshape(t.shape[0], -1), dim=1)
    g = _groups(layer)
    out, in_g = t.shape[0], t.shape[1]
    t = t.reshape(g, out // g, in_g, -1).transpose(1, 2).reshape(g, in_g, -1)  # (groups, in_g, out_g * k)
    return op(t, dim=2).reshape(-1)


def unit_alive(layer: nn.Module, mask: Tensor, unit: str) -> Tensor:
    """Per unit: whether any of its weights is kept by the boolean weight-shaped ``mask``."""
    return reduce_to_units(layer, mask, unit, torch.any)


def per_example(v: Tensor, like: Tensor, layer: nn.Module) -> tuple[int, ...]:
    """Shape of one value per example and unit for activations ``like`` (the unit axis holds ``v.numel()``).

    Linear: the last axis is the unit axis and every other index is an example (a token of a sequence is
    one). Convolutions: (N, C, *spatial) or unbatched (C, *spatial): one value per example and channel,
    shared over the positions, since the unit's weights are shared over them.
    """
    if isinstance(layer, nn.Linear):
        return tuple(like.shape)
    nsp = layer._parameters["weight"].dim() - 2
    return tuple(like.shape[: like.dim() - nsp]) + (1,) * nsp


def channel_view(v: Tensor, like: Tensor, layer: nn.Module) -> Tensor:
    """A per-unit vector shaped to broadcast over activations ``like`` on their unit axis."""
    if isinstance(layer, nn.Linear):
        return v
    nsp = layer._parameters["weight"].dim() - 2
    return v.view(-1, *((1,) * nsp))
