"""Argument checks shared by the public functions: one place, one wording."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def check_module(model: Any, name: str = "model") -> nn.Module:
    """Raise ``TypeError`` unless ``model`` is an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__} ({model!r:.60}); "
                        "pass the network itself, e.g. bayes_sparse.kl(net)")
    return model


def check_number(value: Any, name: str, *, low: float | None = None, high: float | None = None,
                 low_inclusive: bool = True, hint: str = "") -> float:
    """Return ``value`` as a float after checking it is a finite real number inside the given range."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r:.60}). {hint}".rstrip())
    value = float(value)
    rng = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
    if not low_inclusive and low is not None:
        rng = "(" + rng[1:]
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be a finite number in {rng}, got {value}. {hint}".rstrip())
    if low is not None and (value < low or (not low_inclusive and value == low)):
        raise ValueError(f"{name} must be in {rng}, got {value}. {hint}".rstrip())
    if high is not None and value > high:
        raise ValueError(f"{name} must be in {rng}, got {value}. {hint}".rstrip())
    return value


def check_input_dtype(layer: nn.Module, x: Any, weight: torch.Tensor) -> None:
    """Raise a ``TypeError`` that names the fix when a layer is fed the wrong kind of input."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{type(layer).__name__} expects a torch.Tensor input, got {type(x).__name__}; "
                        "convert with torch.as_tensor(x, dtype=torch.float32)")
    if x.dtype != weight.dtype:
        raise TypeError(f"{type(layer).__name__} got input of dtype {x.dtype} but its weights are {weight.dtype}; "
                        f"convert the data with x.to({weight.dtype}) (images stored as uint8: x.float() / 255) "
                        f"or the model with model.to({weight.dtype})")


def check_positive_int(value: Any, name: str, *, hint: str = "") -> int:
    """Return ``value`` after checking it is an int >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = f" ({hint})" if hint else ""
        raise ValueError(f"{name} must be a positive int{extra}, got {value!r}")
    return value
