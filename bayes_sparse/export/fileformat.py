"""Compressed model files: one safetensors file, a JSON header inside it, no pickle anywhere.

Each Linear/Conv weight is stored sparse, with the cheapest index encoding for its mask (a bitmask,
Deep Compression's relative indices of 1-16 bits with filler zeros, or int32 positions) and its non-zero
values in float32 (lossless, the default), float16/bfloat16, or quantized to a k-means codebook of
``2**bits`` entries (lossy, opt-in; ``bits="auto"`` picks each layer's width from its Sparse VD
posterior). Lossless files store each weight's non-zeros in its own dtype (float64 ones as float64), so a
load gives back the saved numbers bit for bit (zeros load as +0.0). Every other tensor (biases, BatchNorm
statistics) is stored as it is. NaN and inf are refused unless ``allow_nonfinite=True``.

Reading trusts nothing in the file: a CRC32 covers the package's header, which holds a copy of the whole
safetensors tensor table, and every tensor; every declared field is checked against the data it describes
(counts, index ranges, codebook codes, each stream's exact dtype and length, every tensor present and read
once, the module tree against the entries; duplicate JSON keys are refused), and work and memory are bounded
by what the file declares, checked against ``max_numel`` before anything is allocated. A load either raises
:class:`CorruptFileError` naming the file, the tensor and the field, or returns the numbers that were saved.

The header also records the module tree when it is built only from standard torch modules (e.g. an
``nn.Sequential`` of Linear, Conv, ReLU, pooling, Flatten ...), so :func:`load` can rebuild the model;
otherwise pass the unmodified architecture to ``load(path, model=...)`` or use :func:`load_state_dict`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .._validation import check_module, check_number
from ..layers.base import SparseLayer
from . import _container, _policy, _tree
from ._container import DEFAULT_MAX_NUMEL, decode_header, encode_header  # noqa: F401  (importable from here, as before)
from ._spec import MAGIC, ST_DTYPES, VALUE_DTYPES, VERSION, WEIGHT_DTYPES, CorruptFileError, st_name  # noqa: F401  (idem)
from .dense import dense_copy

__all__ = ["CorruptFileError", "FileReport", "describe_file", "load", "load_state_dict", "save"]

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class FileReport:
    """What :func:`save` wrote: bytes per tensor group, the total, and how each weight was encoded."""

    path: str
    total_bytes: int
    layers: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "total_bytes": self.total_bytes, "layers": self.layers}

    def __str__(self) -> str:
        head = ("tensor", "shape", "kept", "encoding", "bytes")
        rows = []
        for key, r in self.layers.items():
            shape = "x".join(map(str, r.get("shape", ()))) or "scalar"
            kept = f"{r['nnz']:,}/{r['numel']:,}" if "nnz" in r else ""
            rows.append((key, shape, kept, r["encoding"], f"{r['bytes']:,}"))
        rows.append(("total (file)", "", "", "", f"{self.total_bytes:,}"))
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        fmt = lambda row: "  ".join(  # noqa: E731
            str(c).ljust(w) if i != 4 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        return "\n".join([fmt(head), rule, *map(fmt, rows[:-1]), rule, fmt(rows[-1])])


def save(model: nn.Module, path: PathLike, *, values: Union[str, int] = "float32", tolerance: float = 0.1,
         effort: str = "auto", allow_nonfinite: bool = False) -> FileReport:
    """Write ``model`` (a thresholded sparse model, or a plain one) to one compressed safetensors file.

    Args:
        model: The model. Sparse layers must be thresholded (``threshold_``); their dense export is stored.
            Linear/Conv weights of float16, bfloat16, float32 or float64 are stored sparse, every other tensor
            as it is (any dtype safetensors stores: bool, (u)int8-64, float8, 16-64 bit floats).
        path: Destination file.
        values: ``"float32"`` (lossless: each weight's non-zeros in its own dtype, float64 included),
            ``"float16"``, ``"bfloat16"`` (float32/float64 weights rounded to it), an int 1-8 (k-means codebook of
            ``2**bits - 1`` values plus an exact zero), or ``"auto"``: per layer, the fewest bits whose RMS
            error is below ``tolerance`` x the RMS posterior standard deviation of its kept weights (Sparse VD
            layers only; others get 8 bits). In every lossy mode the other float tensors (biases, norms) are
            stored in half precision (bfloat16 for ``"bfloat16"``, else float16).
        tolerance: See ``values="auto"``; 0.1 kept the LeNet-300-100 Sparse VD model within 0.05 pp of its
            float32 test error at 109x (``benchmarks/results/file_size.json``).
        effort: How hard the byte codecs try: ``"best"`` (zlib and lzma in several settings: the smallest
            file, about 0.4 s per 100k non-zeros on one core), ``"fast"`` (zlib's run-length strategy only,
            a few ns per byte: densenet121 at 90% sparsity saves in about twice the time of ``to_dense`` +
            ``torch.save``; float32 value streams come out about 15% larger than with ``"best"``, index
            streams about the same) or ``"auto"``: ``"best"`` for models with at most ``2**18`` non-zero
            weights, else ``"fast"``. Every effort writes the same format (``benchmarks/export_speed.py``).
        allow_nonfinite: Store NaN and inf values (float value encodings only) instead of refusing them,
            and values that a lossy 16-bit dtype turns into inf.

    Returns:
        A :class:`FileReport` with the bytes written.

    Raises:
        TypeError: a bad argument, or a tensor of a dtype the format does not store (complex, float8 ...).
        ValueError: a bad argument; a tensor with NaN/inf (unless ``allow_nonfinite``) or beyond the range of
            the lossy dtype; non-finite weights with a codebook; a tensor on the meta device.
        RuntimeError: sparse layers not thresholded.

    Example:
        >>> import bayes_sparse as bs, tempfile, os
        >>> net = nn.Sequential(nn.Linear(4, 2))
        >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> _ = bs.export.save(net, p)
        >>> torch.equal(bs.export.load(p)[0].weight, net[0].weight)
        True

    References:
        Han, Mao, Dally. Deep Compression. ICLR 2016 (relative indices, fillers, codebooks);
        Louizos, Ullrich, Welling. Bayesian Compression for Deep Learning. NeurIPS 2017 (bits from posteriors).
    """
    check_module(model)
    tolerance = check_number(tolerance, "tolerance", low=0.0, low_inclusive=False)
    _policy.check_values(values)
    _policy.check_effort(effort)
    if not isinstance(allow_nonfinite, bool):
        raise TypeError(f"allow_nonfinite must be a bool, got {allow_nonfinite!r}")
    stds = _policy.posterior_stds(model) if values == "auto" else {}
    # a plain model is only read, so it needs no copy
    dense = dense_copy(model) if any(isinstance(m, SparseLayer) for m in model.modules()) else model
    weights = _policy.sparse_weights(dense)
    state = dense.state_dict()
    for key, t in state.items():
        if t.is_meta:
            raise ValueError(f"{key!r} is on the meta device: it holds no numbers to save")
        st_name(t.dtype)  # TypeError for a dtype the format does not store
    weights = {k: v for k, v in weights.items() if k in state and state[k].dtype in WEIGHT_DTYPES.values()}
    effort = _policy.resolve_effort(effort, sum(int(torch.count_nonzero(state[k])) for k in weights))
    entries: dict[str, Any] = {}
    tensors: dict[str, Tensor] = {}
    report: dict[str, dict[str, Any]] = {}
    for key, t in state.items():
        t = t.detach().cpu().contiguous()
        if key in weights:  # stored sparse (it checks its non-zeros for NaN/inf itself)
            encoded = _policy.encode_weight(key, t, values, stds.get(weights[key]), tolerance, effort, allow_nonfinite)
        else:
            _policy.check_finite(key, t, allow_nonfinite)
            encoded = _policy.encode_plain(key, t, values, allow_nonfinite)
        entries[key], report[key] = encoded.entry, encoded.report
        tensors.update(encoded.tensors)
    total = _container.write(path, entries, tensors, _tree.recordable(dense, state))
    return FileReport(str(path), total, report)


def describe_file(path: PathLike, max_numel: int = DEFAULT_MAX_NUMEL) -> FileReport:
    """What a file written by :func:`save` holds, per tensor, read from its checked headers alone.

    No tensor data is read or decoded, and no model code is needed: the headers (checksummed) give each
    state-dict entry's shape, kept weights, encoding and stored bytes. ``print`` the result for a table.

    Args:
        path: The file.
        max_numel: See :func:`load_state_dict` (the entries are checked against it as in a load).

    Returns:
        A :class:`FileReport` whose ``layers`` map each state-dict key to ``shape``, ``bytes`` (stored,
        after the codecs), ``encoding`` and, for sparse weights, ``nnz`` and ``numel``; ``total_bytes`` is
        the file's size.

    Raises:
        CorruptFileError: the file's frame or headers are bad (see :func:`load_state_dict`); damage inside
            the data section is only found by a load.

    Example:
        >>> import bayes_sparse as bs, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> _ = bs.export.save(nn.Sequential(nn.Linear(4, 2)), p)
        >>> bs.export.describe_file(p).layers["0.weight"]["nnz"]
        8
    """
    budget = [int(max_numel)]
    fr = _container._frame(path, budget)
    fr.file.close()
    infos = {k: r.info for k, r in fr.table.items()}
    plans = _container._plan(path, fr.header, infos, budget, fr.version)
    layers: dict[str, dict[str, Any]] = {}
    for key, p in plans.items():
        if isinstance(p, _container._sparse.Plan):
            entry = fr.header["tensors"][key]
            values = p.values if p.values != "codebook" else f"{p.value_bits}-bit codebook"
            codecs = "".join(f", {k} {c.get('codec')}" for k, c in entry.get("codecs", {}).items())
            layers[key] = {"shape": list(p.shape), "nnz": p.nnz, "numel": p.numel,
                           "encoding": f"{p.kind}{p.index_bits} + {values}{codecs}",
                           "bytes": sum(fr.table[n].end - fr.table[n].start for n in p.names)}
        else:
            row = fr.table[p]
            layers[key] = {"shape": list(row.shape), "encoding": f"plain {str(ST_DTYPES[row.dtype])[6:]}",
                           "bytes": row.end - row.start}
    return FileReport(str(path), os.stat(path).st_size, layers)  # the frame check made it 8 + header + data


def load_state_dict(path: PathLike, max_numel: int = DEFAULT_MAX_NUMEL) -> dict[str, Tensor]:
    """Read a file written by :func:`save` into a ``state_dict`` for the unmodified (dense) architecture.

    Args:
        path: The file (a regular file: FIFOs, devices and directories are refused before reading).
        max_numel: Most elements the stored tensors may decode to, together (a guard against crafted
            files), each byte of the file's JSON headers counting as ``HEADER_BYTE_COST = 8`` elements; a
            recorded module tree is held to the same bound on its own, each module costing
            ``NODE_COST = 16384`` elements plus its parameters.

    Raises:
        CorruptFileError: the file is missing, not a regular file, truncated, damaged, inconsistent, from
            another tool or another version, asks for more than ``max_numel`` elements, or needs more memory
            than this process can have. The message names the file and, where there is one, the tensor and
            the field.
    """
    return _load(path, max_numel)[1]


def _load(path: PathLike, max_numel: int = DEFAULT_MAX_NUMEL,
          build_tree: bool = True) -> tuple[dict[str, Any], dict[str, Tensor], Optional[nn.Module]]:
    if isinstance(max_numel, bool) or not hasattr(max_numel, "__index__") or max_numel < 0:
        raise TypeError(f"max_numel must be a non-negative int, got {max_numel!r}")
    max_numel = max_numel.__index__()
    try:
        return _container.load(path, max_numel, build_tree)
    except (MemoryError, RuntimeError) as e:  # a file within max_numel, on a machine (or under a limit) with less
        if isinstance(e, RuntimeError) and "alloc" not in str(e):  # memory (torch's allocator raises RuntimeError)
            raise
        raise CorruptFileError(f"{path}: not enough memory to load it within max_numel={max_numel} elements "
                               "(pass a smaller max_numel to refuse such files sooner)") from e


def _with_metadata(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    from collections import OrderedDict

    out = OrderedDict(state)
    metadata = getattr(model.state_dict(), "_metadata", None)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


def load(path: PathLike, model: Optional[nn.Module] = None, max_numel: int = DEFAULT_MAX_NUMEL) -> nn.Module:
    """Read a file written by :func:`save` into a model in eval mode, without running any stored code.

    Args:
        path: The file.
        model: The unmodified architecture to load into; optional when the file records its module tree
            (models made only of standard torch modules in ``nn.Sequential``).
        max_numel: See :func:`load_state_dict`.

    Returns:
        The model with the stored weights (use :func:`bayes_sparse.export.compile` for sparse kernels).

    Raises:
        CorruptFileError: a bad file (see :func:`load_state_dict`).
        ValueError: the file does not record its module tree and no ``model`` was given.
    """
    header, state, tree = _load(path, max_numel, build_tree=model is None)
    assign = model is None
    if model is None:
        if tree is None:
            raise ValueError(f"{path} does not record its module tree (the model was not an nn.Sequential of "
                             "standard modules); pass the architecture: load(path, model=MyNet())")
        model = tree  # on the meta device, checked against the entries: the loaded tensors are assigned below
    try:
        if not assign:  # the target's own per-module versions (e.g. MNASNet's), which files do not carry
            state = _with_metadata(state, model)
        model.load_state_dict(state, assign=assign)
    except RuntimeError as e:
        raise CorruptFileError(f"{path} does not fit the architecture: {e}") from e
    if assign and any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise CorruptFileError(f"{path}: the stored tensors do not cover the recorded module tree")
    return model.eval()
