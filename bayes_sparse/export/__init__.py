"""Export of thresholded models: dense twins, physically shrunk models, sparse inference kernels, compressed files, ONNX; checkpoints."""

from .checkpoint import load_checkpoint, save_checkpoint
from .dense import dense_copy, to_dense
from .fileformat import CorruptFileError, FileReport, describe_file, load, load_state_dict, save
from .kernels import DENSE_NATIVE, KERNELS, SparseKernel, compile, kernel_report
from .onnx import to_onnx
from .shrink import ShrinkSummary, shrink

__all__ = [
    "CorruptFileError",
    "FileReport",
    "DENSE_NATIVE",
    "KERNELS",
    "ShrinkSummary",
    "SparseKernel",
    "compile",
    "dense_copy",
    "describe_file",
    "kernel_report",
    "load",
    "load_checkpoint",
    "load_state_dict",
    "save",
    "save_checkpoint",
    "shrink",
    "to_dense",
    "to_onnx",
]
