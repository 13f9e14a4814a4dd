"""Physical shrinking: a plain model in which removed units (neurons, channels) are gone.

After a structured method (``group_l0``, ``group_vd``) or any pruning that leaves whole weight rows at zero,
:func:`shrink` removes the output units that provably contribute nothing, with every coupled slice of the
network: the following layers' input columns/channels, BatchNorm channels, the ``Flatten``-expanded
inputs of a Linear layer, depthwise convolutions, and channels tied by residual additions (removed
together or not at all). The coupling is Torch-Pruning's ``DependencyGraph`` (traced, not hand-written);
which channels may go is decided here, conservatively, and the result is verified.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .._validation import check_module
from ..layers.base import SparseLayer
from .dense import dense_copy

__all__ = ["ShrinkSummary", "shrink"]

logger = logging.getLogger(__name__)

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class ShrinkSummary:
    """Output units of every Linear/Conv layer before and after :func:`shrink` (``shrunk.shrink_summary``).

    Attributes:
        units: Layer name -> ``(units before, units after)``.
        parameters: ``(parameters before, parameters after)`` of the whole model.
    """

    units: dict[str, tuple[int, int]]
    parameters: tuple[int, int]

    def __str__(self) -> str:
        lines = [f"{name or '(root)'}: {a} -> {b} units" for name, (a, b) in self.units.items()]
        lines.append(f"parameters: {self.parameters[0]:,} -> {self.parameters[1]:,}")
        return "\n".join(lines)


def _as_args(example_inputs: Union[Tensor, Sequence[Any]]) -> tuple:
    return (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)


def _probes(args: tuple) -> list[tuple]:
    """The example inputs, and random inputs of the same shapes (normal, and scaled by 10 and -10)."""
    g = torch.Generator().manual_seed(0)
    out = [args]
    for scale in (1.0, 10.0, -10.0):
        out.append(tuple(torch.randn(a.shape, generator=g).to(a.device, a.dtype) * scale
                         if isinstance(a, Tensor) and a.is_floating_point() else a for a in args))
    return out


def _run(model: nn.Module, probes: list[tuple]) -> list[list[Tensor]]:
    with torch.no_grad():
        return [[t for t in tree_flatten(model(*p))[0] if isinstance(t, Tensor)] for p in probes]


def _same(outs: list[list[Tensor]], refs: list[list[Tensor]], rtol: float, atol: float) -> bool:
    for out, ref in zip(outs, refs):
        if len(out) != len(ref):
            return False
        for a, b in zip(out, ref):
            if a.shape != b.shape:
                return False
            scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
            if not torch.allclose(a, b, rtol=rtol, atol=atol * scale, equal_nan=True):
                return False
    return True


def _zero_inputs(model: nn.Module, probes: list[tuple]) -> dict[nn.Module, Tensor]:
    """Per Linear/Conv layer: which input features/channels were exactly zero on every probe."""
    zero: dict[nn.Module, Tensor] = {}

    def hook(m: nn.Module, inputs: tuple) -> None:
        x = inputs[0]
        if isinstance(m, nn.Linear):
            z = (x.reshape(-1, x.shape[-1]) == 0).all(dim=0)
        else:
            cdim = x.dim() - (m.weight.dim() - 2) - 1
            z = (x.transpose(0, cdim).reshape(x.shape[cdim], -1) == 0).all(dim=1)
        zero[m] = z if m not in zero else zero[m] & z

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, *_CONV))]
    try:
        _run(model, probes)
    finally:
        for h in handles:
            h.remove()
    return zero


def _layer_outputs(model: nn.Module, probes: list[tuple]) -> tuple[list[nn.Module], dict[nn.Module, list[Tensor]]]:
    """Every Linear/Conv layer's outputs on the probes, and the layers in the order they first ran."""
    order: list[nn.Module] = []
    outs: dict[nn.Module, list[Tensor]] = {}

    def hook(m: nn.Module, inputs: tuple, out: Tensor) -> None:
        if m not in outs:
            order.append(m)
        outs.setdefault(m, []).append(out.detach().clone())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, *_CONV))]
    try:
        _run(model, probes)
    finally:
        for h in handles:
            h.remove()
    return order, outs


def _constant_shift(a: list[Tensor], b: list[Tensor], m: nn.Module, atol: float) -> Optional[Tensor]:
    """The per-output-unit constant ``a - b`` when it is one constant per unit over every example and position of
    every probe (a Linear/Conv reader's output), else ``None``."""
    shift = None
    for x, y in zip(a, b):
        d = x - y
        cdim = d.dim() - 1 if isinstance(m, nn.Linear) else 1
        d = d.movedim(cdim, -1).reshape(-1, d.shape[cdim])
        c = d[0]
        if shift is None:
            shift = c
        scale = max(1.0, float(x.abs().max()))
        if not torch.allclose(d, shift.expand_as(d), rtol=0.0, atol=atol * scale):
            return None
    return shift


def _fold_constant_units(model: nn.Module, probes: list[tuple], names: dict[nn.Module, str], rtol: float,
                         atol: float) -> int:
    """Fold the bias of units with zero weights but a non-zero bias (their output is a constant) into the
    biases of the layers reading them, so that those units become zero and can be removed.

    For each Linear/Conv with such units: their biases are set to 0, then, in execution order, the first
    layer whose output changed must have changed by one constant per output unit (over every example and
    position of every probe: a Linear reader, or a Conv reader without padding at those channels) and must have
    a bias, which takes the constant; repeated until the model's outputs equal the original's on the probes.
    When a reader is not shifted by a constant (padding, a non-linear reader, the model's output), the layer is
    restored and its units stay. Returns the number of units folded.
    """
    refs = _run(model, probes)
    order, ref_outs = _layer_outputs(model, probes)
    folded = 0
    for layer in [m for m in order if m.bias is not None]:
        w = layer.weight.detach()
        const = (w.reshape(w.shape[0], -1) == 0).all(dim=1) & (layer.bias.detach() != 0)
        if not bool(const.any()) or bool(const.all()):  # nothing to fold, or the whole layer (keep one unit)
            continue
        saved = {m: m.bias.detach().clone() for m in order if m.bias is not None}
        with torch.no_grad():
            layer.bias[const] = 0.0
        ok = False
        for _ in range(len(order)):
            _, outs = _layer_outputs(model, probes)
            changed = [m for m in order if m is not layer and m in outs
                       and not _same([outs[m]], [ref_outs[m]], rtol, atol)]
            if not changed:
                ok = _same(_run(model, probes), refs, rtol, atol)
                break
            reader = changed[0]
            shift = _constant_shift(ref_outs[reader], outs[reader], reader, atol)
            if shift is None or reader.bias is None:
                break
            with torch.no_grad():
                reader.bias += shift.to(reader.bias.dtype)
        if not ok:
            with torch.no_grad():
                for m, b in saved.items():
                    m.bias.copy_(b)
            logger.info("shrink: the constant units of %s feed a reader that is not shifted by a constant; kept",
                        names.get(layer))
            continue
        folded += int(const.sum())
        order, ref_outs = _layer_outputs(model, probes)  # the folded layer's outputs are the new reference
        logger.info("shrink: folded %d constant unit(s) of %s into the layers reading them", int(const.sum()),
                    names.get(layer))
    return folded


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, _CONV) and m.groups == m.out_channels and m.out_channels > 1


def _zero_rows(m: nn.Module) -> Tensor:
    """Output units of a Linear/Conv whose weight row and bias are all zero (their output is identically 0)."""
    w = m.weight.detach()
    zero = (w.reshape(w.shape[0], -1) == 0).all(dim=1)
    return zero & (m.bias.detach() == 0) if m.bias is not None else zero


def _zero_columns(m: nn.Module) -> Optional[Tensor]:
    """Input features/channels a Linear/Conv ignores (all its weights reading them are 0); ``None`` for a
    grouped or depthwise convolution, whose outputs depend on their own inputs only."""
    w = m.weight.detach()
    if isinstance(m, _CONV) and m.groups != 1:
        return None
    return (w.transpose(0, 1).reshape(w.shape[1], -1) == 0).all(dim=1)


def _bn_zero(m: nn.Module) -> Tensor:
    """BatchNorm channels that output 0 whatever their input (affine weight and bias both 0)."""
    if not m.affine:
        return torch.zeros(m.num_features, dtype=torch.bool)
    return (m.weight.detach() == 0) & (m.bias.detach() == 0)


def _removable(group: Any, tp: Any, zero_in: dict[nn.Module, Tensor], names: dict[nn.Module, str],
               n_root: int) -> list[int]:
    """Root indices of the group's channels that are provably 0 wherever they are read.

    A channel may go when (1) every layer of the group that reads it (a Linear/Conv input, a depthwise
    convolution) saw exactly 0 there on every probe, and (2) some member makes it identically 0 whatever
    the input: a Linear/Conv row with zero weights and bias, or a BatchNorm channel with zero weight and
    bias; or when every reader is a Linear/ungrouped Conv whose weights for the channel are all 0 (the
    channel is computed but never looked at: input gates, ``unit="in"``, prune such channels). Channels
    reaching the model's output are kept.
    """
    readers: list[tuple[Tensor, list[int]]] = []
    ignored = torch.ones(n_root, dtype=torch.bool)  # every reader's weights for the channel are 0
    zero_source = torch.zeros(n_root, dtype=torch.bool)
    unsupported = []
    for item in group:
        dep, idxs, roots = item.dep, item.idxs, item.root_idxs
        m = dep.target.module
        handler = dep.handler
        if isinstance(m, tp.ops._OutputOp):
            return []
        if type(m).__module__.startswith("torch_pruning"):  # reshape, flatten, add, concat: follow
            continue
        if isinstance(m, _CONV + (nn.Linear,)):
            reads = _is_depthwise(m) or handler in (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
            if reads:
                z = zero_in.get(m)
                if z is None:  # never called on the probes
                    return []
                readers.append((z, [(i, r) for i, r in zip(idxs, roots)]))
                zc = _zero_columns(m)
                for i, r in zip(idxs, roots):
                    if zc is None or not zc[i]:
                        ignored[r] = False
            if not reads or _is_depthwise(m):
                zr = _zero_rows(m)
                for i, r in zip(idxs, roots):
                    if zr[i]:
                        zero_source[r] = True
            continue
        if isinstance(m, _BN):
            zb = _bn_zero(m)
            for i, r in zip(idxs, roots):
                if zb[i]:
                    zero_source[r] = True
            continue
        unsupported.append(m)
    if not readers:
        return []
    ok = zero_source.clone()
    for z, pairs in readers:
        for i, r in pairs:
            if not z[i]:
                ok[r] = False
    ok |= ignored  # a channel no reader looks at can go, whatever its producers write into it
    idxs = [r for r in range(n_root) if ok[r]]
    if idxs and unsupported:
        m = unsupported[0]
        name = names.get(m, type(m).__name__) if isinstance(m, nn.Module) else "an unwrapped nn.Parameter"
        raise ValueError(f"shrink: channels {idxs[:8]} of layer {names.get(group[0].dep.target.module)!r} are zero, "
                         f"but removing them also touches {name!r} ({type(m).__name__}), which shrink cannot follow "
                         "exactly (only Linear, Conv1d/2d/3d, BatchNorm and reshape/add/concat are); exclude it or "
                         "leave the model unshrunk")
    return idxs


def shrink(model: nn.Module, example_inputs: Union[Tensor, Sequence[Any]], *, rtol: float = 1e-4,
           atol: float = 1e-5) -> nn.Module:
    """A new plain model with the removed units physically gone (smaller layers, same outputs).

    ``model`` (a thresholded sparse model, or a plain one) is first copied (:func:`~bayes_sparse.export.to_dense`
    or ``deepcopy``) and put in eval mode; the copy is traced with Torch-Pruning's ``DependencyGraph`` on
    ``example_inputs``. For each group of coupled channels, the output units that are identically zero
    (a Linear/Conv row with zero weights and bias, or a BatchNorm channel with zero weight and bias) and read
    as exactly zero by every following layer are removed everywhere in the group. A unit with zero weights but
    a non-zero bias outputs a constant: its contribution is first folded into the biases of the layers that
    read it, where that keeps the outputs equal (a Linear reader, a Conv reader without padding), and it then
    goes like the others. A zero conv channel
    followed by a BatchNorm that maps 0 to a non-zero constant is kept (its removal would change the
    output). At least one unit of every layer stays. After each group the outputs on ``example_inputs``
    and three random probes are compared with the original's.

    Args:
        model: The model; not changed.
        example_inputs: A tensor or a tuple of positional inputs (a small batch is enough).
        rtol, atol: Tolerance of the check (``atol`` relative to the largest output magnitude, at least 1).

    Returns:
        The shrunk model in eval mode; ``shrunk.shrink_summary`` is a :class:`ShrinkSummary`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        RuntimeError: a sparse layer has no fixed mask (call ``threshold_`` first).
        ValueError: the model cannot be traced, a group with removable channels touches a module shrink
            cannot follow, or a removal changed the outputs (the message names the layer); ``model`` is
            unchanged and no model is returned.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> with torch.no_grad(): net[0].weight[1] = 0; net[0].bias[1] = 0
        >>> small = shrink(net, torch.randn(2, 4))
        >>> small[0].out_features, small[2].in_features
        (2, 2)
    """
    import torch_pruning as tp

    check_module(model)
    dense = dense_copy(model) if any(isinstance(m, SparseLayer) for m in model.modules()) else copy.deepcopy(model)
    dense.eval()
    args = _as_args(example_inputs)
    probes = _probes(args)
    refs = _run(dense, probes)
    names = {m: n for n, m in dense.named_modules()}
    before = {n: m.weight.shape[0] for n, m in dense.named_modules() if isinstance(m, (nn.Linear, *_CONV))}
    params_before = sum(p.numel() for p in dense.parameters())
    _fold_constant_units(dense, probes, names, rtol, atol)
    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(dense, example_inputs=args if len(args) > 1 else args[0],
                                                       verbose=False)
    except Exception as e:  # noqa: BLE001 - any tracing failure means we cannot follow the model
        raise ValueError(f"shrink cannot trace {type(model).__name__} with Torch-Pruning: {type(e).__name__}: {e}") from e
    roots = [group[0].dep.target.module for group in dg.get_all_groups(root_module_types=(*_CONV, nn.Linear))]
    for root in roots:
        pruner = dg.get_pruner_of_module(root)
        n = pruner.get_out_channels(root)
        group = dg.get_pruning_group(root, pruner.prune_out_channels, list(range(n)))
        idxs = _removable(group, tp, _zero_inputs(dense, probes), names, n)
        if len(idxs) >= n:
            idxs = idxs[1:]  # keep one unit: a layer with no output is no layer
        if not idxs:
            continue
        try:
            dg.get_pruning_group(root, pruner.prune_out_channels, idxs).prune(record_history=False)
            same = _same(_run(dense, probes), refs, rtol, atol)
            reason = "changed the outputs"
        except Exception as e:  # noqa: BLE001 - a shape error here means an op the graph did not follow
            same, reason = False, f"broke the forward pass ({type(e).__name__}: {e})"
        if not same:
            raise ValueError(f"shrink: removing output units {idxs[:8]}{' ...' if len(idxs) > 8 else ''} of layer "
                             f"{names.get(root)!r} ({type(root).__name__}) {reason}: an operation between it and the "
                             "layers reading it uses channels in a way Torch-Pruning's dependency graph does not "
                             "follow. The input model is unchanged; leave this model unshrunk")
        logger.info("shrink: removed %d unit(s) of %s", len(idxs), names.get(root))
    units = {n: (before[n], m.weight.shape[0]) for n, m in dense.named_modules() if n in before}
    dense.shrink_summary = ShrinkSummary(units, (params_before, sum(p.numel() for p in dense.parameters())))
    return dense
