"""Training schedules run through the methods' hooks: one call per epoch, one per optimizer step.

Every sparse layer carries its method's schedule (regularizer warm-up, LTP temperature annealing, the
proximal L1 step, iterative magnitude rounds) as hooks; a training loop only calls these two functions:

    for epoch in range(epochs):
        bs.on_epoch_start(net, epoch, epochs)
        for x, y in batches:
            loss = F.cross_entropy(net(x), y) + bs.regularizer(net) / N
            opt.zero_grad(); loss.backward(); opt.step()
            bs.after_step(net, lr, N)
"""

from __future__ import annotations

from torch import nn

from ._validation import check_module, check_number, check_positive_int
from .layers.base import sparse_layers

__all__ = ["after_step", "on_epoch_start"]


def _call(name: str, layer, hook: str, *args) -> None:
    try:
        getattr(layer, hook)(*args)
    except Exception as e:  # name the layer, the method and the hook, keep the original as the cause
        raise RuntimeError(f"the {hook} hook of method {layer.method!r} failed on layer {name or '(root)'!r} "
                           f"({type(layer).__name__}): {type(e).__name__}: {e}") from e


def on_epoch_start(model: nn.Module, epoch: int, epochs: int) -> nn.Module:
    """Run every sparse layer's ``on_epoch_start(epoch, epochs)`` hook; call it before each epoch.

    Args:
        model: The model being trained.
        epoch: The epoch about to start, 0-based, in ``[0, epochs)``.
        epochs: The total number of epochs of the run (schedules are fractions of it).

    Returns:
        ``model``.

    Raises:
        ValueError: ``epoch`` or ``epochs`` out of range.
        RuntimeError: a hook failed; the message names the layer, the method and the hook.
    """
    check_module(model)
    epochs = check_positive_int(epochs, "epochs")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch < epochs:
        raise ValueError(f"epoch must be an int in [0, {epochs}) (0-based, below epochs={epochs}), got {epoch!r}")
    by_hook: dict = {}
    for name, layer in sparse_layers(model):  # a shared layer once
        _call(name, layer, "on_epoch_start", epoch, epochs)
        hook = type(layer).on_epoch_start_model  # one call per hook function, with every layer that has it
        by_hook.setdefault(getattr(hook, "__func__", hook), (hook, []))[1].append((name, layer))
    for hook, layers in by_hook.values():  # model-level schedules (global magnitude rounds)
        try:
            hook(layers, epoch, epochs)
        except Exception as e:
            raise RuntimeError(f"the model-level on_epoch_start hook of method {layers[0][1].method!r} failed on "
                               f"layers {[n or '(root)' for n, _ in layers]}: {type(e).__name__}: {e}") from e
    return model


def after_step(model: nn.Module, lr: float, num_data: int) -> nn.Module:
    """Run every sparse layer's ``after_step(lr, num_data)`` hook; call it right after ``optimizer.step()``.

    Args:
        model: The model being trained.
        lr: The learning rate of the step just taken (>= 0).
        num_data: The training set size N (penalties are in units of 1/N).

    Returns:
        ``model``.
    """
    check_module(model)
    lr = check_number(lr, "lr", low=0.0)
    num_data = check_positive_int(num_data, "num_data", hint="the training set size")
    for name, layer in sparse_layers(model):  # a shared layer once
        _call(name, layer, "after_step", lr, num_data)
    return model
