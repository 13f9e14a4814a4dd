"""Sparsification methods, one file each; ``Method[nn.Linear]`` is a method's drop-in layer (cached)."""

from .base import COMMON_OPTIONS, Option, SparseLayer, sparse_class, sparse_layers
from .group_l0 import GroupL0, GroupL0Conv1d, GroupL0Conv2d, GroupL0Conv3d, GroupL0Linear
from .group_vd import GroupVD, GroupVDConv1d, GroupVDConv2d, GroupVDConv3d, GroupVDLinear
from .l0 import L0, L0Conv1d, L0Conv2d, L0Conv3d, L0Linear
from .l1 import L1, L1Conv1d, L1Conv2d, L1Conv3d, L1Linear, proximal_step_
from .ltp import LTP, LTPConv1d, LTPConv2d, LTPConv3d, LTPLinear, set_temperature_, temperature_schedule
from .magnitude import Magnitude, MagnitudeConv1d, MagnitudeConv2d, MagnitudeConv3d, MagnitudeLinear
from .vd import VD, VDConv1d, VDConv2d, VDConv3d, VDLinear

#: The methods this package ships, registered by :mod:`bayes_sparse.convert` at import.
BUILTIN_METHODS = (VD, L0, LTP, L1, Magnitude, GroupL0, GroupVD)

__all__ = [
    "BUILTIN_METHODS",
    "COMMON_OPTIONS",
    "GroupL0",
    "GroupL0Conv1d",
    "GroupL0Conv2d",
    "GroupL0Conv3d",
    "GroupL0Linear",
    "GroupVD",
    "GroupVDConv1d",
    "GroupVDConv2d",
    "GroupVDConv3d",
    "GroupVDLinear",
    "L0",
    "L0Conv1d",
    "L0Conv2d",
    "L0Conv3d",
    "L0Linear",
    "L1",
    "L1Conv1d",
    "L1Conv2d",
    "L1Conv3d",
    "L1Linear",
    "LTP",
    "LTPConv1d",
    "LTPConv2d",
    "LTPConv3d",
    "LTPLinear",
    "Magnitude",
    "MagnitudeConv1d",
    "MagnitudeConv2d",
    "MagnitudeConv3d",
    "MagnitudeLinear",
    "Option",
    "SparseLayer",
    "VD",
    "VDConv1d",
    "VDConv2d",
    "VDConv3d",
    "VDLinear",
    "proximal_step_",
    "set_temperature_",
    "sparse_class",
    "sparse_layers",
    "temperature_schedule",
]
