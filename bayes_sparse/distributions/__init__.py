"""Pyro distributions used by the sparse layers."""

from .hard_concrete import HardConcrete

__all__ = ["HardConcrete"]
