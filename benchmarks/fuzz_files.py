"""Fuzz the model-file reader: damaged and crafted files must load exactly or fail cleanly, in bounded time
and memory.

Base files: eight small models saved with ``bs.export.save`` (every index encoding, float16/bfloat16/float32/
float64 and codebook values, raw/zlib/lzma streams, with and without a module tree, empty and all-zero
layers). Each case takes one and applies one mutation, chosen from the case's own seeded generator:

* damage (no checksum fixed): byte flips anywhere, in the safetensors header or in the data; truncation;
  appended bytes; bursts of random bytes; zeroed blocks; a dtype name swapped in place ("F16" -> "I16");
* crafted (every checksum recomputed, CRC32 of each stream and of the package header): one JSON-aware edit
  of one field of either header (numbers, dtypes, shapes, offsets, codec entries, a key dropped, a key
  duplicated, an unknown key added, a value of the wrong type), huge declared sizes, a huge length field;
  deep and wide module trees and hostile module arguments (``device``, huge layers);
* special paths: a FIFO, a symlink to /dev/zero, a directory, a dangling symlink.

The oracle compares what loads with what the undamaged file loads (the saved numbers exactly, for lossless
files): byte for byte, dtype and shape. Some single fields are the file's only statement of what a tensor
is (a sparse weight's ``shape`` and ``dtype``, whether a half-precision plain tensor is restored to float32,
the module tree's arguments); an edit there that stays consistent is another model, not a misread one, so the
oracle then expects the faithful reading of the new declaration (the saved numbers reshaped, zero-extended or
cast) and counts it as ``declared_change``. Everything else must raise ``CorruptFileError`` or load exactly.

Outcomes: ``clean_error``, ``exact_load``, ``declared_change``, ``silent_wrong``, ``hang`` (over
``--timeout`` s), ``memory_blowup`` (``MemoryError``, an allocation failure under ``RLIMIT_AS`` or the
resident set growing more than ``--rss-limit-mib`` during the case) and ``crash`` (any other exception or a
dead worker). Cases run in batches in worker subprocesses, one case at a time with its number announced
first, so a hang or death is attributed to its case and the batch resumes after it in a fresh worker.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/fuzz_files.py --cases 20000 --seed 0 --out benchmarks/results/fuzz_files.json
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import random
import select
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

OUTCOMES = ("clean_error", "exact_load", "declared_change", "silent_wrong", "hang", "memory_blowup", "crash")
FAILURES = ("silent_wrong", "hang", "memory_blowup", "crash")
#: max_numel the cases are loaded with: at most 16 MiB of float32 for any crafted file (the base models
#: need about 30 thousand elements and a handful of modules at 16,384 each).
MAX_NUMEL = 1 << 22


# ----- the base files --------------------------------------------------------------------------------------
def _models() -> dict[str, tuple[Any, dict[str, Any]]]:
    """name -> (model, save kwargs): every encoding the writer has, small enough to load in milliseconds."""
    import torch
    from torch import nn

    torch.manual_seed(0)  # the layers' initialisation
    g = torch.Generator().manual_seed(0)

    def sparsify(model, densities):
        with torch.no_grad():
            for m, d in zip([m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))], densities):
                m.weight.mul_((torch.rand(m.weight.shape, generator=g) < d).to(m.weight.dtype))
        return model.eval()

    def seq(dtype=torch.float32):
        net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                            nn.Linear(36, 24), nn.ReLU(), nn.Linear(24, 10))
        with torch.no_grad():
            net[1].running_mean.uniform_(-1, 1, generator=g)
            net[1].running_var.uniform_(0.5, 2, generator=g)
            net[1].num_batches_tracked.fill_(3)
        return net.to(dtype)

    class Custom(nn.Module):  # no module tree: load_state_dict only
        def __init__(self):
            super().__init__()
            self.far = nn.Linear(257, 256, bias=False)
            self.fc = nn.Linear(20, 30)
            self.register_buffer("steps", torch.tensor([4, 5], dtype=torch.int32))
            with torch.no_grad():
                self.far.weight.zero_()
                self.far.weight[0, 3], self.far.weight[255, 256] = 0.625, -1.75

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Initializing zero-element tensors is a no-op"
        empty = nn.Sequential(nn.Linear(6, 3), nn.Linear(3, 0), nn.Linear(0, 2), nn.Linear(2, 40))
    with torch.no_grad():
        empty[0].weight.zero_()
    return {
        "seq_float32_best": (sparsify(seq(), [0.6, 0.1, 0.4]), {"values": "float32", "effort": "best"}),
        "seq_float16_fast": (sparsify(seq(), [0.5, 0.05, 0.7]), {"values": "float16", "effort": "fast"}),
        "seq_codebook4": (sparsify(seq(), [0.4, 0.08, 0.6]), {"values": 4}),
        "seq_codebook2_sparse": (sparsify(seq(), [0.1, 0.01, 0.05]), {"values": 2, "effort": "fast"}),
        "custom_int32": (sparsify(Custom(), [1.0, 0.3]), {"values": "float32"}),
        "seq_float64": (sparsify(seq(torch.float64), [0.3, 0.2, 0.9]), {"values": "float32"}),
        "seq_bfloat16_values": (sparsify(seq(), [0.7, 0.02, 0.3]), {"values": "bfloat16", "effort": "best"}),
        "seq_empty_layers": (sparsify(empty, [0.0, 0.0, 0.0, 0.2]), {"values": "float32"}),
    }


def make_bases(directory: Path) -> dict[str, Path]:
    """Write the base files; check that the lossless ones load to the saved numbers, bit for bit."""
    import bayes_sparse as bs

    paths = {}
    for name, (model, kwargs) in _models().items():
        path = directory / f"{name}.safetensors"
        bs.export.save(model, path, **kwargs)
        paths[name] = path
        if kwargs["values"] == "float32":
            back = bs.export.load_state_dict(path)
            saved = model.state_dict()
            assert sorted(back) == sorted(saved), name
            for k, v in saved.items():  # bit for bit, but for the sign of zeros (zeros load as +0.0)
                v = v.detach()
                assert _same_bits(back[k], v.masked_fill(v == 0, 0) if v.is_floating_point() else v), (name, k)
    return paths


def _same_bits(a: Any, b: Any) -> bool:
    import torch

    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


# ----- file surgery ----------------------------------------------------------------------------------------
@dataclass
class Parts:
    """A model file taken apart: the safetensors JSON header, the package header decoded, the data."""

    st: dict
    inner: Optional[dict]
    data: bytes


def parse(raw: bytes) -> Parts:
    n = int.from_bytes(raw[:8], "little")
    st = json.loads(raw[8:8 + n])
    inner = json.loads(zlib.decompress(base64.b64decode(st["__metadata__"]["header"])))
    return Parts(st, inner, raw[8 + n:])


class RawJSON(str):
    """JSON text that :func:`dumps` writes as it is (a tree too deep for ``json.dumps``)."""


def dumps(obj: Any, dup: Optional[tuple] = None, path: tuple = ()) -> str:
    """JSON text; ``dup = (path, key, value, first)`` writes ``key`` a second time in the object at ``path``."""
    if isinstance(obj, RawJSON):
        return str(obj)
    if isinstance(obj, dict):
        items = [json.dumps(k) + ":" + dumps(v, dup, path + (k,)) for k, v in obj.items()]
        if dup is not None and dup[0] == path:
            extra = json.dumps(dup[1]) + ":" + dumps(dup[2])
            items = [extra, *items] if dup[3] else [*items, extra]
        return "{" + ",".join(items) + "}"
    if isinstance(obj, list):
        return "[" + ",".join(dumps(v, dup, path + (i,)) for i, v in enumerate(obj)) + "]"
    return json.dumps(obj)


def assemble(p: Parts, recompute: bool = True, dup: Optional[tuple] = None, dup_in: str = "") -> bytes:
    """A file from its parts; with ``recompute`` every checksum is made to match (a crafted file): each
    stream's CRC32 over the bytes the safetensors table points at, then the package header's CRC32."""
    st = p.st
    if p.inner is not None:
        inner = p.inner
        if recompute:
            table = inner.get("streams") if isinstance(inner, dict) else None
            for name, row in st.items():
                if name == "__metadata__" or not isinstance(table, dict) or not isinstance(table.get(name), dict):
                    continue
                try:
                    a, b = row["data_offsets"]
                    if 0 <= a <= b <= len(p.data):
                        table[name]["crc32"] = zlib.crc32(p.data[a:b])
                except (TypeError, ValueError, KeyError):
                    pass
        text = base64.b64encode(zlib.compress(dumps(inner, dup if dup_in == "inner" else None).encode(), 6)).decode()
        if isinstance(st.get("__metadata__"), dict):
            st["__metadata__"]["header"] = text
            if recompute:
                st["__metadata__"]["header_crc32"] = str(zlib.crc32(text.encode()))
    head = dumps(st, dup if dup_in == "st" else None).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + p.data


def _nodes(obj: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    out = [(path, obj)]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _nodes(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _nodes(v, path + (i,))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def _set(obj: Any, path: tuple, value: Any) -> None:
    _get(obj, path[:-1])[path[-1]] = value


def _delete(obj: Any, path: tuple) -> None:
    parent = _get(obj, path[:-1])
    del parent[path[-1]]


# ----- mutations -------------------------------------------------------------------------------------------
_ST_DTYPES = ["BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "F16", "BF16", "F32", "F64", "F8_E4M3", "C64"]
_WORDS = ["float32", "float16", "bfloat16", "float64", "int8", "codebook", "bitmask", "int32", "relative", "zlib",
          "lzma", "sparse", "plain", "uint8", "Linear", "ReLU", "Sequential", "Conv2d", "cpu", "meta", "__class__", "",
          "F32", "I16", "1", "2", "bayes_sparse"]


def _int_edits(rng: random.Random, v: int) -> Any:
    return rng.choice([v + 1, v - 1, 0, -1, 1, v * 2, v // 2, v + 8, v - 8, 1 << 31, 1 << 40, 1 << 63, 10 ** 30,
                       rng.randrange(-5, 300), str(v), float(v) + 0.5, None, True, [v]])


def _list_edits(rng: random.Random, v: list) -> Any:
    ints = [x for x in v if type(x) is int]
    choices = [v[::-1], v[:-1], v + [1], [1] + v, v + v, [], [1 << 20, 1 << 20], [-1] + v[1:], "abc", {}, None]
    if len(ints) == len(v) and v:
        i = rng.randrange(len(v))
        choices += [v[:i] + [v[i] + 1] + v[i + 1:], v[:i] + [max(v[i] - 1, 0)] + v[i + 1:],
                    v[:i] + [v[i] * 2] + v[i + 1:]]
        if v[i] % 2 == 0 and v[i]:
            choices.append(v[:i] + [v[i] // 2, 2] + v[i + 1:])  # [N] -> [N/2, 2]
        if len(v) >= 2:
            if i + 1 < len(v):  # two dimensions merged
                choices.append(v[:i] + [v[i] * v[i + 1]] + v[i + 2:])
            j = rng.randrange(len(v))
            w = list(v)
            w[i], w[j] = w[j], w[i]
            choices.append(w)
    return rng.choice(choices)


def _edit_value(rng: random.Random, v: Any) -> Any:
    if isinstance(v, bool):
        return rng.choice([not v, 0, 1, None, "true"])
    if isinstance(v, int):
        return _int_edits(rng, v)
    if isinstance(v, float):
        return rng.choice([v * 2, -v, 0.0, 1e308, 1, None, str(v)])
    if isinstance(v, str):
        if v in _ST_DTYPES:
            return rng.choice([d for d in _ST_DTYPES if d != v])
        if v.isdigit():
            return rng.choice([str(int(v) + 1), str(int(v) ^ 1), "", v + "0", int(v)])
        return rng.choice([w for w in _WORDS if w != v] + [v.upper(), v + "x", v[:-1], 7, None])
    if isinstance(v, list):
        return _list_edits(rng, v)
    if isinstance(v, dict):
        return rng.choice([[], None, 0, "x", {}])
    return rng.choice([{}, 0, [], "x"])


@dataclass
class Case:
    """One mutated file and how its load is judged."""

    kind: str  # mutation name
    data: Optional[bytes]  # None: a special path
    special: str = ""  # "fifo", "zero", "dir", "dangling", "null"
    declared: dict[str, Callable[[Any], Any]] = field(default_factory=dict)  # key -> faithful transform of ref
    tree_edit: bool = False  # the module tree was edited: the state must still be the saved one
    detail: str = ""
    dropped: tuple = ()  # keys removed with all their streams: a consistent file of a model without them


def _declared_transforms(key: Any, before: Any, after: Any) -> dict[str, Any]:
    """The faithful reading of an edit that changed only a field that is the file's only statement of a
    tensor's shape or dtype, or of whether a half-precision plain tensor is restored to float32."""
    import math

    import torch

    if not isinstance(before, dict) or not isinstance(after, dict):
        return {}
    missing = object()
    diff = {k for k in {*before, *after} if before.get(k, missing) != after.get(k, missing)}
    new = after.get("shape")
    if before.get("kind") == "sparse" and diff == {"shape"} and isinstance(new, list) and all(
            type(s) is int and s >= 0 for s in new) and math.prod(new) < MAX_NUMEL:
        n = math.prod(new)

        def reshape(t: Any) -> Any:
            flat = t.reshape(-1)
            if n >= flat.numel():
                flat = torch.cat([flat, torch.zeros(n - flat.numel(), dtype=flat.dtype)])
            return flat[:n].reshape(new)
        return {key: reshape}
    dtype = getattr(torch, after["dtype"], None) if isinstance(after.get("dtype"), str) else None
    if before.get("kind") == "sparse" and diff == {"dtype"} and isinstance(dtype, torch.dtype):
        return {key: lambda t: t.to(dtype)}
    if before.get("kind") == "plain" and diff == {"dtype"} and "dtype" not in after:
        return {key: "as stored"}
    return {}


def _crafted_field(rng: random.Random, parts: Parts) -> Case:
    """One field of one header changed, dropped, duplicated or added; every checksum recomputed."""
    where = rng.choice(["inner"] * 3 + ["st"] * 2)
    root = parts.inner if where == "inner" else parts.st
    nodes = [(p, v) for p, v in _nodes(root) if p and p != ("__metadata__", "header") and p[-1] != "crc32"
             and p != ("__metadata__", "header_crc32")]
    path, value = rng.choice(nodes)
    op = rng.choices(["edit", "drop", "dup", "add"], [6, 1, 1, 1])[0]
    dup = None
    tree_edit = where == "inner" and path[0] == "tree"
    entry_key = path[1] if where == "inner" and path[0] == "tensors" and len(path) >= 3 else None
    before = json.loads(json.dumps(parts.inner["tensors"][entry_key])) if entry_key is not None else None
    if op == "edit":
        new = _edit_value(rng, value)
        _set(root, path, new)
        detail = f"{where}{list(path)} = {str(new)[:40]}"
    elif op == "drop" and not isinstance(path[-1], int):
        _delete(root, path)
        detail = f"{where}{list(path)} dropped"
    elif op == "dup" and isinstance(_get(root, path[:-1]), dict):
        dup = (path[:-1], path[-1], rng.choice([{}, value, _edit_value(rng, value), None]), rng.random() < 0.5)
        detail = f"{where}{list(path)} duplicated with {str(dup[2])[:30]}"
    else:
        container = value if isinstance(value, dict) else _get(root, path[:-1])
        if isinstance(container, dict):
            container[rng.choice(["device", "extra", "crc", "version", "kind", "a::index"])] = rng.choice(
                ["cpu", 1, {}, [1, 2], None])
            detail = f"{where}{list(path)} extra key"
        else:
            container.append(rng.choice([1, "x", {}, None]))
            detail = f"{where}{list(path)} extra element"
    declared = {}
    if entry_key is not None and dup is None:
        declared = _declared_transforms(entry_key, before, parts.inner["tensors"].get(entry_key))
    return Case("crafted_field", assemble(parts, True, dup, where), declared=declared, tree_edit=tree_edit,
                detail=detail)


def _huge(rng: random.Random, parts: Parts, raw: bytes) -> Case:
    """Huge declared sizes, crafted (checksums recomputed)."""
    inner = parts.inner
    sparse = [k for k, e in inner["tensors"].items() if e.get("kind") == "sparse"]
    choice = rng.randrange(8)
    if choice == 0:  # the length field
        n = rng.choice([1 << 63, (1 << 64) - 1, len(raw), len(raw) - 8, 1 << 31])
        return Case("huge_length_field", n.to_bytes(8, "little") + raw[8:], detail=str(n))
    if choice == 1 and sparse:
        k = rng.choice(sparse)
        inner["tensors"][k]["shape"] = rng.choice([[1 << 20, 1 << 20], [1 << 31], [65536, 65536], [10 ** 12],
                                                   [4096, 4096]])
        return Case("huge_shape", assemble(parts), detail=k)
    if choice == 2 and sparse:
        k = rng.choice(sparse)
        fld = rng.choice(["entries", "nnz"])
        inner["tensors"][k][fld] = rng.choice([1 << 40, 1 << 31, 1 << 62, 10 ** 20])
        return Case("huge_count", assemble(parts), detail=f"{k} {fld}")
    if choice == 3 and sparse:
        k = rng.choice(sparse)
        e = inner["tensors"][k]
        e.setdefault("codecs", {})["index"] = {"codec": rng.choice(["zlib", "lzma"]), "raw_bytes": 1 << 40,
                                               "dtype": "uint8"}
        return Case("huge_raw_bytes", assemble(parts), detail=k)
    if choice == 4:  # a stored tensor declared huge, in both tables (its offsets too)
        names = [k for k in parts.st if k != "__metadata__"]
        k = rng.choice(names)
        parts.st[k]["shape"] = [1 << 28]
        parts.st[k]["data_offsets"] = [0, (1 << 28) * 4]
        parts.st[k]["dtype"] = "F32"
        if "streams" in inner:
            inner["streams"][k].update(dtype="F32", shape=[1 << 28], offsets=[0, (1 << 28) * 4])
        return Case("huge_stored_tensor", assemble(parts), detail=k)
    if choice == 5:  # a relative index of 16 bits declaring all of a large weight, the stream compressed
        if not sparse:
            return _huge(rng, parts, raw)
        k = rng.choice(sparse)
        e = inner["tensors"][k]
        n = rng.choice([1 << 21, 1 << 27, 1 << 30])
        e.update(shape=[n], index="relative", index_bits=16, nnz=n, entries=n)
        e.pop("value_bits", None)
        e["values"] = "float32"
        comp = zlib.compress(b"\0" * min(2 * n, 1 << 22), 9)
        e["codecs"] = {"index": {"codec": "zlib", "raw_bytes": 2 * n, "dtype": "uint8"},
                       "values": {"codec": "zlib", "raw_bytes": 4 * n, "dtype": "float32"}}
        parts = _restream(parts, {f"{k}::index": comp, f"{k}::values": comp})
        return Case("huge_relative16", assemble(parts), detail=k)
    if choice == 6:  # a bitmask of a large weight, all ones, compressed
        if not sparse:
            return _huge(rng, parts, raw)
        k = rng.choice(sparse)
        e = inner["tensors"][k]
        n = rng.choice([1 << 22, 1 << 28])
        e.update(shape=[n], index="bitmask", index_bits=1, nnz=n, values="float32")
        e.pop("entries", None)
        e.pop("value_bits", None)
        comp = zlib.compress(b"\xff" * (n // 8), 9)
        vals = zlib.compress(b"\0\0\x80\x3f" * min(n, 1 << 20), 9)
        e["codecs"] = {"index": {"codec": "zlib", "raw_bytes": n // 8, "dtype": "uint8"},
                       "values": {"codec": "zlib", "raw_bytes": 4 * n, "dtype": "float32"}}
        return Case("huge_bitmask", assemble(_restream(parts, {f"{k}::index": comp, f"{k}::values": vals})), detail=k)
    trees = [
        {"type": "Linear", "kwargs": {"in_features": 24000, "out_features": 24000, "bias": True, "device": "cpu"}},
        {"type": "Linear", "kwargs": {"in_features": 1 << 40, "out_features": 1 << 40}},
        {"type": "Sequential",
         "children": [{"type": "ReLU", "kwargs": {"inplace": False}}] * rng.choice([300, 20000, 200000])},
        {"type": "Unflatten", "kwargs": {"dim": 1, "unflattened_size": [2] * 100000}},
        {"type": "Conv2d", "kwargs": {"in_channels": 1 << 16, "out_channels": 1 << 16, "kernel_size": [64, 64]}},
        _deep(rng.choice([65, 500, 5000])),
    ]
    inner["tree"] = rng.choice(trees)
    return Case("hostile_tree", assemble(parts), tree_edit=True)


def _targeted(rng: random.Random, parts: Parts) -> Case:
    """The crafted files of the issue, checksums recomputed: a count or a bit width one off, a codebook's
    code stream redeclared as numbers (in both tables, its length adjusted), an entry dropped (with or
    without its streams), the ``tensors`` key duplicated with ``{}`` last."""
    inner = parts.inner
    sparse = [k for k, e in inner["tensors"].items() if e.get("kind") == "sparse"]
    k = rng.choice(sparse)
    e = inner["tensors"][k]
    what = rng.choice(["count", "bits", "redeclare", "drop", "dup_tensors"])
    if what == "count":
        fld = rng.choice([f for f in ("nnz", "entries") if f in e])
        e[fld] += rng.choice([-1, 1, -2])
        return Case("targeted_count", assemble(parts), detail=f"{k} {fld}={e[fld]}")
    if what == "bits":
        fld = rng.choice([f for f in ("index_bits", "value_bits") if f in e])
        e[fld] += rng.choice([-1, 1])
        return Case("targeted_bits", assemble(parts), detail=f"{k} {fld}={e[fld]}")
    if what == "redeclare":
        name = f"{k}::{rng.choice(['values', 'index', 'codebook'])}"
        if name not in parts.st:
            name = f"{k}::values"
        row = parts.st[name]
        nbytes = row["data_offsets"][1] - row["data_offsets"][0]
        choices = [(d, s) for d, s in (("I32", 4), ("F16", 2), ("U8", 1), ("F32", 4), ("BF16", 2), ("I8", 1))
                   if d != row["dtype"] and nbytes % s == 0]
        dtype, size = rng.choice(choices)
        row.update(dtype=dtype, shape=[nbytes // size])
        inner["streams"][name].update(dtype=dtype, shape=[nbytes // size])
        return Case("targeted_redeclare", assemble(parts), detail=f"{name} as {dtype}")
    if what == "drop":
        del inner["tensors"][k]
        if rng.random() < 0.5:  # its streams too: a consistent file of a model without that tensor
            for name in [n for n in list(parts.st) if n.startswith(f"{k}::")]:
                parts = _restream(parts, {name: b""})
                del parts.st[name]
                del parts.inner["streams"][name]
            return Case("targeted_drop_entry_and_streams", assemble(parts), detail=k, dropped=(k,))
        return Case("targeted_drop_entry", assemble(parts), detail=k)
    return Case("targeted_dup_tensors", assemble(parts, True, ((), "tensors", {}, False), "inner"), detail="{}")


def _deep(depth: int) -> RawJSON:
    return RawJSON('{"type":"Sequential","children":[' * depth + '{"type":"ReLU","kwargs":{}}' + "]}" * depth)


def _restream(parts: Parts, replace: dict[str, bytes]) -> Parts:
    """The data section rebuilt with some streams' bytes replaced (stored as U8), both tables updated."""
    rows = sorted(((k, v) for k, v in parts.st.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
    data, offset = b"", 0
    for k, row in rows:
        a, b = row["data_offsets"]
        blob = replace.get(k, parts.data[a:b])
        if k in replace:
            row.update(dtype="U8", shape=[len(blob)])
        row["data_offsets"] = [offset, offset + len(blob)]
        if "streams" in parts.inner:
            parts.inner["streams"][k].update(dtype=row["dtype"], shape=row["shape"], offsets=row["data_offsets"])
        data += blob
        offset += len(blob)
    parts.data = data
    return parts


def _damage(rng: random.Random, raw: bytes) -> Case:
    b = bytearray(raw)
    n = int.from_bytes(raw[:8], "little")
    kind = rng.choice(["flip", "flip", "flip_header", "flip_header", "flip_data", "truncate", "extend", "burst",
                       "zero_block", "dtype_swap"])
    if kind == "flip":
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            b[rng.randrange(len(b))] ^= rng.randrange(1, 256)
    elif kind == "flip_header":
        b[rng.randrange(8, 8 + n)] ^= rng.randrange(1, 256)
    elif kind == "flip_data" and len(b) > 8 + n:
        b[rng.randrange(8 + n, len(b))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        b = b[:rng.randrange(len(b))]
    elif kind == "extend":
        b += bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 8, 100])))
    elif kind == "burst":
        j = rng.randrange(len(b))
        b[j:j + 16] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 17)))
    elif kind == "zero_block":
        j, k = rng.randrange(len(b)), rng.randrange(1, 64)
        b[j:j + k] = bytes(len(b[j:j + k]))
    else:
        swaps = [(b'"F16"', b'"I16"'), (b'"F32"', b'"I32"'), (b'"F32"', b'"U32"'), (b'"BF16"', b'"F16"'),
                 (b'"U8"', b'"I8"'), (b'"F64"', b'"I64"'), (b'"I64"', b'"F64"'), (b'"I32"', b'"F32"'),
                 (b'"F16"', b'"BF16"')]
        swaps = [(o, w) for o, w in swaps if o in raw[8:8 + n]] or swaps  # only names the file has
        old, new = rng.choice(swaps)
        at = [i for i in range(8, 8 + n) if raw.startswith(old, i)]
        if at:
            i = rng.choice(at)
            b[i:i + len(old)] = new
            if len(new) != len(old):  # keep the length field right
                b[:8] = (n + len(new) - len(old)).to_bytes(8, "little")
    return Case("damage_" + kind, bytes(b))


def make_case(seed: int, i: int, bases: dict[str, bytes]) -> tuple[str, Case]:
    """Case ``i`` of a run: its base file's name and the mutation, from the case's own generator."""
    rng = random.Random(f"{seed}:{i}")
    name = rng.choice(sorted(bases))
    raw = bases[name]
    r = rng.random()
    if r < 0.004:
        return name, Case("special_path", None, special=rng.choice(["fifo", "zero", "dir", "dangling", "null"]))
    if r < 0.45:
        return name, _damage(rng, raw)
    parts = parse(raw)
    if r < 0.55:
        return name, _huge(rng, parts, raw)
    if r < 0.65:
        return name, _targeted(rng, parts)
    return name, _crafted_field(rng, parts)


# ----- judging one case ------------------------------------------------------------------------------------
def _is_memory(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, MemoryError) or "alloc" in str(e).lower() and isinstance(e, RuntimeError):
            return True
        e = e.__cause__ or e.__context__
    return False


def judge(case: Case, path: Path, ref: dict, use_tree: bool, chunk: int = 0) -> tuple[str, str]:
    """Load the case's file and classify the outcome (see the module docstring); ``chunk``: decode that
    many entries at a time instead of the reader's default (the base models are smaller than one default
    chunk: a small one exercises the boundaries between chunks)."""
    from bayes_sparse.export import _sparse

    default = _sparse.CHUNK
    _sparse.CHUNK = chunk or default
    try:
        return _judge(case, path, ref, use_tree)
    finally:
        _sparse.CHUNK = default


def _judge(case: Case, path: Path, ref: dict, use_tree: bool) -> tuple[str, str]:
    import torch

    import bayes_sparse as bs

    rebuilt = None
    try:
        if use_tree:
            model = bs.export.load(path, max_numel=MAX_NUMEL)
            loaded, rebuilt = model.state_dict(), repr(model)
        else:
            loaded = bs.export.load_state_dict(path, max_numel=MAX_NUMEL)
    except bs.export.CorruptFileError as e:
        if _is_memory(e):
            return "memory_blowup", str(e)[:200]
        return "clean_error", str(e)[-160:]
    except ValueError as e:
        if "does not record its module tree" in str(e):
            return "clean_error", str(e)[-160:]
        return "crash", f"{type(e).__name__}: {e}"[:300]
    except MemoryError as e:
        return "memory_blowup", repr(e)[:200]
    except Exception as e:  # noqa: BLE001  (every other exception is a finding)
        if _is_memory(e):
            return "memory_blowup", repr(e)[:200]
        return "crash", f"{type(e).__name__}: {e} @ {traceback.format_exc().splitlines()[-3].strip()}"[:400]
    loaded = {k: v.detach() for k, v in loaded.items()}
    expected_repr = ref.get(_REPR)
    ref = {k: v for k, v in ref.items() if k != _REPR}
    if sorted(loaded) == sorted(ref) and all(_same_bits(loaded[k], ref[k]) for k in ref):
        if rebuilt is not None and rebuilt != expected_repr:  # a module's arguments changed: the tree declares them
            return "declared_change", "module tree"
        return "exact_load", ""
    kept = sorted(set(ref) - set(case.dropped))
    if case.dropped and sorted(loaded) == kept and all(_same_bits(loaded[k], ref[k]) for k in kept):
        return "declared_change", ""
    if case.declared and sorted(loaded) == sorted(ref):
        ok = True
        for k in ref:
            t = case.declared.get(k)
            if t == "as stored":
                ok = ok and loaded[k].dtype in (torch.float16, torch.bfloat16) and _same_bits(
                    loaded[k].to(torch.float32), ref[k])
            elif t is not None:
                try:
                    ok = ok and _same_bits(loaded[k], t(ref[k]))
                except Exception:  # noqa: BLE001
                    ok = False
            else:
                ok = ok and _same_bits(loaded[k], ref[k])
        if ok:
            return "declared_change", ""
    diff = [k for k in sorted(set(ref) | set(loaded))
            if k not in ref or k not in loaded or not _same_bits(loaded[k], ref[k])]
    return "silent_wrong", f"{case.kind} {case.detail}: differs in {diff[:4]}"


def materialize(case: Case, directory: Path) -> Path:
    """The case's file (or special path) in ``directory``."""
    path = directory / "case.safetensors"
    if path.is_symlink() or path.exists():
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
    if case.data is not None:
        path.write_bytes(case.data)
    elif case.special == "fifo":
        os.mkfifo(path)
    elif case.special == "zero":
        path.symlink_to("/dev/zero")
    elif case.special == "null":
        path.symlink_to("/dev/null")
    elif case.special == "dir":
        path.mkdir()
    else:
        path.symlink_to(directory / "nowhere")
    return path


_REPR = "__repr__"


def references(bases: dict[str, Path]) -> dict[str, dict]:
    """What each undamaged base file loads to (and, under ``_REPR``, the rebuilt model's repr)."""
    import bayes_sparse as bs

    refs = {}
    for name, p in bases.items():
        refs[name] = {k: v.detach() for k, v in bs.export.load_state_dict(p, max_numel=MAX_NUMEL).items()}
        if has_tree(p.read_bytes()):
            refs[name][_REPR] = repr(bs.export.load(p, max_numel=MAX_NUMEL))
    return refs


def has_tree(raw: bytes) -> bool:
    return parse(raw).inner.get("tree") is not None


def run_cases(seed: int, cases: range, base_paths: dict[str, Path], directory: Path,
              report: Optional[Callable[[int, str, str, float], None]] = None) -> dict[str, int]:
    """Run cases in this process (the test slice); returns the count of each outcome."""
    bases = {n: p.read_bytes() for n, p in base_paths.items()}
    refs = references(base_paths)
    counts = dict.fromkeys(OUTCOMES, 0)
    for i in cases:
        name, case = make_case(seed, i, bases)
        path = materialize(case, directory)
        t0 = time.perf_counter()
        outcome, detail = judge(case, path, refs[name], use_tree=has_tree(bases[name]) and i % 2 == 0,
                                     chunk=64 if i % 4 == 1 else 0)
        counts[outcome] += 1
        if report is not None:
            report(i, outcome, f"{name} {case.kind} {case.detail} {detail}", time.perf_counter() - t0)
    return counts


# ----- the worker and the driver ---------------------------------------------------------------------------
def _rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(args: argparse.Namespace) -> int:
    """Run cases ``[start, stop)`` printing ``S i`` before and a JSON result after each one."""
    import resource

    import torch

    torch.set_num_threads(1)
    base_paths = {p.name[:-len(".safetensors")]: p for p in Path(args.bases).glob("*.safetensors")}
    bases = {n: p.read_bytes() for n, p in base_paths.items()}
    refs = references(base_paths)
    tmp = Path(tempfile.mkdtemp(prefix="fuzzw"))
    name0 = sorted(bases)[0]
    judge(Case("warmup", bases[name0]), materialize(Case("warmup", bases[name0]), tmp), refs[name0], True)
    limit = _vm_bytes() + (args.as_limit_mib << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    rss0 = _rss_mib()
    for i in range(args.start, args.stop):
        print(f"S {i}", flush=True)
        name, case = make_case(args.seed, i, bases)
        path = materialize(case, tmp)
        t0 = time.perf_counter()
        try:
            _selftest(i)
            outcome, detail = judge(case, path, refs[name], use_tree=has_tree(bases[name]) and i % 2 == 0,
                                     chunk=64 if i % 4 == 1 else 0)
        except MemoryError as e:
            outcome, detail = "memory_blowup", repr(e)
        dt = time.perf_counter() - t0
        grown = _rss_mib() - rss0
        if grown > args.rss_limit_mib and outcome != "memory_blowup":
            outcome, detail = "memory_blowup", f"resident set grew {grown:.0f} MiB ({outcome}: {detail})"
        print("R " + json.dumps({"i": i, "outcome": outcome, "base": name, "kind": case.kind,
                                 "detail": f"{case.detail} | {detail}"[:500], "seconds": dt, "rss_growth_mib": grown}),
              flush=True)
        if outcome == "memory_blowup":
            return 0  # a fresh worker for the next case (the resident-set high-water mark cannot go down)
    return 0


def _selftest(i: int) -> None:
    """``FUZZ_FILES_SELFTEST="hang:3,crash:5,oom:7,kill:9"``: make those cases misbehave, to check that the
    driver attributes each failure to its case and carries on after it."""
    import signal

    for item in filter(None, os.environ.get("FUZZ_FILES_SELFTEST", "").split(",")):
        what, at = item.split(":")
        if int(at) == i:
            if what == "hang":
                time.sleep(10 ** 6)
            elif what == "crash":
                os.kill(os.getpid(), signal.SIGSEGV)
            elif what == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif what == "oom":
                raise MemoryError("self-test")


def drive(args: argparse.Namespace) -> int:
    """Run ``args.cases`` cases in batches of worker subprocesses and write the counts."""
    import bayes_sparse as bs  # noqa: F401  (fail early if the package is not importable)

    t_start = time.time()
    out_dir = Path(tempfile.mkdtemp(prefix="fuzz_files"))
    bases = make_bases(out_dir)
    raw = {n: p.read_bytes() for n, p in bases.items()}
    counts = dict.fromkeys(OUTCOMES, 0)
    by_kind: dict[str, dict[str, int]] = {}
    findings: list[dict] = []
    slowest: list[tuple[float, int, str]] = []
    max_rss = (0.0, -1, "")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = 0

    def record(r: dict) -> None:
        counts[r["outcome"]] += 1
        by_kind.setdefault(r["kind"], dict.fromkeys(OUTCOMES, 0))[r["outcome"]] += 1
        if r["outcome"] in FAILURES:
            findings.append(r)

    i = 0
    while i < args.cases:
        stop = min(args.cases, i + args.batch)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--seed", str(args.seed), "--bases", str(out_dir),
               "--start", str(i), "--stop", str(stop), "--as-limit-mib", str(args.as_limit_mib),
               "--rss-limit-mib", str(args.rss_limit_mib)]
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, text=True, bufsize=1)
            workers += 1
            current, started, done_upto, hung = None, time.time(), i, False
            while True:
                ready, _, _ = select.select([proc.stdout], [], [], 0.5)
                if ready:
                    line = proc.stdout.readline()
                    if not line:
                        break
                    if line.startswith("S "):
                        current, started = int(line.split()[1]), time.time()
                    elif line.startswith("R "):
                        r = json.loads(line[2:])
                        record(r)
                        if r["rss_growth_mib"] > max_rss[0]:
                            max_rss = (r["rss_growth_mib"], r["i"], r["kind"])
                        slowest = sorted([*slowest, (r["seconds"], r["i"], r["kind"])], reverse=True)[:5]
                        current, done_upto = None, r["i"] + 1
                elif current is not None and time.time() - started > args.timeout:
                    hung = True
                    proc.kill()
                    break
            proc.wait()
            err.seek(0)
            stderr = err.read()[-400:]
        if current is not None:  # the worker died (or was killed) inside this case
            name, case = make_case(args.seed, current, raw)
            outcome = "hang" if hung else "memory_blowup" if proc.returncode == -9 else "crash"
            record({"i": current, "outcome": outcome, "base": name, "kind": case.kind,
                    "detail": f"{case.detail} | worker exit {proc.returncode}: {stderr}"[:500]})
            done_upto = current + 1
        elif done_upto == i:
            raise RuntimeError(f"a worker ran no case (exit {proc.returncode}): {stderr}")
        i = done_upto
        sys.stderr.write(f"{i}/{args.cases} {json.dumps(counts)}\n")
    wall = time.time() - t_start
    result = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/fuzz_files.py " + " ".join(sys.argv[1:]),
        "seed": args.seed, "cases": args.cases, "wall_s": round(wall, 1), "worker_processes": workers,
        "counts": counts, "failures": sum(counts[k] for k in FAILURES),
        "by_mutation": dict(sorted(by_kind.items())),
        "findings": findings[:50],
        "slowest_cases_s": [{"seconds": round(t, 3), "i": j, "kind": k} for t, j, k in slowest],
        "max_rss_growth_mib": {"mib": round(max_rss[0], 1), "i": max_rss[1], "kind": max_rss[2]},
        "limits": {"timeout_s": args.timeout, "address_space_mib_over_start": args.as_limit_mib,
                   "rss_growth_limit_mib": args.rss_limit_mib, "max_numel": MAX_NUMEL, "batch": args.batch},
        "bases": sorted(bases),
        "oracle": "byte-for-byte equal to what the undamaged file loads (the saved numbers for lossless files); "
                  "a consistent edit of a field that alone declares a tensor's shape/dtype (or a plain tensor's "
                  "restore to float32, or the module tree's arguments), or the removal of an entry with all its "
                  "streams from a file without a module tree, must load the faithful reading of the new "
                  "declaration (declared_change); everything else must raise CorruptFileError",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "load_average": list(os.getloadavg())},
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("cases", "wall_s", "counts", "failures")}))
    return 1 if result["failures"] else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=1000, help="cases per worker subprocess")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per case before it counts as a hang")
    parser.add_argument("--as-limit-mib", type=int, default=1536,
                        help="RLIMIT_AS of a worker: its address space after start-up plus this")
    parser.add_argument("--rss-limit-mib", type=int, default=512,
                        help="resident-set growth during a case that counts as a memory blow-up")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bases", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stop", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    return worker(args) if args.worker else drive(args)


if __name__ == "__main__":
    sys.exit(main())
