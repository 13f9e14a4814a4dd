"""One sparse weight in a file: its header entry and streams (index encoding, value encoding, codebook),
written for a chosen encoding, and read back into the dense tensor from untrusted entry and streams.

Reading is in two steps. :func:`plan` checks every field of the entry against the others and against the
declared dtype and shape of each stream, before any stream byte is read: each stream must be exactly as
long, and of exactly the dtype, that its encoding implies (a compressed one: a uint8 stream shorter than the
raw length it announces, which must be that implied length). :func:`decode_planned` then decodes the streams
in chunks of at most ``CHUNK`` entries (memory: the output plus a constant), checking each chunk before it is
written: indices inside the weight and strictly increasing, value codes inside the codebook, codebook code 0
(the exact zero of fillers) only on filler entries, no bits after the last code, and the non-zero count.

Entry fields (all versions): ``kind`` ("sparse"), ``shape``, ``dtype`` (the weight's), ``nnz`` (non-zeros),
``index`` ("bitmask", "int32" or "relative") with ``index_bits`` (1, 32, or 1-16), ``entries`` (relative
only: real and filler entries), ``values`` (a float dtype name, or "codebook" with ``value_bits`` 1-8), and
``codecs`` (optional: ``{"index"|"values": {"codec", "raw_bytes", "dtype"}}``). Version 1 stored every float
value as float32 or the lossy dtype; version 2 stores them in the weight's own dtype (lossless) or in the
lossy 16-bit dtype, and writes no real entry whose stored value is zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
from torch import Tensor

from . import _bits, _codecs
from ._spec import VERSION, WEIGHT_DTYPES, CorruptFileError, st_name

__all__ = ["CHUNK", "Plan", "decode", "decode_planned", "encode", "plan"]

#: Entries decoded at a time: bounds the decoder's temporary memory (a few MiB) whatever the weight's size.
CHUNK = 1 << 16
_HALF = ("float16", "bfloat16")
_REQUIRED = {"kind", "shape", "dtype", "nnz", "index", "index_bits", "values"}
_INDEX_BITS = {"bitmask": (1,), "int32": (32,), "relative": tuple(range(1, 17))}


def encode(t: Tensor, positions: np.ndarray, nz: Tensor, values: str, book: Optional[np.ndarray],
           codes_v: Optional[np.ndarray], kind: str, bits_i: int, container_bits: int,
           effort: str = "best") -> tuple[dict[str, Any], dict[str, Tensor]]:
    """One encoding of a sparse weight: its header entry and its (codec-compressed) streams.

    Args:
        t: The weight (its shape and dtype are recorded).
        positions: Flat indices of its non-zeros, ascending.
        nz: Their values as stored: a 1-D tensor of the value dtype (with ``book``: only its length is used).
            None of them may be zero (a zero is no non-zero: leave it out of ``positions``).
        values: The stored value dtype, a key of ``WEIGHT_DTYPES`` (used when ``book`` is None).
        book: Codebook of the non-zero values, or None to store them as floats.
        codes_v: Each non-zero's codebook index (with ``book``).
        kind: Index encoding: ``"bitmask"``, ``"int32"`` or ``"relative"``.
        bits_i: Bits per relative index (recorded for every kind: 1 for bitmasks, 32 for int32).
        container_bits: Bits per stored codebook code (with ``book``); code 0 is the exact zero of fillers.
        effort: How hard the codecs try (see ``_codecs.compress``).

    Returns:
        ``(entry, streams)``: the header entry and the tensors to store, by suffix (``index``, ``values``,
        ``codebook``), each compressed when that is smaller (the entry's ``codecs`` says how).
    """
    numel = t.numel()
    nnz = int(positions.size)
    entry: dict[str, Any] = {"kind": "sparse", "shape": list(t.shape), "dtype": str(t.dtype)[6:], "nnz": nnz,
                             "index": kind, "index_bits": bits_i}
    streams: dict[str, Tensor] = {}
    real_at: Optional[np.ndarray] = None  # entry of each non-zero, when there are fillers
    if kind == "bitmask":
        mask = np.zeros(numel, dtype=np.uint8)
        mask[positions] = 1
        streams["index"] = torch.from_numpy(np.packbits(mask, bitorder="little"))
        count = nnz
    elif kind == "int32":
        streams["index"] = torch.from_numpy(positions.astype(np.int32))
        count = nnz
    else:
        codes, is_real = _bits.encode_relative(positions, bits_i)
        streams["index"] = torch.from_numpy(_bits.pack(codes, bits_i))
        count = int(codes.size)
        entry["entries"] = count
        real_at = np.flatnonzero(is_real)
    if book is None:
        stream = nz.reshape(-1)
        if real_at is not None:
            stream = torch.zeros(count, dtype=nz.dtype)
            stream[torch.from_numpy(real_at)] = nz.reshape(-1)
        streams["values"] = stream.contiguous()
        entry["values"] = values
    else:
        all_codes = np.zeros(count, np.int64)  # code 0 is the exact zero of fillers
        all_codes[real_at if real_at is not None else slice(None)] = np.asarray(codes_v) + 1
        streams["codebook"] = torch.from_numpy(np.concatenate([[0.0], book]).astype(np.float32))
        streams["values"] = torch.from_numpy(_bits.pack(all_codes, container_bits))
        entry["values"] = "codebook"
        entry["value_bits"] = container_bits
    codecs = {}
    for suffix in ("index", "values"):
        streams[suffix], info = _codecs.compress(streams[suffix], effort)
        if info is not None:
            codecs[suffix] = info
    if codecs:
        entry["codecs"] = codecs
    return entry, streams


# ----- reading ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredInfo:
    """A stored tensor as the safetensors table declares it (checked to be self-consistent)."""

    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Stream:
    """One stream of a planned entry: its stored tensor's name, its raw dtype and length, its codec entry."""

    name: str
    dtype: torch.dtype
    numel: int
    codec: Optional[dict] = None


@dataclass(frozen=True)
class Plan:
    """A sparse entry checked against its declared streams: everything :func:`decode_planned` needs."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    numel: int
    nnz: int
    kind: str
    index_bits: int
    count: int  # entries of the index and values streams (nnz, or real + filler entries for "relative")
    values: str  # a float dtype name, or "codebook"
    value_bits: int
    version: int
    streams: dict[str, Stream] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """The stored tensors this entry reads."""
        return [s.name for s in self.streams.values()]


def _fail(key: str, fld: str, msg: str) -> CorruptFileError:
    return CorruptFileError(f"tensor {key!r}, field {fld!r}: {msg}")


def _int(key: str, e: dict, fld: str, low: int = 0, high: Optional[int] = None) -> int:
    v = e[fld]
    if type(v) is not int:
        raise _fail(key, fld, f"{v!r} is not an integer")
    if v < low or (high is not None and v > high):
        raise _fail(key, fld, f"{v} is outside [{low}, {high if high is not None else 'inf'}]")
    return v


def check_shape(key: str, fld: str, shape: Any) -> tuple[int, ...]:
    """A declared shape: a list of at most 16 non-negative integers.

    Raises:
        CorruptFileError: anything else.
    """
    if not isinstance(shape, list) or len(shape) > 16 or any(type(s) is not int or s < 0 for s in shape):
        raise _fail(key, fld, f"{str(shape)[:80]} is not a shape (a list of at most 16 non-negative integers)")
    return tuple(shape)


def plan(key: str, e: Any, table: dict[str, StoredInfo], budget: list[int], version: int = VERSION) -> Plan:
    """Check a sparse entry against itself and the declared streams, and charge its elements to ``budget``.

    Nothing is read or allocated: a crafted entry is refused before any stream byte is looked at.

    Args:
        key: The state-dict key (its streams are ``key::index``, ``key::values``, ``key::codebook``).
        e: Its header entry (untrusted).
        table: The stored tensors' declared dtype and shape, by name.
        budget: One-element list: elements the file may still decode to; this tensor's are subtracted.
        version: The file's format version.

    Returns:
        The checked :class:`Plan`.

    Raises:
        CorruptFileError: naming the tensor and the field: a missing, unknown or ill-typed field, a shape
            beyond the budget, an unknown encoding, counts that cannot hold, or a stream missing or not of
            exactly the dtype and length its encoding implies.
    """
    if not isinstance(e, dict):
        raise CorruptFileError(f"tensor {key!r}: malformed entry")
    missing = sorted(_REQUIRED - set(e))
    if missing:
        raise _fail(key, missing[0], "missing")
    kind, values = e["index"], e["values"]
    if not isinstance(kind, str) or kind not in _INDEX_BITS:
        raise _fail(key, "index", f"unknown index encoding {kind!r}")
    optional = {"codecs"} | ({"entries"} if kind == "relative" else set()) | (
        {"value_bits"} if values == "codebook" else set())
    unknown = sorted(set(e) - _REQUIRED - optional)
    if unknown:
        raise _fail(key, unknown[0], "not a field of this encoding")
    missing = sorted(optional - {"codecs"} - set(e))
    if missing:
        raise _fail(key, missing[0], "missing")
    shape = check_shape(key, "shape", e["shape"])
    if not isinstance(e["dtype"], str) or e["dtype"] not in WEIGHT_DTYPES:
        raise _fail(key, "dtype", f"tensor {key!r} has dtype {e['dtype']!r}; weights are one of "
                                  f"{sorted(WEIGHT_DTYPES)}")
    numel = math.prod(shape)
    if numel > budget[0]:
        raise _fail(key, "shape", f"tensor {key!r} (shape {list(shape)}) takes the file beyond max_numel elements; "
                                  "pass a larger max_numel to load(...) if the model really is that big")
    budget[0] -= numel
    nnz = _int(key, e, "nnz", 0, numel)
    bits_i = e["index_bits"]
    if type(bits_i) is not int or bits_i not in _INDEX_BITS[kind]:
        raise _fail(key, "index_bits", f"unknown index encoding {kind!r}/{bits_i!r}")
    if kind == "relative":
        count = _int(key, e, "entries", nnz, numel)
        if (count == 0) != (nnz == 0):
            raise _fail(key, "entries", f"{count} entries for {nnz} non-zeros")
    else:
        count = nnz
    dtype_name = e["dtype"]
    if values == "codebook":
        value_bits = _int(key, e, "value_bits", 1, 8)
    elif isinstance(values, str) and values in WEIGHT_DTYPES and (version >= 2 or values != "float64"):
        value_bits = 0
        if version >= 2 and values != dtype_name and not (values in _HALF and dtype_name in ("float32", "float64")):
            raise _fail(key, "values", f"{values} values for a {dtype_name} weight (lossless files store the "
                                       "weight's dtype; lossy ones float16 or bfloat16 for wider weights)")
    else:
        raise _fail(key, "values", f"unknown value encoding {values!r}")
    codecs = e.get("codecs", {})
    if not isinstance(codecs, dict) or not set(codecs) <= {"index", "values"}:
        raise _fail(key, "codecs", "malformed codecs")
    raw = {"index": (torch.uint8, (numel + 7) // 8) if kind == "bitmask" else
                    (torch.int32, nnz) if kind == "int32" else (torch.uint8, (count * bits_i + 7) // 8),
           "values": (torch.uint8, (count * value_bits + 7) // 8) if value_bits else
                     (WEIGHT_DTYPES[values], count)}
    streams = {}
    for suffix, (dtype, n) in raw.items():
        name = f"{key}::{suffix}"
        info = codecs.get(suffix)
        stored = table.get(name)
        if stored is None:
            raise _fail(key, suffix, f"the stream {name!r} is missing")
        nbytes = n * dtype.itemsize
        if info is None:
            if stored.dtype != st_name(dtype) or stored.shape != (n,):
                raise _fail(key, suffix, f"the stream {name!r} is {stored.dtype} {list(stored.shape)}; its encoding "
                                         f"implies {st_name(dtype)} [{n}]")
        else:
            if not isinstance(info, dict) or set(info) != {"codec", "raw_bytes", "dtype"}:
                raise _fail(key, "codecs", f"malformed codec entry for the {suffix} stream")
            if info["dtype"] != str(dtype)[6:] or type(info["raw_bytes"]) is not int or info["raw_bytes"] != nbytes:
                raise _fail(key, "codecs", f"the {suffix} stream announces {info['raw_bytes']!r} bytes of "
                                           f"{info['dtype']!r}; its encoding implies {nbytes} bytes of "
                                           f"{str(dtype)[6:]}")
            if not isinstance(info["codec"], str) or info["codec"] not in _codecs.CODECS:
                raise _fail(key, "codecs", f"unknown codec {info['codec']!r} for the {suffix} stream")
            if stored.dtype != "U8" or len(stored.shape) != 1 or not 0 < stored.shape[0] < nbytes:
                raise _fail(key, suffix, f"the compressed stream {name!r} is {stored.dtype} {list(stored.shape)}; a "
                                         f"compressed stream is U8 and shorter than its {nbytes} raw bytes")
        streams[suffix] = Stream(name, dtype, n, info)
    if value_bits:
        name = f"{key}::codebook"
        stored = table.get(name)
        if stored is None:
            raise _fail(key, "codebook", f"the stream {name!r} is missing")
        if stored.dtype != "F32" or len(stored.shape) != 1 or not 1 <= stored.shape[0] <= 1 << value_bits:
            raise _fail(key, "codebook", f"the codebook {name!r} is {stored.dtype} {list(stored.shape)}; it is F32 "
                                         f"with 1 to 2**value_bits = {1 << value_bits} entries")
        streams["codebook"] = Stream(name, torch.float32, stored.shape[0])
    return Plan(key, shape, WEIGHT_DTYPES[dtype_name], numel, nnz, kind, bits_i, count, values, value_bits, version,
                streams)


def _reader(p: Plan, suffix: str, stored: dict[str, Tensor]) -> _codecs.StreamReader:
    s = p.streams[suffix]
    return _codecs.StreamReader(s.name, stored[s.name], s.codec, s.numel * s.dtype.itemsize)


def _chunks(p: Plan, index: _codecs.StreamReader) -> Iterator[tuple[int, np.ndarray, Optional[np.ndarray]]]:
    """``(first entry, positions, relative codes or None)`` for each chunk of at most :data:`CHUNK` entries,
    checked: inside the weight, strictly increasing, no bits after the last index."""
    key, numel = p.key, p.numel
    if p.kind == "bitmask":
        nbytes, step, done = (numel + 7) // 8, CHUNK // 8, 0
        for b0 in range(0, nbytes, step):
            pos = np.flatnonzero(np.unpackbits(index.range(b0, min(nbytes, b0 + step)), bitorder="little"))
            if pos.size:
                pos += b0 * 8
                if pos[-1] >= numel:
                    raise _fail(key, "index", "bits set after the end of the bitmask")
                yield done, pos, None
                done += pos.size
    elif p.kind == "int32":
        last = -1
        for e0 in range(0, p.count, CHUNK):
            e1 = min(p.count, e0 + CHUNK)
            pos = index.range(4 * e0, 4 * e1).view("<i4").astype(np.int64)
            if pos[0] <= last or pos[-1] >= numel or (pos.size > 1 and np.any(np.diff(pos) <= 0)):
                raise _fail(key, "index", f"indices out of range or out of order (shape {list(p.shape)})")
            last = int(pos[-1])
            yield e0, pos, None
    else:
        bits, base = p.index_bits, -1
        for e0 in range(0, p.count, CHUNK):  # CHUNK * bits is a whole number of bytes: each chunk starts on one
            n = min(CHUNK, p.count - e0)
            buf = index.range(e0 * bits // 8, (e0 * bits + n * bits + 7) // 8)
            codes = _bits.unpack(buf, bits, n)
            if e0 + n == p.count and not _bits.padding_is_zero(buf, n * bits):
                raise _fail(key, "index", "bits set after the last relative index")
            pos = np.cumsum(codes + 1)
            pos += base
            if pos[-1] >= numel:
                raise _fail(key, "entries", f"relative indices out of range: they reach position {int(pos[-1])} of a "
                                            f"weight of shape {list(p.shape)}")
            base = int(pos[-1])
            yield e0, pos, codes


def decode_planned(p: Plan, stored: dict[str, Tensor]) -> Tensor:
    """The dense tensor of a planned entry, from its stored streams (untrusted bytes).

    The streams are read (and decompressed) forward, :data:`CHUNK` entries at a time: memory is the output
    plus a constant, time linear in the output.

    Args:
        p: The entry's :class:`Plan`.
        stored: Its stored tensors, by name (``p.names``), of the dtypes and shapes the plan checked.

    Returns:
        The dense tensor, of the entry's shape and dtype.

    Raises:
        CorruptFileError: naming the tensor and the field: a stream that does not decompress to its
            announced size, indices out of range or out of order, bits after the last code, value codes
            beyond the codebook, a codebook whose code 0 is not zero, fillers where there are none, or a
            non-zero count other than ``nnz``.
    """
    key = p.key
    index, values = _reader(p, "index", stored), _reader(p, "values", stored)
    book = None
    if p.value_bits:
        book = stored[p.streams["codebook"].name].reshape(-1)
        if book[0].item() != 0 or book[0].signbit().item():
            raise _fail(key, "codebook", "code 0 (the filler's value) is not 0.0")
    out = torch.zeros(p.numel, dtype=p.dtype)
    filler = (1 << p.index_bits) - 1
    # version 1 could store a float value rounded to zero: such an entry is a real one that loads as zero, and
    # only the entries that cannot be fillers (a non-zero value, or a code other than the filler's) are counted
    lenient = book is None and p.version < 2
    real_total = 0
    entries = 0
    for e0, pos, codes in _chunks(p, index):
        n = pos.size
        if e0 + n > p.count:
            raise _fail(key, "nnz", f"the index holds more than the {p.count} entries the header declares")
        if book is not None:
            vb, first = p.value_bits, e0 * p.value_bits
            buf = values.range(first // 8, (first + n * vb + 7) // 8)
            vcodes = _bits.unpack(buf, vb, n, first_bit=first % 8)
            if e0 + n == p.count and not _bits.padding_is_zero(buf, first % 8 + n * vb):
                raise _fail(key, "values", "bits set after the last value code")
            if vcodes.max() >= book.numel():
                raise _fail(key, "values", f"a value code is beyond its codebook of {book.numel()} entries")
            zero = vcodes == 0
            vals = book[torch.from_numpy(vcodes)]
        else:
            size = p.streams["values"].dtype.itemsize
            vals = torch.from_numpy(values.range(e0 * size, (e0 + n) * size)).view(p.streams["values"].dtype)
            zero = (vals == 0).numpy()
        if codes is None:  # bitmask and int32 entries are all real
            if zero.any() and not lenient:
                raise _fail(key, "values", "a zero value (or codebook code 0, the filler's) for a non-zero of the "
                                           "index")
            real_total += n
        else:
            misplaced = zero & (codes != filler)
            if misplaced.any() and not lenient:
                raise _fail(key, "values", "a filler's zero on an entry that is not a filler")
            real_total += n - int(zero.sum()) + (int(misplaced.sum()) if lenient else 0)
            if not lenient and e0 + n == p.count and zero[-1]:
                raise _fail(key, "entries", "the last relative entry is a filler")
        if real_total > p.nnz:
            raise _fail(key, "nnz", f"more than the {p.nnz} non-zeros the header declares")
        if zero.any():
            keep = torch.from_numpy(~zero)
            out[torch.from_numpy(pos)[keep]] = vals[keep].to(p.dtype)
        else:
            out[torch.from_numpy(pos)] = vals.to(p.dtype)
        entries = e0 + n
    if entries != p.count:
        raise _fail(key, "entries" if p.kind == "relative" else "nnz",
                    f"the index holds {entries} entries; the header declares {p.count}")
    if real_total != p.nnz and not (lenient and p.kind == "relative" and real_total < p.nnz):
        raise _fail(key, "nnz", f"the streams hold {real_total} non-zeros; the header declares {p.nnz}")
    index.finish()
    values.finish()
    return out.reshape(p.shape)


def decode(key: str, e: Any, tensors: dict[str, Tensor], budget: list[int], version: int = VERSION) -> Tensor:
    """The dense tensor of one sparse entry, from untrusted entry and streams (:func:`plan`, then
    :func:`decode_planned`, taking each stream's declared dtype and shape from the tensor itself).

    Args:
        key: The state-dict key (its streams are ``key::index``, ``key::values``, ``key::codebook``).
        e: Its header entry, as written by :func:`encode`.
        tensors: The stored tensors.
        budget: One-element list: elements the file may still decode to; this tensor's are subtracted
            before anything is decompressed.
        version: The file's format version.

    Returns:
        The dense tensor, of the entry's shape and dtype.

    Raises:
        CorruptFileError: anything malformed or inconsistent (see :func:`plan` and :func:`decode_planned`).
    """
    table = {}
    for k, t in tensors.items():
        try:
            table[k] = StoredInfo(st_name(t.dtype), tuple(t.shape))
        except TypeError as err:
            raise CorruptFileError(f"tensor {k!r}: {err}") from err
    p = plan(key, e, table, budget, version)
    return decode_planned(p, {n: tensors[n] for n in p.names})


def stored_value_dtype(weight: torch.dtype, values: Union[str, int]) -> str:
    """The dtype a float value encoding stores a weight's non-zeros in (version 2).

    Args:
        weight: The weight's dtype (a value of ``WEIGHT_DTYPES``).
        values: ``save``'s ``values`` argument, one of ``VALUE_DTYPES``' keys.

    Returns:
        ``"float32"`` (lossless) stores the weight's own dtype; ``"float16"``/``"bfloat16"`` store that dtype
        for float32 and float64 weights and the weight's own for 16-bit ones (never a conversion between the
        two 16-bit formats).
    """
    own = str(weight)[6:]
    return values if values in _HALF and own in ("float32", "float64") else own
