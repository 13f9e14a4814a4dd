"""bayes_sparse: Bayesian and regularization sparsification of PyTorch networks.

Swap layers for sparse ones (:class:`VDLinear`, :class:`VDConv2d`, ...), train with Pyro SVI
(:class:`SVIModel`) or a plain loop (``loss = nll + kl(model) / N``), fix hard masks with
:func:`threshold_`, export with :func:`to_dense`, and read the gains with :func:`report`.
"""

from . import data, functional, infer
from .convert import ConversionReport, conversion_report, methods, register, sparsify
from .export import to_dense
from .infer import SVIModel, error_rate, fit_svi
from .layers import SparseLayer, VDConv1d, VDConv2d, VDConv3d, VDLinear, sparse_layers
from .objectives import kl
from .report import SparsityReport, report
from .threshold import threshold_

__version__ = "0.1.0"

__all__ = [
    "ConversionReport",
    "SVIModel",
    "SparseLayer",
    "SparsityReport",
    "VDConv1d",
    "VDConv2d",
    "VDConv3d",
    "VDLinear",
    "conversion_report",
    "data",
    "error_rate",
    "fit_svi",
    "functional",
    "infer",
    "kl",
    "methods",
    "register",
    "report",
    "sparse_layers",
    "sparsify",
    "threshold_",
    "to_dense",
]
