"""Drop-in sparse layers, one file per method family."""

from .base import SparseLayer, sparse_layers
from .vd import VDConv1d, VDConv2d, VDConv3d, VDLinear

__all__ = ["SparseLayer", "VDConv1d", "VDConv2d", "VDConv3d", "VDLinear", "sparse_layers"]
