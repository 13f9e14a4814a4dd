"""One sparse weight's entry and streams: every index and value encoding decodes to exactly the weight it
was written from, and malformed entries or streams are refused with CorruptFileError."""

import json

import numpy as np
import pytest
import torch

from bayes_sparse.export import CorruptFileError, _sparse

BIG = 10 ** 9
INDEX = [("bitmask", 1), ("int32", 32), ("relative", 1), ("relative", 3), ("relative", 8), ("relative", 16)]


def _weight(seed=0, shape=(7, 30), density=0.2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < density)
    w.view(-1)[0], w.view(-1)[-1] = 0.5, -0.75  # both ends
    w.view(-1)[100:140] = 0  # one gap longer than 2**bits for small bits: fillers
    return w.to(dtype)


def _encode(t, values="float32", book=None, codes=None, kind="bitmask", bits=1, container_bits=0, key="w"):
    flat = t.reshape(-1)
    positions = torch.nonzero(flat).reshape(-1).numpy()
    nz = flat[positions].float().numpy() if positions.size else np.zeros(0, np.float32)  # as the policy does
    entry, streams = _sparse.encode(t, positions, nz, values, book, codes, kind, bits, container_bits)
    entry = json.loads(json.dumps(entry))  # as it comes back from a header
    return entry, {f"{key}::{s}": v for s, v in streams.items()}


@pytest.mark.parametrize("kind,bits", INDEX, ids=[f"{k}{b}" for k, b in INDEX])
@pytest.mark.parametrize("values", ["float32", "float16", "bfloat16"])
def test_float_values_round_trip(kind, bits, values):
    t = _weight()
    entry, tensors = _encode(t, values, kind=kind, bits=bits)
    assert entry["index"] == kind and entry["index_bits"] == bits and entry["nnz"] == int((t != 0).sum())
    budget = [BIG]
    out = _sparse.decode("w", entry, tensors, budget)
    reference = t.to(getattr(torch, values)).float()  # each kept value rounded through the stored dtype
    assert out.dtype == t.dtype and torch.equal(out, reference)
    assert budget == [BIG - t.numel()]


@pytest.mark.parametrize("kind,bits", INDEX, ids=[f"{k}{b}" for k, b in INDEX])
@pytest.mark.parametrize("container_bits", [2, 3, 8])
def test_codebook_values_round_trip(kind, bits, container_bits):
    book = np.array([-1.5, 0.25, 2.0], np.float32)
    mask = _weight(seed=1) != 0
    codes = np.random.default_rng(0).integers(0, 3, int(mask.sum()))
    t = torch.zeros(mask.shape)
    t[mask] = torch.from_numpy(book[codes])  # row-major, as the flat positions
    entry, tensors = _encode(t, book=book, codes=codes, kind=kind, bits=bits, container_bits=container_bits)
    assert entry["values"] == "codebook" and entry["value_bits"] == container_bits
    assert tensors["w::codebook"].tolist() == [0.0, -1.5, 0.25, 2.0]  # code 0: the exact zero of fillers
    assert torch.equal(_sparse.decode("w", entry, tensors, [BIG]), t)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_the_weight_dtype_is_restored(dtype):
    t = _weight(dtype=dtype)
    out = _sparse.decode("w", *_encode(t, "float32", kind="relative", bits=4), [BIG])
    assert out.dtype == dtype and torch.equal(out, t)


@pytest.mark.parametrize("kind,bits", INDEX, ids=[f"{k}{b}" for k, b in INDEX])
def test_all_zero_and_all_dense_weights(kind, bits):
    for t in (torch.zeros(3, 5), torch.arange(1.0, 16.0).reshape(3, 5)):
        assert torch.equal(_sparse.decode("w", *_encode(t, kind=kind, bits=bits), [BIG]), t)


def test_relative_indices_use_fillers_for_long_gaps():
    t = torch.zeros(1000)
    t[[0, 999]] = 1.0
    entry, tensors = _encode(t, kind="relative", bits=3)
    assert entry["entries"] == 2 + (999 - 1) // 8  # each filler advances 8 positions
    assert torch.equal(_sparse.decode("w", entry, tensors, [BIG]), t)


def test_streams_are_compressed_when_that_is_smaller():
    t = torch.zeros(64, 64)
    t[::2, ::2] = 1.0  # a very regular mask and one value: both streams compress
    entry, tensors = _encode(t)
    assert set(entry["codecs"]) == {"index", "values"}
    assert all(v.dtype == torch.uint8 for v in tensors.values())
    assert torch.equal(_sparse.decode("w", entry, tensors, [BIG]), t)


# ----- hostile entries -----------------------------------------------------------------------------
def _bad(mutate, kind="int32", bits=32, values="float32", t=None):
    t = _weight() if t is None else t
    book = codes = None
    if values == "codebook":
        nnz = int((t != 0).sum())
        book, codes, values = np.array([1.0, 2.0], np.float32), np.arange(nnz) % 2, "float32"
    entry, tensors = _encode(t, values, book, codes, kind=kind, bits=bits, container_bits=2)
    mutate(entry, tensors)
    return entry, tensors


def _int32_positions(entry, tensors, positions):
    tensors["w::index"] = torch.tensor(positions, dtype=torch.int32)
    tensors["w::values"] = torch.ones(len(positions))
    entry["nnz"] = len(positions)
    entry.pop("codecs", None)


@pytest.mark.parametrize("mutate,kw,msg", [
    (lambda e, t: e.update(shape=[2 ** 40]), {}, "beyond max_numel"),
    (lambda e, t: e.update(shape=[-2, 3]), {}, "impossible shape"),
    (lambda e, t: e.update(shape="abc"), {}, "cannot be decoded: ValueError"),
    (lambda e, t: e.update(dtype="int8"), {}, "has dtype 'int8'"),
    (lambda e, t: e.update(dtype=["float32"]), {}, "cannot be decoded: TypeError"),
    (lambda e, t: _int32_positions(e, t, [3, 2]), {}, "out of range or out of order"),
    (lambda e, t: _int32_positions(e, t, [2, 2]), {}, "out of range or out of order"),
    (lambda e, t: _int32_positions(e, t, [-1, 2]), {}, "out of range or out of order"),
    (lambda e, t: _int32_positions(e, t, [0, 210]), {}, "out of range or out of order"),
    (lambda e, t: e.update(nnz=e["nnz"] + 1), {}, "indices but the header says"),
    (lambda e, t: t.update({"w::values": t["w::values"][:-1]}), {"t": _weight().reshape(-1)[:50]},
     "values for .* index entries"),
    (lambda e, t: t.update({"w::index": t["w::index"][:5]}), {"kind": "bitmask", "bits": 1},
     "bitmask is shorter"),
    (lambda e, t: e.update(index="rle"), {}, "unknown index encoding 'rle'"),
    (lambda e, t: e.update(index="relative", index_bits=17), {}, "unknown index encoding 'relative'/17"),
    (lambda e, t: e.update(values="int4"), {}, "unknown value encoding 'int4'"),
    (lambda e, t: e.update(values="codebook", value_bits=9), {"values": "codebook"}, r"outside \[1, 8\]"),
    (lambda e, t: t.update({"w::codebook": t["w::codebook"][:2]}), {"values": "codebook"},
     "beyond its codebook"),
    (lambda e, t: e.update(entries=10 ** 9), {"kind": "relative", "bits": 4}, "cannot be decoded: ValueError"),
    (lambda e, t: t.pop("w::values"), {}, "cannot be decoded: KeyError"),
    (lambda e, t: e.update(codecs=["zlib"]), {}, "malformed codecs"),
    (lambda e, t: e.update(codecs={"index": {"codec": "zlib", "raw_bytes": 10 ** 6, "dtype": "uint8"}}), {},
     "announces an impossible size"),
    (lambda e, t: e.update(codecs={"index": {"codec": "zlib", "raw_bytes": 8, "dtype": "uint8"}}), {},
     "does not decompress"),
], ids=["budget", "negative", "shape-type", "dtype", "dtype-type", "order", "duplicate", "negative-index", "range",
        "nnz", "count", "bitmask", "index", "bits", "values", "value-bits", "codebook", "entries", "missing",
        "codecs", "raw-bytes", "not-compressed"])
def test_malformed_entries_are_refused(mutate, kw, msg):
    entry, tensors = _bad(mutate, **kw)
    with pytest.raises(CorruptFileError, match=msg):
        _sparse.decode("w", entry, tensors, [BIG])


def test_the_budget_is_checked_before_any_stream_is_read():
    entry, _ = _encode(_weight())
    with pytest.raises(CorruptFileError, match=r"tensor 'w' \(shape \[7, 30\]\) takes the file beyond max_numel"):
        _sparse.decode("w", entry, {}, [209])
    budget = [210]
    _sparse.decode("w", entry, _encode(_weight())[1], budget)
    assert budget == [0]
