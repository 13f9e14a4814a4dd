"""Export of thresholded models."""

from .dense import to_dense

__all__ = ["to_dense"]
