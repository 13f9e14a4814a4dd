"""Compressed model files: one safetensors file, a JSON header inside it, no pickle anywhere.

Each Linear/Conv weight is stored sparse, with the cheapest index encoding for its mask (a bitmask,
Deep Compression's relative indices of 1-16 bits with filler zeros, or int32 positions) and its non-zero
values in float32 (lossless, the default), float16/bfloat16, or quantized to a k-means codebook of
``2**bits`` entries (lossy, opt-in; ``bits="auto"`` picks each layer's width from its Sparse VD
posterior). Every other tensor (biases, BatchNorm statistics) is stored as it is. CRC32 checksums over
the header and every tensor make a damaged file fail loudly instead of loading wrong numbers.

The header also records the module tree when it is built only from standard torch modules (e.g. an
``nn.Sequential`` of Linear, Conv, ReLU, pooling, Flatten ...), so :func:`load` can rebuild the model;
otherwise pass the unmodified architecture to ``load(path, model=...)`` or use :func:`load_state_dict`.
"""

from __future__ import annotations

import base64
import json
import lzma
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from .._validation import check_module, check_number
from ..layers.base import SUPPORTED_DENSE_TYPES, SparseLayer
from . import _bits
from .dense import to_dense

__all__ = ["CorruptFileError", "FileReport", "load", "load_state_dict", "save"]

MAGIC = "bayes_sparse"
VERSION = 1
VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_WEIGHT_DTYPES = {**VALUE_DTYPES, "float64": torch.float64}
#: Default cap on the elements a file may decode to (1 GiB of float32): a tiny crafted file must not be
#: able to demand gigabytes. Pass ``max_numel`` to load bigger models.
DEFAULT_MAX_NUMEL = 1 << 28

PathLike = Union[str, os.PathLike]


class CorruptFileError(ValueError):
    """The file is not a bayes_sparse model file, or it is damaged. The message says what was found."""


# ----- the module tree ------------------------------------------------------------------------------
def _attrs(*names: str):
    return lambda m: {n: _jsonable(getattr(m, n)) for n in names}


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


_MAXPOOL = ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")
_AVGPOOL = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_SPECS: dict[type, Any] = {
    nn.Linear: lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None},
    **{c: (lambda m: {"in_channels": m.in_channels, "out_channels": m.out_channels,
                      "kernel_size": list(m.kernel_size), "stride": list(m.stride),
                      "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
                      "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None,
                      "padding_mode": m.padding_mode}) for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d)},
    nn.ReLU: _attrs("inplace"), nn.ReLU6: _attrs("inplace"), nn.Tanh: _attrs(), nn.Sigmoid: _attrs(),
    nn.GELU: _attrs("approximate"), nn.Identity: _attrs(), nn.Dropout: _attrs("p"),
    nn.Flatten: _attrs("start_dim", "end_dim"), nn.Unflatten: _attrs("dim", "unflattened_size"),
    nn.Softmax: _attrs("dim"), nn.LogSoftmax: _attrs("dim"),
    nn.MaxPool1d: _attrs(*_MAXPOOL), nn.MaxPool2d: _attrs(*_MAXPOOL), nn.AvgPool2d: _attrs(*_AVGPOOL),
    nn.AdaptiveAvgPool2d: _attrs("output_size"),
    **{c: _attrs("num_features", "eps", "momentum", "affine", "track_running_stats")
       for c in (nn.BatchNorm1d, nn.BatchNorm2d)},
}
_BY_NAME = {c.__name__: c for c in _SPECS}


def _tree(module: nn.Module) -> Optional[dict]:
    """JSON description of a tree of standard modules, or None when some module is not standard."""
    if type(module) is nn.Sequential:
        children = [_tree(c) for c in module]
        return None if any(c is None for c in children) else {"type": "Sequential", "children": children}
    spec = _SPECS.get(type(module))
    if spec is None or any(True for _ in module.children()):
        return None
    return {"type": type(module).__name__, "kwargs": spec(module)}


def _build(node: Any, depth: int = 0) -> nn.Module:
    """Rebuild the module tree (on the meta device: no memory until the weights are assigned)."""
    if depth > 64 or not isinstance(node, dict) or not isinstance(node.get("type"), str):
        raise CorruptFileError(f"malformed module entry in the header: {str(node)[:80]}")
    if node["type"] == "Sequential":
        children = node.get("children", [])
        if not isinstance(children, list):
            raise CorruptFileError("malformed Sequential entry in the header: children is not a list")
        return nn.Sequential(*[_build(c, depth + 1) for c in children])
    cls = _BY_NAME.get(node["type"])
    if cls is None:
        raise CorruptFileError(f"unknown module type {node['type']!r} in the header")
    kwargs = node.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise CorruptFileError(f"malformed arguments for {node['type']}")
    try:
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        with torch.device("meta"):
            return cls(**kwargs)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise CorruptFileError(f"cannot build {node['type']} from the header's arguments {kwargs}: {e}") from e


# ----- saving --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileReport:
    """What :func:`save` wrote: bytes per tensor group, the total, and how each weight was encoded."""

    path: str
    total_bytes: int
    layers: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "total_bytes": self.total_bytes, "layers": self.layers}


def _crc(t: Tensor) -> int:
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()) if t.numel() else 0


def _posterior_std(layer: SparseLayer) -> Optional[Tensor]:
    return layer.posterior_std()


def _auto_bits(values: np.ndarray, std: np.ndarray, tolerance: float) -> int:
    """Smallest codebook width whose RMS error stays under ``tolerance`` x the RMS posterior std."""
    budget = tolerance * float(np.sqrt(np.mean(std.astype(np.float64) ** 2)))
    for bits in range(2, 9):
        book, codes = _bits.kmeans_codebook(values, (1 << bits) - 1)
        if float(np.sqrt(np.mean((book[codes] - values) ** 2))) <= budget:
            return bits
    return 8


def _compress(stream: Tensor) -> tuple[Tensor, Optional[dict[str, Any]]]:
    """The smallest of the raw bytes, zlib and lzma (general-purpose entropy coders, as Deep Compression's
    Huffman stage); returns the stored tensor and, when compressed, how to undo it."""
    raw = stream.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    best: tuple[bytes, Optional[str]] = (raw, None)
    for name, fn in _CODECS.items():
        packed = fn(raw)
        if len(packed) < len(best[0]):
            best = (packed, name)
    if best[1] is None:
        return stream, None
    info = {"codec": best[1], "raw_bytes": len(raw), "dtype": str(stream.dtype)[6:]}
    return torch.frombuffer(bytearray(best[0]), dtype=torch.uint8), info


_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
_CODECS = {"zlib": lambda b: zlib.compress(b, 9),
           "lzma": lambda b: lzma.compress(b, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)}
_STREAM_DTYPES = {"uint8": torch.uint8, "int32": torch.int32, **VALUE_DTYPES}


def _decompress(key: str, stored: Tensor, info: dict) -> Tensor:
    raw_bytes, codec = int(info["raw_bytes"]), info["codec"]
    dtype = _STREAM_DTYPES.get(info["dtype"])
    if dtype is None or raw_bytes < 0 or codec not in _CODECS:
        raise CorruptFileError(f"stream {key!r}: unknown codec {codec!r} or dtype {info['dtype']!r}")
    data = stored.numpy().tobytes()
    try:
        if codec == "zlib":
            d = zlib.decompressobj()
            raw = d.decompress(data, raw_bytes)  # never more than the header announced
        else:
            d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
            raw = d.decompress(data, max_length=raw_bytes)
    except (zlib.error, lzma.LZMAError) as e:
        raise CorruptFileError(f"stream {key!r} does not decompress: {e}") from e
    if len(raw) != raw_bytes or raw_bytes % torch.tensor([], dtype=dtype).element_size():
        raise CorruptFileError(f"stream {key!r} decompresses to {len(raw)} bytes, the header says {raw_bytes}")
    return torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)


def _encode_weight(t: Tensor, positions: np.ndarray, nz: np.ndarray, values: Union[str, int],
                   book: Optional[np.ndarray], codes_v: Optional[np.ndarray], kind: str, bits_i: int,
                   container_bits: int) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """One candidate encoding of a weight: the header entry and its (codec-compressed) streams."""
    numel = t.numel()
    entry: dict[str, Any] = {"kind": "sparse", "shape": list(t.shape), "dtype": str(t.dtype)[6:], "nnz": int(nz.size),
                             "index": kind, "index_bits": bits_i}
    streams: dict[str, Tensor] = {}
    if kind == "bitmask":
        mask = np.zeros(numel, dtype=np.uint8)
        mask[positions] = 1
        streams["index"] = torch.from_numpy(np.packbits(mask, bitorder="little"))
        stream, is_real = nz, np.ones(nz.size, bool)
    elif kind == "int32":
        streams["index"] = torch.from_numpy(positions.astype(np.int32))
        stream, is_real = nz, np.ones(nz.size, bool)
    else:
        codes, is_real = _bits.encode_relative(positions, bits_i)
        streams["index"] = torch.from_numpy(_bits.pack(codes, bits_i))
        stream = np.zeros(codes.size, np.float32)
        stream[is_real] = nz
        entry["entries"] = int(codes.size)
    if book is None:
        streams["values"] = torch.from_numpy(stream.astype(np.float32)).to(VALUE_DTYPES[values])
        entry["values"] = values
    else:
        all_codes = np.zeros(stream.size, np.int64)  # code 0 is the exact zero of fillers
        all_codes[is_real] = codes_v + 1
        streams["codebook"] = torch.from_numpy(np.concatenate([[0.0], book]).astype(np.float32))
        streams["values"] = torch.from_numpy(_bits.pack(all_codes, container_bits))
        entry["values"] = "codebook"
        entry["value_bits"] = container_bits
    codecs = {}
    for suffix in ("index", "values"):
        streams[suffix], info = _compress(streams[suffix])
        if info is not None:
            codecs[suffix] = info
    if codecs:
        entry["codecs"] = codecs
    return entry, streams


def save(model: nn.Module, path: PathLike, *, values: Union[str, int] = "float32", tolerance: float = 0.1) -> FileReport:
    """Write ``model`` (a thresholded sparse model, or a plain one) to one compressed safetensors file.

    Args:
        model: The model. Sparse layers must be thresholded (``threshold_``); their dense export is stored.
        path: Destination file.
        values: ``"float32"`` (lossless), ``"float16"``, ``"bfloat16"``, an int 1-8 (k-means codebook of
            ``2**bits - 1`` values plus an exact zero), or ``"auto"``: per layer, the fewest bits whose RMS
            error is below ``tolerance`` x the RMS posterior standard deviation of its kept weights (Sparse VD
            layers only; others get 8 bits). In every lossy mode the other float tensors (biases, norms) are
            stored in half precision (bfloat16 for ``"bfloat16"``, else float16).
        tolerance: See ``values="auto"``; 0.1 kept the LeNet-300-100 Sparse VD model within 0.05 pp of its
            float32 test error at 109x (``benchmarks/results/file_size.json``).

    Returns:
        A :class:`FileReport` with the bytes written.

    Raises:
        TypeError / ValueError: bad arguments. RuntimeError: sparse layers not thresholded.

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
    from safetensors.torch import save as st_save

    check_module(model)
    tolerance = check_number(tolerance, "tolerance", low=0.0, low_inclusive=False)
    if not (values in VALUE_DTYPES or values == "auto" or (isinstance(values, int) and not isinstance(values, bool)
                                                           and 1 <= values <= 8)):
        raise ValueError(f"values must be one of {sorted(VALUE_DTYPES)}, 'auto' or an int in [1, 8], got {values!r}")
    stds = {name: _posterior_std(m) for name, m in model.named_modules() if isinstance(m, SparseLayer)}
    dense = to_dense(model) if any(isinstance(m, SparseLayer) for m in model.modules()) else model
    weight_names = {f"{n}.weight" if n else "weight": n for n, m in dense.named_modules()
                    if isinstance(m, SUPPORTED_DENSE_TYPES)}
    tensors: dict[str, Tensor] = {}
    entries: dict[str, Any] = {}
    report: dict[str, dict[str, Any]] = {}
    for key, t in dense.state_dict().items():
        t = t.detach().cpu().contiguous()
        if key not in weight_names:
            entry = {"kind": "plain"}
            if values != "float32" and t.dtype == torch.float32:  # lossy modes store the rest in half precision
                entry["dtype"] = "float32"
                t = t.to(VALUE_DTYPES.get(values, torch.float16))
            tensors[key] = t
            entries[key] = entry
            report[key] = {"bytes": t.numel() * t.element_size(), "encoding": f"plain {str(t.dtype)[6:]}"}
            continue
        flat = t.reshape(-1)
        positions = torch.nonzero(flat).reshape(-1).numpy()
        nz = flat[positions].float().numpy() if positions.size else np.zeros(0, np.float32)
        if values in VALUE_DTYPES:
            bits_v = torch.finfo(VALUE_DTYPES[values]).bits
        else:
            std = stds.get(weight_names[key])
            if values == "auto":
                bits_v = 8 if std is None else _auto_bits(nz, std.reshape(-1)[positions].numpy(), tolerance)
            else:
                bits_v = int(values)
        if values in VALUE_DTYPES:
            book, codes_v = None, None
        else:
            book, codes_v = _bits.kmeans_codebook(nz, (1 << bits_v) - 1)
        kind, bits_i, _ = _bits.choose_index_encoding(positions, flat.numel(), bits_v)
        candidates = [(kind, bits_i, bits_v)]
        if kind != "bitmask":  # byte-aligned streams, which the general-purpose codecs compress best
            candidates.append(("relative", 8, 8 if book is not None else bits_v))
        best = None
        for cand in candidates:
            entry, streams = _encode_weight(t, positions, nz, values, book, codes_v, *cand)
            size = sum(v.numel() * v.element_size() for v in streams.values())
            if best is None or size < best[2]:
                best = (entry, streams, size)
        entry, streams, _ = best
        for suffix, stream in streams.items():
            tensors[f"{key}::{suffix}"] = stream
        entries[key] = entry
        nbytes = sum(tensors[k].numel() * tensors[k].element_size() for k in tensors if k.startswith(f"{key}::"))
        report[key] = {"bytes": nbytes, "encoding": f"{entry['index']}{entry['index_bits']} + "
                       + (values if values in VALUE_DTYPES else f"{bits_v}-bit codebook")
                       + "".join(f", {k} {c['codec']}" for k, c in entry.get("codecs", {}).items()),
                       "nnz": int(nz.size), "numel": int(flat.numel())}
    header = {"tensors": entries, "tree": _tree(dense), "crc32": {k: _crc(v) for k, v in tensors.items()}}
    header_text = encode_header(header)
    metadata = {"format": MAGIC, "version": str(VERSION), "header": header_text,
                "header_crc32": str(zlib.crc32(header_text.encode()))}
    data = st_save(tensors, metadata=metadata)
    Path(path).write_bytes(data)
    return FileReport(str(path), len(data), report)


def encode_header(header: dict) -> str:
    """The header as stored: compact JSON, zlib-compressed, base64 (JSON escaping would double its size)."""
    text = json.dumps(header, separators=(",", ":"), sort_keys=True)
    return base64.b64encode(zlib.compress(text.encode(), 9)).decode("ascii")


_MAX_HEADER_BYTES = 1 << 24


def decode_header(text: str) -> Any:
    """Inverse of :func:`encode_header`; raises :class:`CorruptFileError` on anything malformed."""
    try:
        packed = base64.b64decode(text, validate=True)
        d = zlib.decompressobj()
        raw = d.decompress(packed, _MAX_HEADER_BYTES)
        if d.unconsumed_tail or not d.eof:
            raise CorruptFileError("the header is truncated or larger than 16 MiB")
        return json.loads(raw.decode("utf-8"))
    except (ValueError, zlib.error, RecursionError, UnicodeDecodeError, TypeError) as e:
        raise CorruptFileError(f"the header cannot be decoded: {type(e).__name__}") from e


# ----- loading -------------------------------------------------------------------------------------
def _read(path: PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise CorruptFileError(f"cannot read {path}: {e}") from e
    if len(raw) < 8:
        raise CorruptFileError(f"{path} has {len(raw)} bytes: too short for a safetensors file (truncated?)")
    n = int.from_bytes(raw[:8], "little")
    if n > len(raw) - 8:
        raise CorruptFileError(f"{path}: the safetensors header claims {n} bytes but the file has {len(raw) - 8} after "
                               "the length field (truncated or not a safetensors file)")
    try:
        meta = json.loads(raw[8:8 + n].decode("utf-8")).get("__metadata__") or {}
        tensors = st_load(raw)
    except (SafetensorError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, ValueError, RuntimeError,
            OverflowError, RecursionError) as e:
        raise CorruptFileError(f"{path} is not a readable safetensors file: {type(e).__name__}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != MAGIC:
        raise CorruptFileError(f"{path} is a safetensors file but not a bayes_sparse model file (format "
                               f"{meta.get('format') if isinstance(meta, dict) else None!r}); write it with "
                               "bayes_sparse.export.save")
    if meta.get("version") != str(VERSION):
        raise CorruptFileError(f"{path} has bayes_sparse format version {meta.get('version')!r}; this library reads "
                               f"version {VERSION}")
    header_text = meta.get("header", "")
    if not isinstance(header_text, str) or str(zlib.crc32(header_text.encode())) != meta.get("header_crc32"):
        raise CorruptFileError(f"{path}: the header checksum does not match (the file is damaged)")
    try:
        header = decode_header(header_text)
    except CorruptFileError as e:
        raise CorruptFileError(f"{path}: {e}") from e
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), dict):
        raise CorruptFileError(f"{path}: the header has no tensor table")
    crcs = header.get("crc32", {})
    if not isinstance(crcs, dict) or set(crcs) != set(tensors):
        raise CorruptFileError(f"{path}: the stored tensors {sorted(tensors)[:5]} do not match the header's")
    for k, t in tensors.items():
        if _crc(t) != crcs[k]:
            raise CorruptFileError(f"{path}: tensor {k!r} fails its checksum (the file is damaged)")
    return header, tensors


def _decode(key: str, e: dict, tensors: dict[str, Tensor], budget: list[int]) -> Tensor:
    try:
        shape = [int(s) for s in e["shape"]]
        if e["dtype"] not in _WEIGHT_DTYPES:
            raise CorruptFileError(f"tensor {key!r} has dtype {e['dtype']!r}; weights are one of {sorted(_WEIGHT_DTYPES)}")
        dtype = _WEIGHT_DTYPES[e["dtype"]]
        numel = math.prod(shape)
        if any(s < 0 for s in shape):
            raise CorruptFileError(f"tensor {key!r} declares an impossible shape {shape}")
        budget[0] -= numel
        if budget[0] < 0:
            raise CorruptFileError(f"tensor {key!r} (shape {shape}) takes the file beyond max_numel elements; "
                                   "pass a larger max_numel to load(...) if the model really is that big")
        nnz, kind, bits_i = int(e["nnz"]), e["index"], int(e["index_bits"])
        codecs = e.get("codecs", {})
        if not isinstance(codecs, dict):
            raise CorruptFileError(f"tensor {key!r}: malformed codecs")
        streams = {}
        for suffix in ("index", "values"):
            stored = tensors[f"{key}::{suffix}"]
            if suffix in codecs:
                if not isinstance(codecs[suffix], dict) or int(codecs[suffix]["raw_bytes"]) > 16 * numel + 1024:
                    raise CorruptFileError(f"tensor {key!r}: the {suffix} stream announces an impossible size")
                stored = _decompress(f"{key}::{suffix}", stored, codecs[suffix])
            streams[suffix] = stored
        index = streams["index"].numpy()
        if kind == "bitmask":
            if index.size * 8 < numel:
                raise CorruptFileError(f"tensor {key!r}: the bitmask is shorter than the tensor")
            positions = np.flatnonzero(np.unpackbits(index, bitorder="little")[:numel])
            count = positions.size
        elif kind == "int32":
            positions, count = index.astype(np.int64), index.size
        elif kind == "relative" and 1 <= bits_i <= 16:
            count = int(e["entries"])
            codes = _bits.unpack(index, bits_i, count)
            positions = _bits.decode_relative(codes, bits_i)
        else:
            raise CorruptFileError(f"tensor {key!r}: unknown index encoding {kind!r}/{bits_i}")
        if positions.size and (positions.min() < 0 or positions.max() >= numel or np.any(np.diff(positions) <= 0)):
            raise CorruptFileError(f"tensor {key!r}: indices out of range or out of order (shape {shape})")
        if e["values"] == "codebook":
            book = tensors[f"{key}::codebook"].numpy()
            value_bits = int(e["value_bits"])
            if not 1 <= value_bits <= 8:
                raise CorruptFileError(f"tensor {key!r}: value_bits {value_bits} is outside [1, 8]")
            vcodes = _bits.unpack(streams["values"].numpy(), value_bits, count)
            if vcodes.size and (vcodes.max() >= book.size or vcodes.min() < 0):
                raise CorruptFileError(f"tensor {key!r}: a value code is beyond its codebook")
            vals = torch.from_numpy(book[vcodes])
        elif e["values"] in VALUE_DTYPES:
            vals = streams["values"].to(torch.float32)
            if vals.numel() != count:
                raise CorruptFileError(f"tensor {key!r}: {vals.numel()} values for {count} index entries")
        else:
            raise CorruptFileError(f"tensor {key!r}: unknown value encoding {e['values']!r}")
        if kind != "relative" and count != nnz:
            raise CorruptFileError(f"tensor {key!r}: {count} indices but the header says {nnz} non-zeros")
        out = torch.zeros(numel, dtype=torch.float32)
        out[torch.from_numpy(np.ascontiguousarray(positions))] = vals
        return out.to(dtype).reshape(shape)
    except CorruptFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, OverflowError) as err:
        raise CorruptFileError(f"tensor {key!r} cannot be decoded: {type(err).__name__}: {err}") from err


def load_state_dict(path: PathLike, max_numel: int = DEFAULT_MAX_NUMEL) -> dict[str, Tensor]:
    """Read a file written by :func:`save` into a ``state_dict`` for the unmodified (dense) architecture.

    Args:
        path: The file.
        max_numel: Most elements the sparse tensors may decode to, together (a guard against crafted files).

    Raises:
        CorruptFileError: the file is missing, truncated, damaged, from another tool or another version, or
            asks for more than ``max_numel`` elements.
    """
    return _load(path, max_numel)[1]


def _load(path: PathLike, max_numel: int = DEFAULT_MAX_NUMEL) -> tuple[dict[str, Any], dict[str, Tensor]]:
    header, tensors = _read(path)
    budget = [int(max_numel)]
    out: dict[str, Tensor] = {}
    for key, e in header["tensors"].items():
        if not isinstance(e, dict):
            raise CorruptFileError(f"{path}: malformed entry for {key!r}")
        if e.get("kind") == "plain":
            if key not in tensors:
                raise CorruptFileError(f"{path}: tensor {key!r} is missing")
            target = e.get("dtype")
            if target is not None and target != "float32":
                raise CorruptFileError(f"{path}: unsupported dtype {target!r} for {key!r}")
            out[key] = tensors[key].to(torch.float32) if target else tensors[key].clone()
        elif e.get("kind") == "sparse":
            out[key] = _decode(key, e, tensors, budget)
        else:
            raise CorruptFileError(f"{path}: unknown entry kind {e.get('kind')!r} for {key!r}")
    return header, out


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
    header, state = _load(path, max_numel)
    assign = model is None
    if model is None:
        if header.get("tree") is None:
            raise ValueError(f"{path} does not record its module tree (the model was not an nn.Sequential of "
                             "standard modules); pass the architecture: load(path, model=MyNet())")
        model = _build(header["tree"])  # on the meta device: the loaded tensors are assigned below
    try:
        model.load_state_dict(state, assign=assign)
    except RuntimeError as e:
        raise CorruptFileError(f"{path} does not fit the architecture: {e}") from e
    if assign and any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise CorruptFileError(f"{path}: the stored tensors do not cover the recorded module tree")
    return model.eval()
