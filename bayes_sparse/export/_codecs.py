"""Byte codecs of the compressed file format: each stream is stored raw, zlib- or lzma-compressed, whichever
is smallest (general-purpose entropy coders, as Deep Compression's Huffman stage), and is decompressed
without ever producing more bytes than its header entry announced.

Each codec name stands for one decoder; the writer may try several encoder settings under a name (any
zlib stream is read by the same ``zlib`` decoder; any raw LZMA2 stream whose dictionary is at most
64 MiB by the same ``lzma`` decoder, since LZMA2 carries its literal/position settings in the stream).
``effort="best"`` tries every setting, at about 0.1-0.2 us per byte per lzma setting. ``effort="fast"``
tries only zlib's run-length strategy (Huffman coding plus runs, no string search), at a few ns per byte:
on the streams of a 90%-sparse densenet121 its index streams come out as small as the best setting's (the
string search of deflate's default strategy makes them larger, by breaking the literal statistics), its
float32 value streams about 15% larger (lzma with byte-position contexts codes the sign/exponent byte of
each float better than any single Huffman table can).
"""

from __future__ import annotations

import lzma
import zlib
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ._spec import VALUE_DTYPES, CorruptFileError

__all__ = ["CODECS", "EFFORTS", "STREAM_DTYPES", "compress", "decompress"]

#: The decoder's filter chain (files since version 1 were written with it): a 64 MiB dictionary.
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
_LZMA_MAX_DICT = 64 << 20


def _zlib(level: int = 9, strategy: int = zlib.Z_DEFAULT_STRATEGY) -> Callable[[bytes], bytes]:
    def fn(b: bytes) -> bytes:
        c = zlib.compressobj(level, zlib.DEFLATED, 15, 8, strategy)
        return c.compress(b) + c.flush()
    return fn


def _lzma(lc: int = 3, lp: int = 0, pb: int = 2) -> Callable[[bytes], bytes]:
    """LZMA2 at preset 9 extreme, its dictionary no larger than the input needs (a 64 MiB one costs about
    25 ms to set up per call, and a dictionary beyond the input's length changes nothing)."""
    def fn(b: bytes) -> bytes:
        size = min(_LZMA_MAX_DICT, max(4096, 1 << max(len(b) - 1, 1).bit_length()))
        f = {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": size, "lc": lc, "lp": lp, "pb": pb}
        return lzma.compress(b, format=lzma.FORMAT_RAW, filters=[f])
    return fn


#: Codec name (as stored in the header) -> its default compressor (the format's reference settings).
CODECS: dict[str, Callable[[bytes], bytes]] = {"zlib": _zlib(9), "lzma": _lzma()}
#: How hard :func:`compress` tries.
EFFORTS = ("fast", "best")
_RLE = _zlib(9, zlib.Z_RLE)
_HUFFMAN = _zlib(9, zlib.Z_HUFFMAN_ONLY)
#: LZMA2 position bits for streams of 2- and 4-byte elements (lp = pb = log2 of the element size: the
#: literal coder sees each byte's place in its element, e.g. a float32's sign/exponent byte).
_ALIGNED = {2: _lzma(lc=0, lp=1, pb=1), 4: _lzma(lc=0, lp=2, pb=2)}
#: Dtypes a compressed stream may decompress to.
STREAM_DTYPES = {"uint8": torch.uint8, "int32": torch.int32, **VALUE_DTYPES}


def _candidates(effort: str, itemsize: int) -> list[tuple[str, Callable[[bytes], bytes]]]:
    if effort == "fast":
        return [("zlib", _RLE)]
    if effort != "best":
        raise ValueError(f"effort must be one of {EFFORTS}, got {effort!r}")
    out = [("zlib", CODECS["zlib"]), ("zlib", _RLE), ("zlib", _HUFFMAN), ("lzma", CODECS["lzma"])]
    if itemsize in _ALIGNED:
        out.append(("lzma", _ALIGNED[itemsize]))
    return out


def compress(stream: Tensor, effort: str = "best") -> tuple[Tensor, Optional[dict[str, Any]]]:
    """The smallest of the stream's raw bytes and each tried codec setting's output.

    Args:
        stream: A CPU tensor of one of :data:`STREAM_DTYPES`.
        effort: ``"best"``: every setting of every codec (zlib's default, run-length and Huffman-only
            strategies; lzma at preset 9 extreme, and with byte-position contexts for 2- and 4-byte
            elements), about 0.2 us per byte; ``"fast"``: zlib's run-length strategy alone, a few ns
            per byte.

    Returns:
        ``(stored, info)``: ``stream`` itself and ``None`` when no codec makes it smaller, else a uint8 tensor
        of the compressed bytes and the header entry that undoes it (``codec``, ``raw_bytes``, ``dtype``).
        On equal sizes the earlier setting in the list above wins.

    Raises:
        ValueError: an unknown ``effort``.
    """
    candidates = _candidates(effort, stream.element_size())
    # (an empty tensor made from numpy has stride 0, which .view refuses)
    raw = stream.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if stream.numel() else b""
    best: tuple[bytes, Optional[str]] = (raw, None)
    for name, fn in candidates:
        packed = fn(raw)
        if len(packed) < len(best[0]):
            best = (packed, name)
    if best[1] is None:
        return stream, None
    info = {"codec": best[1], "raw_bytes": len(raw), "dtype": str(stream.dtype)[6:]}
    return torch.frombuffer(bytearray(best[0]), dtype=torch.uint8), info


def decompress(key: str, stored: Tensor, info: dict) -> Tensor:
    """Inverse of :func:`compress`, for untrusted input.

    Args:
        key: The stream's name, for error messages.
        stored: The stored uint8 tensor.
        info: The header entry written by :func:`compress`.

    Returns:
        A flat tensor of ``info["dtype"]`` holding exactly ``info["raw_bytes"]`` bytes.

    Raises:
        CorruptFileError: an unknown codec or dtype, data that does not decompress, or a length other than
            the announced one (decompression stops at the announced length).
        KeyError, TypeError, ValueError: ``info`` lacks an entry or has one of the wrong type (the caller
            reports these as a damaged file).
    """
    raw_bytes, codec = int(info["raw_bytes"]), info["codec"]
    dtype = STREAM_DTYPES.get(info["dtype"])
    if dtype is None or raw_bytes < 0 or codec not in CODECS:
        raise CorruptFileError(f"stream {key!r}: unknown codec {codec!r} or dtype {info['dtype']!r}")
    data = stored.numpy().tobytes()
    try:
        if codec == "zlib":
            d = zlib.decompressobj()
            raw = d.decompress(data, max(raw_bytes, 1))  # never more than announced (0 would mean no limit)
        else:
            d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
            raw = d.decompress(data, max_length=raw_bytes)
    except (zlib.error, lzma.LZMAError) as e:
        raise CorruptFileError(f"stream {key!r} does not decompress: {e}") from e
    if len(raw) != raw_bytes or raw_bytes % torch.tensor([], dtype=dtype).element_size():
        raise CorruptFileError(f"stream {key!r} decompresses to {len(raw)} bytes, the header says {raw_bytes}")
    return torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
