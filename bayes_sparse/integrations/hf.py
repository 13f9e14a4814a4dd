"""Hugging Face ``Trainer`` integration: a ``Trainer`` subclass for the loss, a callback for the rest.

* :class:`SparseTrainer` is a ``transformers.Trainer`` whose ``compute_loss`` adds
  ``bs.regularizer(model) / N`` to the model's loss in training (N = the training set size,
  ``len(train_dataset)`` by default; the Hugging Face loss is a mean over the batch). Evaluation losses stay
  the plain data loss. It adds a :class:`SparsifyTrainerCallback` itself.
* :class:`SparsifyTrainerCallback` runs :func:`bayes_sparse.on_epoch_start` at each epoch's start (warm-up
  weight, LTP temperature, magnitude pruning rounds), :func:`bayes_sparse.after_step` right after each
  optimizer step with the learning rate that step used (before the scheduler moves it), and
  :func:`bayes_sparse.threshold_` at the end of training (after ``load_best_model_at_end`` loaded the
  best checkpoint).

Why a subclass for the loss: a ``TrainerCallback`` never sees the loss, and ``compute_loss_func`` replaces
the model's own loss (and receives no model). ``SparseTrainer`` only calls ``super().compute_loss`` and
adds the term, so it composes with your own ``Trainer`` subclass: ``class MyTrainer(SparseTrainer,
MyBaseTrainer)``.

Gradient accumulation: the ``Trainer`` divides a per-batch mean loss by the accumulation steps, but not a
loss the model already normalised over the whole accumulated batch (models taking ``num_items_in_batch``,
or a ``compute_loss_func``); the regularizer follows the same rule, so every optimizer step sees it once.

Example:
    ::

        import bayes_sparse as bs
        from bayes_sparse.integrations.hf import SparseTrainer

        model = bs.sparsify(model, method="vd", warmup=(0.0, 0.5))     # forward returns {"loss", "logits"}
        trainer = SparseTrainer(model=model, args=TrainingArguments(output_dir="out", num_train_epochs=5),
                                train_dataset=train_set)              # num_data = len(train_set)
        trainer.train()                                               # masks fixed when train() returns
        plain = bs.to_dense(model)
"""

from __future__ import annotations

import math
from typing import Any, Optional

from torch import nn

from ..schedule import on_epoch_start
from ..threshold import threshold_
from ._common import (
    RegularizerCheck,
    ThresholdSpec,
    add_regularizer,
    check_num_data,
    regularize,
    require_sparse_layers,
    resolve_epochs,
    step_hook,
    threshold_kwargs,
)

try:
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # pragma: no cover - depends on what is installed
    raise ImportError("bayes_sparse.integrations.hf needs Hugging Face transformers: "
                      "pip install transformers accelerate") from e

__all__ = ["SparseTrainer", "SparsifyTrainerCallback", "add_regularizer"]


class SparsifyTrainerCallback(TrainerCallback):
    """Runs the sparse layers' schedules during ``Trainer.train`` and fixes their masks when it ends.

    :class:`SparseTrainer` adds one itself. With a plain ``Trainer``, add this callback and put the
    regularizer into the loss yourself (:func:`add_regularizer` in an overridden ``compute_loss``).

    Args:
        num_data: The training set size N (a positive int), the N the loss divides the regularizer by.
        threshold: What to do when training ends: ``True`` (default) runs ``bayes_sparse.threshold_`` with
            each method's own criterion, a dict passes keyword arguments to it (e.g. ``{"sparsity": 0.9}``),
            ``False`` leaves the masks unfixed.
        epochs: Number of epochs the schedules span; by default the epochs the ``Trainer`` plans
            (``ceil(num_train_epochs)``, or what ``max_steps`` amounts to).

    Attributes:
        densities: ``{layer_name: density}`` returned by ``threshold_`` at the end of training (empty before).
        epochs: The epoch count the schedules used in the last run (``None`` before).

    Raises:
        ValueError: ``num_data`` or ``epochs`` is not a positive int; when training starts, a model without
            sparse layers or no finite epoch count (an iterable dataset without ``epochs``); on the first
            step, a loss regularized with another N.
        TypeError: ``threshold`` is neither a bool nor a dict of ``threshold_`` keyword arguments.

    Warns:
        UserWarning: on the first optimizer step, when a sparse layer's regularizer did not reach the loss.

    Example:
        >>> cb = SparsifyTrainerCallback(num_data=60000, threshold={"sparsity": 0.9})
        >>> cb.num_data
        60000
    """

    def __init__(self, num_data: int, *, threshold: ThresholdSpec = True, epochs: Optional[int] = None) -> None:
        self.num_data = check_num_data(num_data)
        self.threshold_kwargs = threshold_kwargs(threshold)
        self._epochs_arg = None if epochs is None else resolve_epochs(epochs, None, "SparsifyTrainerCallback")
        self.epochs: Optional[int] = None
        self.densities: dict[str, float] = {}
        self._check = RegularizerCheck()

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None,
                       **kwargs: Any) -> None:
        require_sparse_layers(_model(model), "SparsifyTrainerCallback")
        self.epochs = resolve_epochs(self._epochs_arg, state.num_train_epochs, "the Trainer")
        self._check.start(model)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None,
                       **kwargs: Any) -> None:
        epoch = int(math.floor(state.epoch + 1e-6))  # state.epoch: epochs done, a fraction when resumed mid-epoch
        if epoch >= self.epochs:
            raise ValueError(f"epoch {epoch} is past the {self.epochs} epochs the schedules span; pass "
                             "SparsifyTrainerCallback(epochs=...) covering the whole run")
        on_epoch_start(_model(model), epoch, self.epochs)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None,
                              **kwargs: Any) -> None:
        self._check.check(_model(model), self.num_data,
                          "Train with bayes_sparse.integrations.hf.SparseTrainer, or add "
                          "add_regularizer(loss, model, num_data) in your compute_loss.")

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None,
                          optimizer: Any = None, **kwargs: Any) -> None:
        # called right after optimizer.step(), before the scheduler moves the learning rate
        if optimizer is not None:
            step_hook(_model(model), [optimizer], self.num_data)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None,
                     **kwargs: Any) -> None:
        if self.threshold_kwargs is not None:
            self.densities = threshold_(_model(model), **self.threshold_kwargs)


def _model(model: Optional[nn.Module]) -> nn.Module:
    if model is None:
        raise ValueError("the Trainer passed no model to the callback; build the Trainer with model=...")
    return model


class SparseTrainer(Trainer):
    """A ``transformers.Trainer`` that trains a sparsified model: regularized loss, schedules, thresholding.

    Same arguments as ``Trainer``, plus the keywords below. ``compute_loss`` returns the model's loss plus
    ``bs.regularizer(model) / num_data`` while the model is in training mode (evaluation reports the data
    loss alone); a :class:`SparsifyTrainerCallback` runs the schedules and thresholds when training ends.

    Args:
        *args: Passed to ``transformers.Trainer``.
        num_data: The training set size N; default ``len(train_dataset)`` (read when ``train()`` starts, so
            a dataset set after construction counts). Required for datasets without a length.
        threshold: As in :class:`SparsifyTrainerCallback`: ``True`` (each method's criterion), a dict of
            ``threshold_`` keyword arguments, or ``False``.
        epochs: As in :class:`SparsifyTrainerCallback` (default: the epochs the ``Trainer`` plans).
        **kwargs: Passed to ``transformers.Trainer``.

    Attributes:
        sparse_callback: The :class:`SparsifyTrainerCallback` it added (its ``densities`` after training).

    Raises:
        ValueError: ``num_data`` not a positive int; when ``train()`` starts, no ``num_data`` and a training
            dataset without a length, or a model without sparse layers.
        TypeError: a bad ``threshold``.

    Example:
        ::

            trainer = SparseTrainer(model=net, args=args, train_dataset=train_set, threshold={"sparsity": 0.9})
            trainer.train()
            trainer.sparse_callback.densities      # {'fc1': 0.1, 'fc2': 0.1}
    """

    def __init__(self, *args: Any, num_data: Optional[int] = None, threshold: ThresholdSpec = True,
                 epochs: Optional[int] = None, **kwargs: Any) -> None:
        checked = None if num_data is None else check_num_data(num_data)
        super().__init__(*args, **kwargs)
        self._num_data_arg = checked
        # num_data is filled in by train(); 1 is a placeholder that nothing reads before
        self.sparse_callback = SparsifyTrainerCallback(checked or 1, threshold=threshold, epochs=epochs)
        self.add_callback(self.sparse_callback)

    @property
    def num_data(self) -> int:
        """The training set size N the regularizer is divided by."""
        if self._num_data_arg is not None:
            return self._num_data_arg
        dataset = self.train_dataset
        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            n = None
        if not n:
            raise ValueError(f"SparseTrainer needs the training set size N to scale the regularizer, and the "
                             f"train_dataset ({type(dataset).__name__}) has no length; pass "
                             "SparseTrainer(..., num_data=N)")
        return n

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train`` after fixing N from ``num_data`` or ``len(train_dataset)``."""
        self.sparse_callback.num_data = self.num_data
        return super().train(*args, **kwargs)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Optional[Any] = None) -> Any:
        """The ``Trainer``'s loss, plus ``bs.regularizer(model) / N`` (per optimizer step) in training."""
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        # Trainer.training_step divides the loss by the accumulation steps unless it is already normalised
        # over the accumulated batch; scale the regularizer the same way so each optimizer step sees it once
        steps = self._ga_steps() if self._loss_is_scaled_for_ga(num_items_in_batch) else 1
        loss = regularize(loss, model, self.sparse_callback.num_data, steps)
        return (loss, outputs) if return_outputs else loss

    def _loss_is_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        # mirrors Trainer.training_step (transformers 5); older releases lack loss_is_scaled_for_ga
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return bool(explicit)
        return bool((getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                    or getattr(self, "compute_loss_func", None) is not None)

    def _ga_steps(self) -> int:
        return int(getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps)

