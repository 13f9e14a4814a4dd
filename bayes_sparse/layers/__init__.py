"""Drop-in sparse layers, one file per method family."""

from .base import SparseLayer, sparse_layers
from .l0 import L0Conv1d, L0Conv2d, L0Conv3d, L0Linear
from .l1 import L1Conv1d, L1Conv2d, L1Conv3d, L1Linear, proximal_step_
from .ltp import LTPConv1d, LTPConv2d, LTPConv3d, LTPLinear, set_temperature_, temperature_schedule
from .magnitude import MagnitudeConv1d, MagnitudeConv2d, MagnitudeConv3d, MagnitudeLinear
from .vd import VDConv1d, VDConv2d, VDConv3d, VDLinear

#: method name -> the sparse classes standing in for (Linear, Conv1d, Conv2d, Conv3d)
FAMILIES = {
    "l0": (L0Linear, L0Conv1d, L0Conv2d, L0Conv3d),
    "l1": (L1Linear, L1Conv1d, L1Conv2d, L1Conv3d),
    "ltp": (LTPLinear, LTPConv1d, LTPConv2d, LTPConv3d),
    "magnitude": (MagnitudeLinear, MagnitudeConv1d, MagnitudeConv2d, MagnitudeConv3d),
    "vd": (VDLinear, VDConv1d, VDConv2d, VDConv3d),
}

__all__ = [
    "FAMILIES",
    "L0Conv1d",
    "L0Conv2d",
    "L0Conv3d",
    "L0Linear",
    "L1Conv1d",
    "L1Conv2d",
    "L1Conv3d",
    "L1Linear",
    "LTPConv1d",
    "LTPConv2d",
    "LTPConv3d",
    "LTPLinear",
    "MagnitudeConv1d",
    "MagnitudeConv2d",
    "MagnitudeConv3d",
    "MagnitudeLinear",
    "SparseLayer",
    "VDConv1d",
    "VDConv2d",
    "VDConv3d",
    "VDLinear",
    "proximal_step_",
    "set_temperature_",
    "sparse_layers",
    "temperature_schedule",
]
