"""bayes_sparse: Bayesian and regularization sparsification of PyTorch networks.

Swap layers for sparse ones (:class:`VDLinear`, :class:`VDConv2d`, ...), train with Pyro SVI
(:class:`SVIModel`) or a plain loop (``loss = nll + kl(model) / N``), fix hard masks with
:func:`threshold_`, export with :func:`to_dense`, and read the gains with :func:`report`.
"""

from . import data, functional, infer
from .export import to_dense
from .infer import SVIModel, error_rate, fit_svi
from .layers import SparseLayer, VDConv1d, VDConv2d, VDConv3d, VDLinear, sparse_layers
from .objectives import kl
from .report import SparsityReport, report
from .threshold import threshold_

__version__ = "0.1.0"

__all__ = [
    "SVIModel",
    "SparseLayer",
    "SparsityReport",
    "VDConv1d",
    "VDConv2d",
    "VDConv3d",
    "VDLinear",
    "data",
    "error_rate",
    "fit_svi",
    "functional",
    "infer",
    "kl",
    "report",
    "sparse_layers",
    "threshold_",
    "to_dense",
]
