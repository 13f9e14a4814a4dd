"""The container: how encoded tensors sit in one safetensors file (a compressed JSON header in its metadata,
CRC32 checksums over the header and every tensor), and the reading back of a file from untrusted bytes into
a state dict, refusing anything damaged or malformed with CorruptFileError.
"""

from __future__ import annotations

import base64
import json
import os
import zlib
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from . import _sparse
from ._spec import MAGIC, VERSION, CorruptFileError

__all__ = ["DEFAULT_MAX_NUMEL", "crc", "decode_header", "decode_state", "encode_header", "read", "write"]

#: Default cap on the elements a file may decode to (1 GiB of float32): a tiny crafted file must not be
#: able to demand gigabytes. Pass ``max_numel`` to load bigger models.
DEFAULT_MAX_NUMEL = 1 << 28
_MAX_HEADER_BYTES = 1 << 24

PathLike = Union[str, os.PathLike]


def crc(t: Tensor) -> int:
    """CRC32 of a CPU tensor's bytes (0 for an empty tensor)."""
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()) if t.numel() else 0


# ----- the header ----------------------------------------------------------------------------------
def encode_header(header: dict) -> str:
    """The header as stored: compact JSON, zlib-compressed, base64 (JSON escaping would double its size).

    Args:
        header: JSON-serialisable header.

    Returns:
        The ASCII text stored in the safetensors metadata.
    """
    text = json.dumps(header, separators=(",", ":"), sort_keys=True)
    return base64.b64encode(zlib.compress(text.encode(), 9)).decode("ascii")


def decode_header(text: str) -> Any:
    """Inverse of :func:`encode_header`.

    Args:
        text: The stored text.

    Returns:
        The decoded JSON value (not yet checked to be a header).

    Raises:
        CorruptFileError: not base64, not zlib, over 16 MiB, not UTF-8 or not JSON (also too deeply nested).
    """
    try:
        packed = base64.b64decode(text, validate=True)
        d = zlib.decompressobj()
        raw = d.decompress(packed, _MAX_HEADER_BYTES)
        if d.unconsumed_tail or not d.eof:
            raise CorruptFileError("the header is truncated or larger than 16 MiB")
        return json.loads(raw.decode("utf-8"))
    except CorruptFileError:  # a ValueError too: keep its message
        raise
    except (ValueError, zlib.error, RecursionError, UnicodeDecodeError, TypeError) as e:
        raise CorruptFileError(f"the header cannot be decoded: {type(e).__name__}") from e


# ----- writing -------------------------------------------------------------------------------------
def write(path: PathLike, entries: dict[str, Any], tensors: dict[str, Tensor], tree: Optional[dict]) -> int:
    """Write one model file.

    Args:
        path: Destination file.
        entries: Header entry of each state-dict key (``{"kind": "plain" | "sparse", ...}``).
        tensors: Every stored tensor (CPU), by its stored name (``key`` or ``key::suffix``).
        tree: The module tree (see ``_tree.describe``), or None.

    Returns:
        The number of bytes written.
    """
    from safetensors.torch import save as st_save

    header = {"tensors": entries, "tree": tree, "crc32": {k: crc(v) for k, v in tensors.items()}}
    header_text = encode_header(header)
    metadata = {"format": MAGIC, "version": str(VERSION), "header": header_text,
                "header_crc32": str(zlib.crc32(header_text.encode()))}
    data = st_save(tensors, metadata=metadata)
    Path(path).write_bytes(data)
    return len(data)


# ----- reading -------------------------------------------------------------------------------------
def read(path: PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read and check a model file: framing, format name and version, header and tensor checksums.

    Args:
        path: The file.

    Returns:
        ``(header, tensors)``: the decoded header (a dict with a ``tensors`` table) and the stored tensors,
        each matching its checksum.

    Raises:
        CorruptFileError: the file is unreadable, truncated, not safetensors, from another tool or another
            version, or fails a checksum.
    """
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
        if crc(t) != crcs[k]:
            raise CorruptFileError(f"{path}: tensor {k!r} fails its checksum (the file is damaged)")
    return header, tensors


def decode_state(path: PathLike, header: dict[str, Any], tensors: dict[str, Tensor],
                 max_numel: int = DEFAULT_MAX_NUMEL) -> dict[str, Tensor]:
    """The state dict a checked file holds (see :func:`read`).

    Args:
        path: The file, for error messages.
        header: Its decoded header.
        tensors: Its stored tensors.
        max_numel: Most elements the sparse tensors may decode to, together.

    Returns:
        Every entry of the header's tensor table, dense (plain float tensors stored in half precision are
        restored to float32).

    Raises:
        CorruptFileError: a malformed or unknown entry, a missing tensor, or a sparse entry that does not
            decode (see ``_sparse.decode``).
    """
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
            out[key] = _sparse.decode(key, e, tensors, budget)
        else:
            raise CorruptFileError(f"{path}: unknown entry kind {e.get('kind')!r} for {key!r}")
    return out
