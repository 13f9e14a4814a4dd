"""Byte codecs of the compressed file format: each stream is stored raw, zlib- or lzma-compressed, whichever
is smallest (general-purpose entropy coders, as Deep Compression's Huffman stage), and is decompressed
without ever producing more bytes than its header entry announced.
"""

from __future__ import annotations

import lzma
import zlib
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ._spec import VALUE_DTYPES, CorruptFileError

__all__ = ["CODECS", "STREAM_DTYPES", "compress", "decompress"]

_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
#: Codec name (as stored in the header) -> compressor; tried in this order, the first of equal sizes wins.
CODECS: dict[str, Callable[[bytes], bytes]] = {
    "zlib": lambda b: zlib.compress(b, 9),
    "lzma": lambda b: lzma.compress(b, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS),
}
#: Dtypes a compressed stream may decompress to.
STREAM_DTYPES = {"uint8": torch.uint8, "int32": torch.int32, **VALUE_DTYPES}


def compress(stream: Tensor) -> tuple[Tensor, Optional[dict[str, Any]]]:
    """The smallest of the stream's raw bytes and each codec's output.

    Args:
        stream: A CPU tensor of one of :data:`STREAM_DTYPES`.

    Returns:
        ``(stored, info)``: ``stream`` itself and ``None`` when no codec makes it smaller, else a uint8 tensor
        of the compressed bytes and the header entry that undoes it (``codec``, ``raw_bytes``, ``dtype``).
    """
    # (an empty tensor made from numpy has stride 0, which .view refuses)
    raw = stream.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if stream.numel() else b""
    best: tuple[bytes, Optional[str]] = (raw, None)
    for name, fn in CODECS.items():
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
