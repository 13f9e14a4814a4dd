"""ONNX export of the dense masked model (torch's exporter; pruned weights are stored as zeros)."""

from __future__ import annotations

import os
from typing import Union

import torch
from torch import Tensor, nn

from .._validation import check_module
from .dense import dense_copy

__all__ = ["to_onnx"]


def to_onnx(model: nn.Module, example_input: Tensor, path: Union[str, os.PathLike], opset: int = 18) -> str:
    """Export the dense masked twin of ``model`` (eval mode) to an ONNX file and return its path.

    Args:
        model: A thresholded sparse model or a plain model.
        example_input: One input batch (its batch dimension is exported as dynamic).
        path: Destination ``.onnx`` file.
        opset: ONNX opset version.

    Raises:
        ImportError: the ``onnx``/``onnxscript`` packages are missing (``pip install bayes_sparse[onnx]``).
    """
    check_module(model)
    dense = dense_copy(model)
    dense = dense.eval()  # a copy: the caller's model keeps its mode
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError("ONNX export needs the onnx and onnxscript packages: pip install 'bayes_sparse[onnx]'") from e
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(dense, (example_input,), str(path), opset_version=opset, dynamo=True,
                      dynamic_shapes=({0: batch},), external_data=False)
    return str(path)
