"""Training-framework integrations: PyTorch Lightning and the Hugging Face ``Trainer``.

Each adds the sparse layers' regularizer to the loss with the right 1/N scaling, runs their schedules
(:func:`bayes_sparse.on_epoch_start` each epoch, :func:`bayes_sparse.after_step` each optimizer step)
and fixes the masks with :func:`bayes_sparse.threshold_` when training ends:

* :mod:`bayes_sparse.integrations.lightning`: :class:`~bayes_sparse.integrations.lightning.SparsifyCallback`
  plus :func:`add_regularizer` in ``training_step`` (``pip install lightning``);
* :mod:`bayes_sparse.integrations.hf`: :class:`~bayes_sparse.integrations.hf.SparseTrainer`, a ``Trainer``
  subclass, or :class:`~bayes_sparse.integrations.hf.SparsifyTrainerCallback` for a custom ``Trainer``
  (``pip install transformers accelerate``).

The framework is imported only when its submodule (or one of its names here) is used, so importing this
package needs neither.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._common import add_regularizer

__all__ = ["SparseTrainer", "SparsifyCallback", "SparsifyTrainerCallback", "add_regularizer"]

_LAZY = {"SparsifyCallback": "lightning", "SparseTrainer": "hf", "SparsifyTrainerCallback": "hf"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
