"""Bit packing and the index/value encodings of the compressed file format (numpy, no state)."""

from __future__ import annotations

import numpy as np

__all__ = ["choose_index_encoding", "decode_relative", "encode_relative", "kmeans_codebook", "pack", "padding_is_zero",
           "relative_entries", "unpack"]


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integers < 2**bits into a uint8 array, ``bits`` bits each, little-endian bit order."""
    codes = np.asarray(codes, dtype=np.uint32)
    if codes.size and int(codes.max()) >= (1 << bits):
        raise ValueError(f"a code does not fit in {bits} bits")
    if bits in (8, 16):  # whole bytes: the little-endian bytes of each code, as the general path lays them
        return codes.astype("<u1" if bits == 8 else "<u2").view(np.uint8)
    bit_planes = ((codes[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(bit_planes.reshape(-1), bitorder="little")


def unpack(packed: np.ndarray, bits: int, count: int, start: int = 0, first_bit: int = -1) -> np.ndarray:
    """Inverse of :func:`pack`: the ``count`` integers of ``bits`` bits from the ``start``-th on (int64), or
    from bit ``first_bit`` of ``packed`` when that is given.

    Works in memory proportional to ``count`` (about 40 bytes per code for widths other than 8 and 16), so
    a long stream can be read in chunks.

    Raises:
        ValueError: ``bits`` outside [1, 16], or ``packed`` too short for the codes asked for.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"codes of {bits} bits: the format packs 1 to 16")
    first = start * bits if first_bit < 0 else first_bit
    needed = (first + count * bits + 7) // 8
    if packed.size < needed or first < 0 or count < 0:
        raise ValueError(f"{packed.size} bytes hold fewer than {count} codes of {bits} bits from bit {first}")
    if count == 0:
        return np.zeros(0, np.int64)
    b0 = first >> 3
    if bits == 8 and first % 8 == 0:
        return packed[b0:b0 + count].astype(np.int64)
    if bits == 16 and first % 8 == 0:
        return packed[b0:b0 + 2 * count].view("<u2").astype(np.int64)
    window = np.zeros(needed - b0 + 2, np.uint32)  # a code lies within 3 bytes: shift <= 7, 7 + 16 < 24 bits
    window[:needed - b0] = packed[b0:needed]
    offsets = np.arange(count, dtype=np.int64) * bits + (first & 7)
    at = offsets >> 3
    word = window[at] | (window[at + 1] << 8) | (window[at + 2] << 16)
    return ((word >> (offsets & 7).astype(np.uint32)) & np.uint32((1 << bits) - 1)).astype(np.int64)


def padding_is_zero(packed: np.ndarray, nbits: int) -> bool:
    """Whether the bits of ``packed`` after the first ``nbits`` are all zero (as :func:`pack` and
    ``np.packbits`` leave them), ``packed`` holding exactly ``ceil(nbits / 8)`` bytes."""
    tail = nbits % 8
    return tail == 0 or packed.size == 0 or int(packed[-1]) >> tail == 0


def encode_relative(positions: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Deep Compression's relative indices: each entry advances ``code + 1`` positions; a gap longer than
    ``2**bits`` is bridged by filler entries (code ``2**bits - 1``, value 0).

    Returns:
        ``(codes, is_real)``: one code per entry, and which entries carry a real (non-filler) value.
    """
    span = 1 << bits
    gaps = np.diff(np.concatenate([[-1], positions.astype(np.int64)]))
    fillers = (gaps - 1) // span
    codes = np.full(int(fillers.sum() + gaps.size), span - 1, dtype=np.int64)
    is_real = np.zeros(codes.size, dtype=bool)
    real_at = np.cumsum(fillers + 1) - 1
    codes[real_at] = gaps - fillers * span - 1
    is_real[real_at] = True
    return codes, is_real


def decode_relative(codes: np.ndarray, bits: int) -> np.ndarray:
    """Positions written by each entry of :func:`encode_relative` (fillers included)."""
    return np.cumsum(codes + 1) - 1


def relative_entries(positions: np.ndarray, bits: int) -> int:
    """Number of entries (real + filler) :func:`encode_relative` would write."""
    gaps = np.diff(np.concatenate([[-1], positions.astype(np.int64)]))
    return int(((gaps - 1) >> bits).sum() + gaps.size)


def choose_index_encoding(positions: np.ndarray, numel: int, value_bits: int) -> tuple[str, int, int]:
    """The cheapest of: a bitmask, relative indices of 1-16 bits with fillers, absolute int32 indices.

    Returns:
        ``(kind, index_bits, total_bits)`` with kind in {"bitmask", "relative", "int32"}.
    """
    nnz = positions.size
    best = ("bitmask", 1, numel + nnz * value_bits)
    absolute = ("int32", 32, nnz * (32 + value_bits))
    if absolute[2] < best[2]:
        best = absolute
    gaps = np.diff(np.concatenate([[-1], positions.astype(np.int64)])) - 1  # as relative_entries, computed once
    for bits in range(1, 17):
        total = (int((gaps >> bits).sum()) + gaps.size) * (bits + value_bits)
        if total < best[2]:
            best = ("relative", bits, total)
    return best


def kmeans_codebook(values: np.ndarray, k: int, iters: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """1-D k-means (Lloyd) with linear initialisation, as in Deep Compression.

    Returns:
        ``(codebook float32 of size <= k, codes int64)`` with ``codebook[codes]`` approximating ``values``.
    """
    v = values.astype(np.float64)
    if v.size == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    centers = np.linspace(v.min(), v.max(), num=min(k, max(1, np.unique(v).size)))
    for _ in range(iters):
        codes = _nearest(v, centers)
        sums = np.bincount(codes, weights=v, minlength=centers.size)
        counts = np.bincount(codes, minlength=centers.size)
        new = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), centers))
        if np.allclose(new, centers):
            break
        centers = new
    return centers.astype(np.float32), _nearest(v, centers.astype(np.float32).astype(np.float64))


def _nearest(v: np.ndarray, sorted_centers: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted centers, in O(n log k) time and O(n) memory."""
    if sorted_centers.size == 1:
        return np.zeros(v.size, np.int64)
    mids = (sorted_centers[1:] + sorted_centers[:-1]) / 2
    return np.searchsorted(mids, v).astype(np.int64)
