"""One sparse weight in a file: its header entry and streams (index encoding, value encoding, codebook),
written for a chosen encoding, and read back into the dense tensor from untrusted entry and streams.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from . import _bits, _codecs
from ._spec import VALUE_DTYPES, WEIGHT_DTYPES, CorruptFileError

__all__ = ["decode", "encode"]


def encode(t: Tensor, positions: np.ndarray, nz: np.ndarray, values: Union[str, int], book: Optional[np.ndarray],
           codes_v: Optional[np.ndarray], kind: str, bits_i: int, container_bits: int,
           effort: str = "best") -> tuple[dict[str, Any], dict[str, Tensor]]:
    """One encoding of a sparse weight: its header entry and its (codec-compressed) streams.

    Args:
        t: The weight (its shape and dtype are recorded).
        positions: Flat indices of its non-zeros, ascending.
        nz: Their values (float32).
        values: The value encoding, a key of ``VALUE_DTYPES`` (used when ``book`` is None).
        book: Codebook of the non-zero values, or None to store them as floats.
        codes_v: Each non-zero's codebook index (with ``book``).
        kind: Index encoding: ``"bitmask"``, ``"int32"`` or ``"relative"``.
        bits_i: Bits per relative index (recorded for every kind).
        container_bits: Bits per stored codebook code (with ``book``); code 0 is the exact zero of fillers.
        effort: How hard the codecs try (see ``_codecs.compress``).

    Returns:
        ``(entry, streams)``: the header entry and the tensors to store, by suffix (``index``, ``values``,
        ``codebook``), each compressed when that is smaller (the entry's ``codecs`` says how).
    """
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
        streams[suffix], info = _codecs.compress(streams[suffix], effort)
        if info is not None:
            codecs[suffix] = info
    if codecs:
        entry["codecs"] = codecs
    return entry, streams


def decode(key: str, e: dict, tensors: dict[str, Tensor], budget: list[int]) -> Tensor:
    """The dense tensor of one sparse entry, from untrusted entry and streams.

    Args:
        key: The state-dict key (its streams are ``key::index``, ``key::values``, ``key::codebook``).
        e: Its header entry, as written by :func:`encode`.
        tensors: The stored tensors.
        budget: One-element list: elements the file may still decode to; this tensor's are subtracted
            before anything is decompressed.

    Returns:
        The dense tensor, of the entry's shape and dtype.

    Raises:
        CorruptFileError: anything malformed or inconsistent (a shape beyond the budget, an unknown
            encoding, a stream that does not decompress to its announced size, indices out of range or
            out of order, value codes beyond the codebook, counts that disagree).
    """
    try:
        shape = [int(s) for s in e["shape"]]
        if e["dtype"] not in WEIGHT_DTYPES:
            raise CorruptFileError(f"tensor {key!r} has dtype {e['dtype']!r}; weights are one of "
                                   f"{sorted(WEIGHT_DTYPES)}")
        dtype = WEIGHT_DTYPES[e["dtype"]]
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
                stored = _codecs.decompress(f"{key}::{suffix}", stored, codecs[suffix])
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
