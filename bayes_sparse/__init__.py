"""bayes_sparse: Bayesian and regularization sparsification of PyTorch networks.

Swap layers for sparse ones (by hand, e.g. :class:`VDLinear`, or with :func:`sparsify`), train with Pyro
SVI (:class:`SVIModel`) or a plain loop (``loss = nll + regularizer(model) / N``), fix hard masks with
:func:`threshold_`, export with :func:`to_dense`, and read the gains with :func:`report`.

Methods: ``"vd"`` Sparse Variational Dropout, ``"l0"`` hard-concrete gates, ``"ltp"`` learned-threshold
soft L0, ``"l1"`` L1 penalty (optionally proximal), ``"magnitude"`` magnitude pruning.
"""

from . import data, distributed, distributions, export, functional, infer, integrations, likelihoods
from .convert import ConversionReport, conversion_report, method_class, methods, register, register_method, sparsify
from .export import to_dense
from .infer import SVIModel, SVIStep, check_finite_, error_rate, fit_svi, sampling_mode
from .layers import (
    L0,
    L1,
    LTP,
    VD,
    Magnitude,
    Option,
    L0Conv1d,
    L0Conv2d,
    L0Conv3d,
    L0Linear,
    L1Conv1d,
    L1Conv2d,
    L1Conv3d,
    L1Linear,
    LTPConv1d,
    LTPConv2d,
    LTPConv3d,
    LTPLinear,
    MagnitudeConv1d,
    MagnitudeConv2d,
    MagnitudeConv3d,
    MagnitudeLinear,
    SparseLayer,
    VDConv1d,
    VDConv2d,
    VDConv3d,
    VDLinear,
    proximal_step_,
    set_temperature_,
    sparse_class,
    sparse_layers,
    temperature_schedule,
)
from .objectives import kl, penalty, regularizer
from .report import SparsityReport, report
from .schedule import after_step, on_epoch_start
from .threshold import iterative_magnitude_prune_, sparsity_schedule, threshold_

__version__ = "0.1.0"

__all__ = [
    "ConversionReport",
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
    "SVIModel",
    "SVIStep",
    "SparseLayer",
    "SparsityReport",
    "VD",
    "VDConv1d",
    "VDConv2d",
    "VDConv3d",
    "VDLinear",
    "after_step",
    "check_finite_",
    "conversion_report",
    "data",
    "distributed",
    "distributions",
    "error_rate",
    "export",
    "fit_svi",
    "functional",
    "infer",
    "integrations",
    "iterative_magnitude_prune_",
    "kl",
    "likelihoods",
    "method_class",
    "methods",
    "on_epoch_start",
    "penalty",
    "proximal_step_",
    "register",
    "register_method",
    "regularizer",
    "report",
    "sampling_mode",
    "set_temperature_",
    "sparse_class",
    "sparse_layers",
    "sparsify",
    "sparsity_schedule",
    "temperature_schedule",
    "threshold_",
    "to_dense",
]
