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

import numpy as np

import torch
from torch import Tensor

from ._spec import WEIGHT_DTYPES, CorruptFileError

__all__ = ["CODECS", "EFFORTS", "STREAM_DTYPES", "StreamReader", "compress", "decompress"]

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
STREAM_DTYPES = {"uint8": torch.uint8, "int32": torch.int32, **WEIGHT_DTYPES}


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


#: Compressed bytes handed to a decompressor at a time (what it keeps of unconsumed input is a copy).
_FEED = 1 << 20


class StreamReader:
    """The raw bytes of one stored stream, read forward in byte ranges, for untrusted input.

    A compressed stream is decompressed as the ranges ask for it, fed 1 MiB of input at a time and never
    asked for more than the ``nbytes`` announced, so memory is the largest range asked for plus a constant,
    not the stream; lzma's dictionary is no larger than ``nbytes`` (any match reaches back at most that far,
    so a smaller dictionary than the writer's decodes the same stream). :meth:`finish` checks that the
    stream was read to its end and that the compressed data ends exactly there.

    Args:
        key: The stream's name, for error messages.
        stored: The stored tensor (a compressed stream: uint8).
        info: Its codec entry (``codec``, ``raw_bytes``, ``dtype``; checked by the caller), or None for a
            stream stored raw (its length checked by the caller).
        nbytes: The raw length.
    """

    def __init__(self, key: str, stored: Tensor, info: Optional[dict], nbytes: int) -> None:
        self.key, self.total = key, nbytes
        self._data = (stored.contiguous().reshape(-1).view(torch.uint8).numpy() if stored.numel()
                      else np.zeros(0, np.uint8))
        self._codec = None if info is None else info["codec"]
        if self._codec == "zlib":
            self._d: Any = zlib.decompressobj()
        elif self._codec == "lzma":
            size = min(_LZMA_MAX_DICT, max(4096, nbytes))
            self._d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=[{**_LZMA_FILTERS[0], "dict_size": size}])
        elif self._codec is not None:
            raise CorruptFileError(f"stream {key!r}: unknown codec {self._codec!r}")
        self._fed = 0  # compressed bytes handed to the decompressor
        self._buf = np.zeros(0, np.uint8)  # bytes [base, end) of the raw stream
        self._base = self._end = 0

    def _pull(self, limit: int) -> bytes:
        """Up to ``limit`` decompressed bytes; b"" only once the stream has ended or its input is spent."""
        d = self._d
        idle = 0  # calls in a row that took no input and gave no output
        try:
            while not d.eof and idle < 2:
                if self._codec == "zlib" and d.unconsumed_tail:
                    src = d.unconsumed_tail
                elif self._codec == "zlib" or d.needs_input:
                    src = self._data[self._fed:self._fed + _FEED]
                    self._fed += len(src)
                else:
                    src = b""
                chunk = d.decompress(src, limit) if self._codec == "zlib" else d.decompress(src, max_length=limit)
                if chunk:
                    return chunk
                idle = idle + 1 if not len(src) else 0
        except (zlib.error, lzma.LZMAError, EOFError) as e:
            raise CorruptFileError(f"stream {self.key!r} does not decompress: {e}") from e
        return b""

    def _more(self, n: int) -> bytes:
        out, got = [], 0
        while got < n:
            chunk = self._pull(n - got)
            if not chunk:
                raise CorruptFileError(f"stream {self.key!r} decompresses to {self._end + got} bytes, the header "
                                       f"says {self.total}")
            out.append(chunk)
            got += len(chunk)
        return b"".join(out)

    def range(self, b0: int, b1: int) -> np.ndarray:
        """Bytes ``[b0, b1)`` of the raw stream, ``b0`` at least the start of the previous range."""
        if not self._base <= b0 <= b1 <= self.total:
            raise ValueError(f"bytes [{b0}, {b1}) of {self.total}, read forward from {self._base}")
        if self._codec is None:
            self._base = b0
            return self._data[b0:b1]
        held = self._buf[b0 - self._base:]
        if b1 > self._end:
            held = np.concatenate([held, np.frombuffer(self._more(b1 - self._end), np.uint8)])
            self._end = b1
        self._buf, self._base = held, b0
        return held[:b1 - b0]

    def finish(self) -> None:
        """Check that the whole stream was read and that a compressed one ends exactly there.

        Raises:
            CorruptFileError: it was not read to its end, or compressed data goes on after it, does not end,
                or is followed by other bytes.
        """
        if self._codec is None:
            return
        if self._end != self.total:
            self.range(self._base, self.total)
        self._buf = np.zeros(0, np.uint8)
        if self._pull(1):
            raise CorruptFileError(f"stream {self.key!r} decompresses to more than the {self.total} bytes the header "
                                   "announces")
        if not self._d.eof:
            raise CorruptFileError(f"stream {self.key!r} does not end after the {self.total} bytes the header "
                                   "announces (truncated)")
        if self._d.unused_data or self._fed < self._data.size:
            raise CorruptFileError(f"stream {self.key!r}: other bytes follow the compressed data")


def decompress(key: str, stored: Tensor, info: dict) -> Tensor:
    """Inverse of :func:`compress`, for untrusted input (the whole stream at once; see :class:`StreamReader`).

    Args:
        key: The stream's name, for error messages.
        stored: The stored uint8 tensor.
        info: The header entry written by :func:`compress`.

    Returns:
        A flat tensor of ``info["dtype"]`` holding exactly ``info["raw_bytes"]`` bytes.

    Raises:
        CorruptFileError: an unknown codec or dtype, data that does not decompress, ends before or after
            the announced length, or is followed by other bytes.
        KeyError, TypeError, ValueError: ``info`` lacks an entry or has one of the wrong type (the caller
            reports these as a damaged file).
    """
    raw_bytes, codec = int(info["raw_bytes"]), info["codec"]
    dtype = STREAM_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None or raw_bytes < 0 or not isinstance(codec, str) or codec not in CODECS:
        raise CorruptFileError(f"stream {key!r}: unknown codec {codec!r} or dtype {info['dtype']!r}")
    if raw_bytes % dtype.itemsize:
        raise CorruptFileError(f"stream {key!r}: {raw_bytes} bytes is no whole number of {info['dtype']}")
    reader = StreamReader(key, stored, info, raw_bytes)
    raw = reader.range(0, raw_bytes).copy()
    reader.finish()
    return torch.from_numpy(raw).view(dtype) if raw.size else torch.empty(0, dtype=dtype)
