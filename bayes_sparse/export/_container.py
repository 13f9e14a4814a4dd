"""The container: how encoded tensors sit in one safetensors file, and the reading back of a file from
untrusted bytes into a state dict, refusing anything damaged or malformed with CorruptFileError.

A file is plain safetensors: an 8-byte length, a JSON header (the tensor table and a ``__metadata__`` map of
``format``, ``version``, ``header`` and ``header_crc32``), then the tensors' bytes, back to back. The package's
own header (``header``: compact JSON, zlib, base64) holds the state-dict entries (``tensors``), the module tree
(``tree``) and, since version 2, ``streams``: a copy of the whole tensor table, with each stored tensor's
dtype, shape, byte offsets and CRC32. ``header_crc32`` covers that header, so every byte that decides how the
data is read is checksummed: the tensor table must equal its copy field for field, the metadata map must hold
exactly those four keys, and the tensors must tile the data exactly. Version 1 files (a CRC32 per tensor, no
copy of the table) are read too, with every check that does not need the copy.

Reading (:func:`load`) follows this order, so that a crafted file costs at most what it declares: refuse
anything but a regular file before reading; read the length and the JSON header (at most 32 MiB) and check
them; check every state-dict entry against the tensor table and charge its elements to ``max_numel``; check
the module tree against the entries and charge its modules and parameters; refuse a file whose size is not
exactly what its header implies; only then read the data, check every CRC32 and decode, one tensor at a time.
"""

from __future__ import annotations

import base64
import json
import math
import os
import stat
import zlib
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from . import _sparse, _tree
from ._spec import HEADER_BYTE_COST, MAGIC, READ_VERSIONS, ST_DTYPES, VERSION, CorruptFileError, st_name

__all__ = ["DEFAULT_MAX_NUMEL", "crc", "decode_header", "decode_state", "encode_header", "load", "read", "write"]

#: Default cap on the elements a file may decode to (1 GiB of float32): a tiny crafted file must not be
#: able to demand gigabytes. Pass ``max_numel`` to load bigger models.
DEFAULT_MAX_NUMEL = 1 << 28
_MAX_HEADER_BYTES = 1 << 24
#: Largest safetensors JSON header read (the package header inside it decompresses to at most 16 MiB).
_MAX_ST_HEADER = 1 << 25
_META_KEYS = {"format", "version", "header", "header_crc32"}
_HEADER_KEYS = {1: {"tensors", "tree", "crc32"}, 2: {"tensors", "tree", "streams"}}

PathLike = Union[str, os.PathLike]


def _bytes_of(t: Tensor) -> memoryview:
    """The bytes of a CPU tensor, without a copy when it is contiguous."""
    if not t.numel():
        return memoryview(b"")
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def crc(t: Tensor) -> int:
    """CRC32 of a CPU tensor's bytes (0 for an empty tensor)."""
    return zlib.crc32(_bytes_of(t))


# ----- JSON ----------------------------------------------------------------------------------------
def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise CorruptFileError(f"the key {k!r} appears twice in a JSON object")
        out[k] = v
    return out


def _constant(name: str) -> Any:
    raise CorruptFileError(f"{name} is not a JSON value")


def strict_json(text: Union[str, bytes]) -> Any:
    """Parse JSON, refusing duplicate keys in an object and the non-standard NaN/Infinity.

    Raises:
        CorruptFileError: a duplicate key or a non-standard constant.
        ValueError, RecursionError, UnicodeDecodeError: not JSON (the callers report these).
    """
    return json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant)


# ----- the header ----------------------------------------------------------------------------------
def encode_header(header: dict) -> str:
    """The header as stored: compact JSON, zlib-compressed, base64 (JSON escaping would double its size).

    Args:
        header: JSON-serialisable header.

    Returns:
        The ASCII text stored in the safetensors metadata.
    """
    text = json.dumps(header, separators=(",", ":"), sort_keys=True, allow_nan=False)
    return base64.b64encode(zlib.compress(text.encode(), 9)).decode("ascii")


def decode_header(text: str, max_bytes: int = _MAX_HEADER_BYTES) -> Any:
    """Inverse of :func:`encode_header`.

    Args:
        text: The stored text.
        max_bytes: Refuse a header that decompresses to more bytes than this (and than 16 MiB).

    Returns:
        The decoded JSON value (not yet checked to be a header).

    Raises:
        CorruptFileError: not base64, not zlib, over the limit, not UTF-8, not JSON (also too deeply
            nested), or an object with a key twice.
    """
    return _decode_header(text, max_bytes)[0]


def _decode_header(text: str, max_bytes: int) -> tuple[Any, int]:
    try:
        packed = base64.b64decode(text, validate=True)
        d = zlib.decompressobj()
        limit = max(min(max_bytes, _MAX_HEADER_BYTES), 0)
        raw = d.decompress(packed, limit + 1)
        if len(raw) > limit:
            raise CorruptFileError(f"the header decompresses to more than {limit} bytes" + (
                "" if limit == _MAX_HEADER_BYTES else " (beyond max_numel: pass a larger one if the file is sound)"))
        if d.unconsumed_tail or not d.eof or d.unused_data:
            raise CorruptFileError("the header is truncated or larger than 16 MiB")
        return strict_json(raw.decode("utf-8")), len(raw)
    except CorruptFileError:  # a ValueError too: keep its message
        raise
    except (ValueError, zlib.error, RecursionError, UnicodeDecodeError, TypeError) as e:
        raise CorruptFileError(f"the header cannot be decoded: {type(e).__name__}") from e


# ----- writing -------------------------------------------------------------------------------------
def write(path: PathLike, entries: dict[str, Any], tensors: dict[str, Tensor], tree: Optional[dict]) -> int:
    """Write one model file (version :data:`~bayes_sparse.export._spec.VERSION`).

    The tensors are laid out by element size, largest first (each starts aligned to its element size), then
    by name; the JSON header is padded with spaces to a multiple of 8 bytes, as safetensors does.

    Args:
        path: Destination file.
        entries: Header entry of each state-dict key (``{"kind": "plain" | "sparse", ...}``).
        tensors: Every stored tensor (CPU), by its stored name (``key`` or ``key::suffix``).
        tree: The module tree (see ``_tree.describe``), or None.

    Returns:
        The number of bytes written.

    Raises:
        TypeError: a tensor of a dtype the format does not store.
    """
    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    streams: dict[str, dict[str, Any]] = {}
    blobs = []
    offset = 0
    for k in names:
        t = tensors[k].detach().cpu().contiguous()
        blob = _bytes_of(t)
        streams[k] = {"dtype": st_name(t.dtype), "shape": list(t.shape), "offsets": [offset, offset + blob.nbytes],
                      "crc32": zlib.crc32(blob)}
        blobs.append(blob)
        offset += blob.nbytes
    header_text = encode_header({"tensors": entries, "tree": tree, "streams": streams})
    metadata = {"format": MAGIC, "version": str(VERSION), "header": header_text,
                "header_crc32": str(zlib.crc32(header_text.encode()))}
    table = {k: {"dtype": s["dtype"], "shape": s["shape"], "data_offsets": s["offsets"]} for k, s in streams.items()}
    text = json.dumps({"__metadata__": metadata, **table}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for blob in blobs:
            f.write(blob)
    return 8 + len(text) + offset


# ----- reading: the frame ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Stored:
    """One row of the tensor table, checked: dtype name, shape, byte range in the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def info(self) -> _sparse.StoredInfo:
        return _sparse.StoredInfo(self.dtype, self.shape)


@dataclass
class _Frame:
    """A file whose frame and headers are checked; its data not yet read."""

    path: str
    file: Any
    version: int
    header: dict[str, Any]
    table: dict[str, _Stored]
    data_len: int


def _fail(path: Any, msg: str) -> CorruptFileError:
    return CorruptFileError(f"{path}: {msg}")


def _read_exactly(f: Any, n: int, path: Any, what: str) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = f.readinto(view[got:])
        if not k:
            raise _fail(path, f"the file ended {n - got} bytes before the end of its {what} (it changed while read?)")
        got += k
    return buf


def _open(path: PathLike) -> Any:
    """Open a regular file for reading; anything else is refused before a byte is read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
                     | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    except (OSError, ValueError, TypeError) as e:
        raise CorruptFileError(f"cannot read {path}: {e}") from e
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                    "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else
                    "not a regular file")
            raise CorruptFileError(f"{path} is {kind}, not a regular file: refused without reading it")
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def _table_row(path: Any, name: Any, info: Any) -> _Stored:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise _fail(path, f"the safetensors entry of {name!r} is malformed")
    dtype, offsets = info["dtype"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ST_DTYPES:
        raise _fail(path, f"tensor {name!r}, field 'dtype': {dtype!r} is not one of {sorted(ST_DTYPES)}")
    try:
        shape = _sparse.check_shape(name, "shape", info["shape"])
    except CorruptFileError as e:
        raise _fail(path, str(e)) from e
    if (not isinstance(offsets, list) or len(offsets) != 2 or any(type(o) is not int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise _fail(path, f"tensor {name!r}, field 'data_offsets': {str(offsets)[:60]} is not a byte range")
    if offsets[1] - offsets[0] != math.prod(shape) * ST_DTYPES[dtype].itemsize:
        raise _fail(path, f"tensor {name!r}, field 'data_offsets': {offsets[1] - offsets[0]} bytes for {dtype} "
                          f"{list(shape)}")
    return _Stored(dtype, shape, offsets[0], offsets[1])


def _frame(path: PathLike, budget: Optional[list[int]] = None) -> _Frame:
    """Open a file and check everything before its data: framing, both headers, the tensor table and (for
    version 2) its checksummed copy, and that the file is exactly as long as the table implies. With
    ``budget``, each byte of the JSON headers costs ``HEADER_BYTE_COST`` elements of it, charged before the
    bytes are read or decompressed."""
    budget = [1 << 62] if budget is None else budget
    f = _open(path)
    try:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise CorruptFileError(f"{path} has {size} bytes: too short for a safetensors file (truncated?)")
        n = int.from_bytes(_read_exactly(f, 8, path, "length field"), "little")
        if n > size - 8:
            raise _fail(path, f"the safetensors header claims {n} bytes but the file has {size - 8} after the length "
                              "field (truncated or not a safetensors file)")
        if n > _MAX_ST_HEADER:
            raise _fail(path, f"the safetensors header claims {n} bytes; this reader takes at most {_MAX_ST_HEADER}")
        if n * HEADER_BYTE_COST > budget[0]:
            raise _fail(path, f"the safetensors header of {n} bytes takes the file beyond max_numel (each byte costs "
                              f"{HEADER_BYTE_COST} elements); pass a larger max_numel if the file is sound")
        budget[0] -= n * HEADER_BYTE_COST
        try:
            head = strict_json(bytes(_read_exactly(f, n, path, "header")).decode("utf-8"))
        except CorruptFileError as e:
            raise _fail(path, f"the safetensors header is malformed: {e}") from e
        except (ValueError, RecursionError, UnicodeDecodeError) as e:
            raise _fail(path, f"is not a readable safetensors file: {type(e).__name__}: {e}") from e
        if not isinstance(head, dict):
            raise _fail(path, "is not a readable safetensors file: its header is not a JSON object")
        meta = head.pop("__metadata__", None)
        fmt = meta.get("format") if isinstance(meta, dict) else None
        if fmt != MAGIC:
            raise CorruptFileError(f"{path} is a safetensors file but not a bayes_sparse model file (format {fmt!r}); "
                                   "write it with bayes_sparse.export.save")
        declared = meta.get("version")
        version = {str(v): v for v in READ_VERSIONS}.get(declared) if isinstance(declared, str) else None
        if version is None:
            raise CorruptFileError(f"{path} has bayes_sparse format version {declared!r}; this library reads versions "
                                   f"{', '.join(map(str, READ_VERSIONS))}")
        if set(meta) != _META_KEYS or not all(isinstance(v, str) for v in meta.values()):
            raise _fail(path, f"the metadata holds {sorted(meta)}; a model file holds exactly {sorted(_META_KEYS)} "
                              "(strings)")
        if str(zlib.crc32(meta["header"].encode())) != meta["header_crc32"]:
            raise _fail(path, "the header checksum does not match (the file is damaged)")
        try:
            header, inner_bytes = _decode_header(meta["header"], budget[0] // HEADER_BYTE_COST)
        except CorruptFileError as e:
            raise _fail(path, str(e)) from e
        budget[0] -= inner_bytes * HEADER_BYTE_COST
        if not isinstance(header, dict) or not isinstance(header.get("tensors"), dict):
            raise _fail(path, "the header has no tensor table")
        if set(header) != _HEADER_KEYS[version]:
            raise _fail(path, f"the header holds {sorted(header)}; a version {version} header holds "
                              f"{sorted(_HEADER_KEYS[version])}")
        table = {name: _table_row(path, name, info) for name, info in head.items()}
        data_len = 0
        for row in sorted(table.values(), key=lambda r: (r.start, r.end)):
            if row.start != data_len:
                raise _fail(path, f"the tensors do not tile the data: a gap or an overlap at byte {row.start}")
            data_len = row.end
        _check_checksum_table(path, version, header, table)
        if size != 8 + n + data_len:
            raise _fail(path, f"the file has {size} bytes; its header accounts for {8 + n + data_len} "
                              f"({'truncated' if size < 8 + n + data_len else 'trailing bytes'}; refused before "
                              "reading its data)")
        return _Frame(str(path), f, version, header, table, data_len)
    except BaseException:
        f.close()
        raise


def _check_checksum_table(path: Any, version: int, header: dict, table: dict[str, _Stored]) -> None:
    """Version 2: the header's copy of the tensor table equals the safetensors one; version 1: a CRC32 for
    exactly the stored tensors."""
    key = "streams" if version >= 2 else "crc32"
    copy = header[key]
    if not isinstance(copy, dict) or set(copy) != set(table):
        raise _fail(path, f"the stored tensors {sorted(table)[:5]} do not match the header's")
    for name, row in table.items():
        c = copy[name]
        if version >= 2:
            if not isinstance(c, dict) or set(c) != {"dtype", "shape", "offsets", "crc32"}:
                raise _fail(path, f"tensor {name!r}: malformed row in the header's copy of the tensor table")
            for fld, theirs, ours in (("dtype", row.dtype, c["dtype"]), ("shape", list(row.shape), c["shape"]),
                                      ("data_offsets", [row.start, row.end], c["offsets"])):
                if theirs != ours or type(ours) is not type(theirs):
                    raise _fail(path, f"tensor {name!r}, field {fld!r}: the safetensors header says {theirs!r}, its "
                                      f"checksummed copy {ours!r} (the file is damaged)")
            c = c["crc32"]
        if type(c) is not int or not 0 <= c < 1 << 32:
            raise _fail(path, f"tensor {name!r}, field 'crc32': {str(c)[:40]} is not a CRC32")


def _crc_of(header: dict, version: int, name: str) -> int:
    return header["streams"][name]["crc32"] if version >= 2 else header["crc32"][name]


def _tensors(path: Any, fr: _Frame, buf: bytearray, names: Any) -> dict[str, Tensor]:
    """The named stored tensors, each checked against its CRC32 (views of ``buf`` where aligned)."""
    out = {}
    view = memoryview(buf)
    for name in names:
        row = fr.table[name]
        if zlib.crc32(view[row.start:row.end]) != _crc_of(fr.header, fr.version, name):
            raise _fail(path, f"tensor {name!r} fails its checksum (the file is damaged)")
        dtype = ST_DTYPES[row.dtype]
        if row.end == row.start:
            out[name] = torch.empty(row.shape, dtype=dtype)
        elif row.start % dtype.itemsize:  # not aligned to its element: a copy
            out[name] = torch.frombuffer(bytearray(view[row.start:row.end]), dtype=dtype).reshape(row.shape)
        else:
            out[name] = torch.frombuffer(buf, dtype=dtype, count=math.prod(row.shape),
                                         offset=row.start).reshape(row.shape)
    return out


def read(path: PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read and check a model file: framing, format name and version, both headers, every checksum.

    Args:
        path: The file.

    Returns:
        ``(header, tensors)``: the decoded header (a dict with a ``tensors`` table) and the stored tensors,
        each matching its checksum. (:func:`load` checks the entries before it reads any data; this reads
        all of it.)

    Raises:
        CorruptFileError: the file is unreadable, not a regular file, truncated, not safetensors, from another
            tool or another version, inconsistent or fails a checksum.
    """
    fr = _frame(path)
    try:
        buf = _read_exactly(fr.file, fr.data_len, path, "data")
    finally:
        fr.file.close()
    return fr.header, _tensors(path, fr, buf, fr.table)


# ----- reading: the entries --------------------------------------------------------------------------
def _plan(path: Any, header: dict, table: dict[str, _sparse.StoredInfo], budget: list[int],
          version: int) -> dict[str, Any]:
    """Each entry checked against the tensor table, its elements charged to ``budget``: a
    :class:`~bayes_sparse.export._sparse.Plan` for a sparse entry, the stored name for a plain one. Every
    stored tensor must be read by exactly one entry."""
    plans: dict[str, Any] = {}
    used: dict[str, str] = {}
    for key, e in header["tensors"].items():
        if not isinstance(e, dict):
            raise _fail(path, f"malformed entry for {key!r}")
        if e.get("kind") == "plain":
            if set(e) - {"kind", "dtype"}:
                raise _fail(path, f"tensor {key!r}, field {sorted(set(e) - {'kind', 'dtype'})[0]!r}: not a field of a "
                                  "plain entry")
            stored = table.get(key)
            if stored is None:
                raise _fail(path, f"tensor {key!r} is missing")
            target = e.get("dtype")
            if "dtype" in e and target != "float32":
                raise _fail(path, f"tensor {key!r}, field 'dtype': unsupported dtype {target!r} for {key!r}")
            if target is not None and stored.dtype not in ("F16", "BF16"):
                raise _fail(path, f"tensor {key!r}, field 'dtype': a plain tensor restored to float32 is stored as F16 "
                                  f"or BF16, not {stored.dtype}")
            numel = math.prod(stored.shape)
            if numel > budget[0]:
                raise _fail(path, f"tensor {key!r} (shape {list(stored.shape)}) takes the file beyond max_numel "
                                  "elements; pass a larger max_numel to load(...) if the model really is that big")
            budget[0] -= numel
            plans[key], names = key, [key]
        elif e.get("kind") == "sparse":
            try:
                plans[key] = _sparse.plan(key, e, table, budget, version)
            except CorruptFileError as err:
                raise _fail(path, str(err)) from err
            names = plans[key].names
        else:
            raise _fail(path, f"unknown entry kind {e.get('kind')!r} for {key!r}")
        for name in names:
            if name in used:
                raise _fail(path, f"the stored tensor {name!r} is read by both {used[name]!r} and {key!r}")
            used[name] = key
    orphans = sorted(set(table) - set(used))
    if orphans:
        raise _fail(path, f"the stored tensor {orphans[0]!r} belongs to no entry (an entry is missing)")
    return plans


def _shape_and_kind(p: Any, table: dict[str, _sparse.StoredInfo], header: dict) -> tuple[tuple[int, ...], Any]:
    if isinstance(p, _sparse.Plan):
        return p.shape, "float"
    dtype = ST_DTYPES[table[p].dtype] if header["tensors"][p].get("dtype") is None else torch.float32
    return table[p].shape, "float" if dtype.is_floating_point else dtype


def _check_tree(path: Any, tree: nn.Module, plans: dict[str, Any], table: dict[str, _sparse.StoredInfo],
                header: dict) -> None:
    """The recorded module tree's state-dict keys, shapes and dtype kinds are exactly the entries'."""
    expected = tree.state_dict()
    for key in sorted(set(expected) | set(plans)):
        if key not in plans:
            raise _fail(path, f"tensor {key!r} of the recorded module tree is missing from the file")
        if key not in expected:
            raise _fail(path, f"tensor {key!r} is not in the recorded module tree")
        shape, kind = _shape_and_kind(plans[key], table, header)
        t = expected[key]
        want = "float" if t.is_floating_point() else t.dtype
        if tuple(t.shape) != shape or want != kind:
            raise _fail(path, f"tensor {key!r}, field 'shape'/'dtype': {list(shape)} {kind} in the file, "
                              f"{list(t.shape)} {want} in the recorded module tree")


def _decode(path: Any, header: dict, plans: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, p in plans.items():
        if isinstance(p, _sparse.Plan):
            try:
                out[key] = _sparse.decode_planned(p, {n: tensors[n] for n in p.names})
            except CorruptFileError as err:
                raise _fail(path, str(err)) from err
        else:
            t = tensors[p]
            out[key] = t.to(torch.float32) if header["tensors"][key].get("dtype") else t.clone()
    return out


def load(path: PathLike, max_numel: int = DEFAULT_MAX_NUMEL,
         build_tree: bool = True) -> tuple[dict[str, Any], dict[str, Tensor], Optional[nn.Module]]:
    """Read a model file: everything checked before its data is read, then decoded one tensor at a time.

    Args:
        path: The file.
        max_numel: Most elements the file may decode to, together, each byte of its JSON headers counting
            as ``HEADER_BYTE_COST`` elements; the module tree (each module costs ``NODE_COST`` elements, plus
            its parameters) is held to the same bound on its own.
        build_tree: Rebuild the recorded module tree (on the meta device) and check the entries against it.

    Returns:
        ``(header, state, tree)``: the decoded header, the state dict, and the rebuilt tree (None when the
        file records none or ``build_tree`` is False).

    Raises:
        CorruptFileError: anything wrong with the file, naming the file and, where there is one, the tensor
            and the field.
    """
    budget = [int(max_numel)]
    fr = _frame(path, budget)
    try:
        infos = {k: r.info for k, r in fr.table.items()}
        plans = _plan(path, fr.header, infos, budget, fr.version)
        tree = None
        if build_tree and fr.header.get("tree") is not None:
            try:
                tree = _tree.build(fr.header["tree"], budget=[int(max_numel)])
            except CorruptFileError as e:
                raise _fail(path, str(e)) from e
            _check_tree(path, tree, plans, infos, fr.header)
        buf = _read_exactly(fr.file, fr.data_len, path, "data")
    finally:
        fr.file.close()
    state = _decode(path, fr.header, plans, _tensors(path, fr, buf, fr.table))
    return fr.header, state, tree


def decode_state(path: PathLike, header: dict[str, Any], tensors: dict[str, Tensor],
                 max_numel: int = DEFAULT_MAX_NUMEL, version: int = VERSION) -> dict[str, Tensor]:
    """The state dict held by a header and its stored tensors (each stream's dtype and shape taken from the
    tensor itself; :func:`load` takes them from the file's checked tensor table).

    Args:
        path: The file, for error messages.
        header: Its decoded header.
        tensors: Its stored tensors.
        max_numel: Most elements the tensors may decode to, together.
        version: The format version the header follows.

    Returns:
        Every entry of the header's tensor table, dense (plain float tensors stored in half precision are
        restored to float32).

    Raises:
        CorruptFileError: a malformed or unknown entry, a missing or unused tensor, or a sparse entry that
            does not decode (see ``_sparse.plan`` and ``_sparse.decode_planned``).
    """
    table = {}
    for k, t in tensors.items():
        try:
            table[k] = _sparse.StoredInfo(st_name(t.dtype), tuple(t.shape))
        except TypeError as e:
            raise _fail(path, f"tensor {k!r}: {e}") from e
    plans = _plan(path, header, table, [int(max_numel)], version)
    return _decode(path, header, plans, tensors)
