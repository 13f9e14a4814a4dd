"""PyTorch Lightning integration: a callback for the schedules and thresholding, a function for the loss.

Two pieces, because a Lightning ``Callback`` cannot change the loss: ``on_before_backward`` receives the
loss after ``training_step`` built it, and replacing it there is not possible. So:

* :func:`add_regularizer` (``loss + bs.regularizer(net) / N``) is called in your own ``training_step``,
  one visible line, exactly like the plain PyTorch loop;
* :class:`SparsifyCallback` runs everything else: :func:`bayes_sparse.on_epoch_start` at the start of
  each training epoch (warm-up weight, LTP temperature, magnitude pruning rounds),
  :func:`bayes_sparse.after_step` after each optimizer step (proximal L1 step) with the learning rate that
  step used, and :func:`bayes_sparse.threshold_` when training ends.

A ``LightningModule`` mix-in that rewrites ``training_step``'s output was the alternative; it was left out
because it has to guess what the returned value is (a tensor, a dict, ``None`` under manual optimization),
clashes with the user's own ``training_step`` and ``super()`` chains, and hides the objective. The
function works unchanged with automatic and manual optimization, several losses, and any module layout.
To catch a forgotten call, the callback warns on the first optimizer step when a sparse layer's
regularizer did not reach the loss, and raises when it was added with another N.

Gradient accumulation needs nothing more: Lightning divides the returned loss by
``accumulate_grad_batches``, and the callback runs ``after_step`` only on batches that stepped.

Example:
    ::

        import lightning.pytorch as pl
        import bayes_sparse as bs
        from bayes_sparse.integrations.lightning import SparsifyCallback, add_regularizer

        class Lit(pl.LightningModule):
            def __init__(self, net, num_data):
                super().__init__()
                self.net, self.num_data = net, num_data

            def training_step(self, batch, batch_idx):
                x, y = batch
                return add_regularizer(F.cross_entropy(self.net(x), y), self.net, self.num_data)

            def configure_optimizers(self):
                return torch.optim.Adam(self.parameters(), lr=1e-3)

        net = bs.sparsify(mlp, method="vd", warmup=(0.0, 0.5))
        trainer = pl.Trainer(max_epochs=10, callbacks=[SparsifyCallback(num_data=len(train_set))])
        trainer.fit(Lit(net, len(train_set)), train_loader)          # masks fixed when fit returns
        plain = bs.to_dense(net)
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

from ..threshold import threshold_
from ..schedule import on_epoch_start
from ._common import (
    RegularizerCheck,
    ThresholdSpec,
    add_regularizer,
    check_num_data,
    require_sparse_layers,
    resolve_epochs,
    step_hook,
    threshold_kwargs,
)

try:  # the unified package first, the standalone one otherwise
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning import Callback, LightningModule, Trainer
    except ImportError as e:
        raise ImportError("bayes_sparse.integrations.lightning needs PyTorch Lightning: pip install lightning") from e

__all__ = ["SparsifyCallback", "add_regularizer"]


class SparsifyCallback(Callback):
    """Runs the sparse layers' schedules during ``Trainer.fit`` and fixes their masks when it ends.

    The loss itself gets the regularizer from :func:`add_regularizer` in ``training_step`` (see the
    module docstring for why a callback cannot add it). The callback acts on every sparse layer of the
    ``LightningModule``.

    Args:
        num_data: The training set size N (a positive int), the same N given to :func:`add_regularizer`.
        threshold: What to do when training ends: ``True`` (default) runs ``bayes_sparse.threshold_`` with
            each method's own criterion, a dict passes keyword arguments to it (e.g. ``{"sparsity": 0.9}``
            or ``{"log_alpha": 2.0}``), ``False`` leaves the masks unfixed.
        epochs: Number of epochs the schedules span; by default the ``Trainer``'s ``max_epochs`` (required
            when training is limited by ``max_steps`` only).

    Attributes:
        densities: ``{layer_name: density}`` returned by ``threshold_`` at the end of training (empty before).
        epochs: The epoch count the schedules used in the last ``fit`` (``None`` before).

    Raises:
        ValueError: ``num_data`` or ``epochs`` is not a positive int; at the start of ``fit``, a module
            without sparse layers or no epoch count; on the first step, a loss regularized with another N.
        TypeError: ``threshold`` is neither a bool nor a dict of ``threshold_`` keyword arguments.

    Warns:
        UserWarning: at the start of ``fit`` when ``num_data`` differs from the training dataset's length;
            on the first optimizer step when a sparse layer's regularizer did not reach the loss.

    Example:
        >>> cb = SparsifyCallback(num_data=60000, threshold={"sparsity": 0.9})
        >>> cb.num_data, cb.threshold_kwargs
        (60000, {'sparsity': 0.9})
    """

    def __init__(self, num_data: int, *, threshold: ThresholdSpec = True, epochs: Optional[int] = None) -> None:
        super().__init__()
        self.num_data = check_num_data(num_data)
        self.threshold_kwargs = threshold_kwargs(threshold)
        self._epochs_arg = None if epochs is None else resolve_epochs(epochs, None, "SparsifyCallback")
        self.epochs: Optional[int] = None
        self.densities: dict[str, float] = {}
        self._check = RegularizerCheck()
        self._stepped: list[Any] = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        require_sparse_layers(pl_module, "SparsifyCallback")
        max_epochs = trainer.max_epochs
        if self._epochs_arg is None and trainer.max_steps not in (None, -1) and max_epochs in (None, -1):
            max_epochs = None  # limited by steps: the epoch count is unknown
        self.epochs = resolve_epochs(self._epochs_arg, max_epochs, "Trainer(max_epochs=...)")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check.start(pl_module)
        self._stepped = []
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        try:
            n = len(dataset) if dataset is not None else None
        except TypeError:  # an IterableDataset without a length
            n = None
        if n is not None and n != self.num_data:
            warnings.warn(f"SparsifyCallback(num_data={self.num_data}) but the training dataset has {n} examples; "
                          "num_data should be the training set size N (the regularizer is divided by it)",
                          UserWarning, stacklevel=2)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch >= self.epochs:
            raise ValueError(f"epoch {epoch} is past the {self.epochs} epochs the schedules span; pass "
                             "SparsifyCallback(epochs=...) covering the whole run")
        on_epoch_start(pl_module, epoch, self.epochs)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self._check.check(pl_module, self.num_data,
                          "Return add_regularizer(loss, net, num_data) from training_step "
                          "(from bayes_sparse.integrations.lightning import add_regularizer).")
        # the learning rate of this step; step-interval schedulers move it before on_train_batch_end
        self._stepped.append(_LrSnapshot(optimizer))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stepped, self._stepped = self._stepped, []
        for snapshot in stepped:
            step_hook(pl_module, [snapshot], self.num_data)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.threshold_kwargs is not None:
            self.densities = threshold_(pl_module, **self.threshold_kwargs)


class _LrSnapshot:
    """The parameter groups of an optimizer with the learning rates they had when it was taken."""

    def __init__(self, optimizer: Any) -> None:
        self.param_groups = [{"params": list(g["params"]), "lr": g.get("lr")} for g in optimizer.param_groups]
