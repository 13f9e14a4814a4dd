"""One sparse weight's entry and streams: every index and value encoding decodes to exactly the weight it
was written from, and malformed entries or streams are refused with CorruptFileError."""

import json
import zlib

import numpy as np
import pytest
import torch

from bayes_sparse.export import CorruptFileError, _codecs, _sparse

BIG = 10 ** 9
INDEX = [("bitmask", 1), ("int32", 32), ("relative", 1), ("relative", 3), ("relative", 8), ("relative", 16)]


def _weight(seed=0, shape=(7, 30), density=0.2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < density)
    w.view(-1)[0], w.view(-1)[-1] = 0.5, -0.75  # both ends
    w.view(-1)[100:140] = 0  # one gap longer than 2**bits for small bits: fillers
    return w.to(dtype)


def _encode(t, values="float32", book=None, codes=None, kind="bitmask", bits=1, container_bits=0, key="w",
            raw=False):
    flat = t.reshape(-1)
    stored = getattr(torch, values)
    nz = flat[flat != 0].to(stored)
    positions = torch.nonzero(flat).reshape(-1)[nz != 0].numpy()  # as the policy does: none rounds to zero
    entry, streams = _sparse.encode(t, positions, nz[nz != 0], values, book, codes, kind, bits, container_bits)
    entry = json.loads(json.dumps(entry))  # as it comes back from a header
    if raw:  # every stream uncompressed
        for suffix, info in entry.pop("codecs", {}).items():
            streams[suffix] = _codecs.decompress(suffix, streams[suffix], info).clone()
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
    assert tensors["w::values"].dtype == getattr(torch, values) or "values" in entry.get("codecs", {})


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_lossless_values_are_stored_in_the_weights_dtype_bit_for_bit(dtype):
    t = _weight(dtype=dtype).masked_fill(_weight() == 0, 0)  # zeros load as +0.0
    if dtype == torch.float64:
        t.view(-1)[1] = 1 + 2 ** -40  # no float32 holds it
        t.view(-1)[2] = 1e-300  # nor this: float32 would round it to zero
    values = _sparse.stored_value_dtype(dtype, "float32")
    assert values == str(dtype)[6:]
    entry, tensors = _encode(t, values, kind="relative", bits=4)
    out = _sparse.decode("w", entry, tensors, [BIG])
    assert out.dtype == dtype and torch.equal(out.view(torch.uint8), t.view(torch.uint8))


def test_lossy_values_narrow_only_wider_weights():
    assert _sparse.stored_value_dtype(torch.float32, "float16") == "float16"
    assert _sparse.stored_value_dtype(torch.float64, "bfloat16") == "bfloat16"
    assert _sparse.stored_value_dtype(torch.bfloat16, "float16") == "bfloat16"  # never between 16-bit formats
    assert _sparse.stored_value_dtype(torch.float16, "bfloat16") == "float16"


@pytest.mark.parametrize("kind,bits", INDEX, ids=[f"{k}{b}" for k, b in INDEX])
def test_all_zero_and_all_dense_weights(kind, bits):
    for t in (torch.zeros(3, 5), torch.arange(1.0, 16.0).reshape(3, 5), torch.zeros(0, 4), torch.zeros(4, 0)):
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


@pytest.mark.parametrize("chunk", [8, 16, 64])
@pytest.mark.parametrize("kind,bits", INDEX, ids=[f"{k}{b}" for k, b in INDEX])
@pytest.mark.parametrize("values", ["float32", "codebook3", "codebook8"])
def test_chunked_decoding_across_chunk_boundaries(monkeypatch, chunk, kind, bits, values):
    monkeypatch.setattr(_sparse, "CHUNK", chunk)  # the decoder reads streams this many entries at a time
    t = _weight(seed=3, shape=(13, 57), density=0.3)
    if values == "float32":
        entry, tensors = _encode(t, kind=kind, bits=bits)
    else:
        book = np.array([-1.5, 0.25, 2.0], np.float32)
        codes = np.random.default_rng(0).integers(0, 3, int((t != 0).sum()))
        t = t.masked_scatter(t != 0, torch.from_numpy(book[codes]))
        entry, tensors = _encode(t, book=book, codes=codes, kind=kind, bits=bits, container_bits=int(values[8:]))
    assert torch.equal(_sparse.decode("w", entry, tensors, [BIG]), t)


@pytest.mark.parametrize("codec", ["zlib", "lzma"])
def test_compressed_streams_are_read_in_chunks(monkeypatch, codec):
    monkeypatch.setattr(_sparse, "CHUNK", 16)
    t = torch.zeros(64, 64)
    t[::2, ::3] = 1.5  # regular: both streams compress
    entry, tensors = _encode(t, kind="relative", bits=3)
    for suffix in ("index", "values"):
        raw = tensors[f"w::{suffix}"]
        if "codecs" in entry and suffix in entry["codecs"]:
            raw = _codecs.decompress("k", raw, entry["codecs"][suffix])
        packed = _codecs.CODECS[codec](raw.contiguous().view(torch.uint8).numpy().tobytes())
        tensors[f"w::{suffix}"] = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
        entry.setdefault("codecs", {})[suffix] = {"codec": codec, "raw_bytes": raw.numel() * raw.element_size(),
                                                  "dtype": str(raw.dtype)[6:]}
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


def _retype(tensors, name, dtype):
    """Reinterpret a stored stream's bytes as another dtype (its length adjusted): a crafted file."""
    raw = tensors[name].contiguous().view(torch.uint8)
    size = torch.tensor([], dtype=dtype).element_size()
    tensors[name] = raw[: raw.numel() // size * size].view(dtype)


def _recompress(entry, tensors, suffix, payload, raw_bytes=None, dtype="uint8", codec="zlib"):
    tensors[f"w::{suffix}"] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    entry.setdefault("codecs", {})[suffix] = {"codec": codec, "raw_bytes": raw_bytes, "dtype": dtype}


@pytest.mark.parametrize("mutate,kw,msg", [
    (lambda e, t: e.update(shape=[2 ** 40]), {}, "field 'shape'.*beyond max_numel"),
    (lambda e, t: e.update(shape=[-2, 3]), {}, "field 'shape'.*not a shape"),
    (lambda e, t: e.update(shape="abc"), {}, "field 'shape'.*not a shape"),
    (lambda e, t: e.update(shape=[True, 3]), {}, "field 'shape'.*not a shape"),
    (lambda e, t: e.update(dtype="int8"), {}, "field 'dtype'.*has dtype 'int8'"),
    (lambda e, t: e.update(dtype=["float32"]), {}, "field 'dtype'"),
    (lambda e, t: _int32_positions(e, t, [3, 2]), {}, "field 'index'.*out of range or out of order"),
    (lambda e, t: _int32_positions(e, t, [2, 2]), {}, "out of range or out of order"),
    (lambda e, t: _int32_positions(e, t, [-1, 2]), {}, "out of range or out of order"),
    (lambda e, t: _int32_positions(e, t, [0, 210]), {}, "out of range or out of order"),
    (lambda e, t: e.update(nnz=e["nnz"] + 1), {}, "field '(index|codecs)'.*implies"),
    (lambda e, t: e.update(nnz=e["nnz"] - 1), {"kind": "bitmask", "bits": 1}, "field 'values'.*implies F32"),
    (lambda e, t: e.update(nnz=e["nnz"] - 1), {"values": "codebook", "kind": "relative", "bits": 8},
     "field 'nnz'"),
    (lambda e, t: e.update(nnz="7"), {}, "field 'nnz': '7' is not an integer"),
    (lambda e, t: e.update(nnz=True), {}, "field 'nnz': True is not an integer"),
    (lambda e, t: e.update(entries=e["entries"] - 1), {"values": "codebook", "kind": "relative", "bits": 4},
     "field '(values|index|entries|nnz)'"),
    (lambda e, t: e.update(index_bits=e["index_bits"] - 1), {"kind": "relative", "bits": 4}, "field '(index|entries)'"),
    (lambda e, t: e.update(value_bits=e["value_bits"] - 1), {"values": "codebook"}, "field 'values'"),
    (lambda e, t: t.update({"w::values": t["w::values"][:-1]}), {"t": _weight().reshape(-1)[:50]},
     "field 'values'.*implies F32"),
    (lambda e, t: t.update({"w::index": t["w::index"][:5]}), {"kind": "bitmask", "bits": 1}, "field 'index'"),
    (lambda e, t: _retype(t, "w::values", torch.int32), {"values": "codebook"}, "field 'values'.*is I32"),
    (lambda e, t: _retype(t, "w::values", torch.float16), {"values": "codebook"}, "field 'values'.*is F16"),
    (lambda e, t: _retype(t, "w::values", torch.int32), {}, "field 'values'.*is I32"),
    (lambda e, t: _retype(t, "w::index", torch.int16), {}, "field 'index'.*is I16"),
    (lambda e, t: e.update(index="rle"), {}, "field 'index'.*unknown index encoding 'rle'"),
    (lambda e, t: e.update(index="relative", index_bits=17, entries=e["nnz"]), {},
     "unknown index encoding 'relative'/17"),
    (lambda e, t: e.update(index_bits=8), {"kind": "bitmask", "bits": 1}, "unknown index encoding 'bitmask'/8"),
    (lambda e, t: e.update(values="int4"), {}, "field 'values'.*unknown value encoding 'int4'"),
    (lambda e, t: e.update(values="float64"), {}, "field 'values'.*float64 values for a float32 weight"),
    (lambda e, t: e.update(values="codebook", value_bits=9), {"values": "codebook"}, r"outside \[1, 8\]"),
    (lambda e, t: e.pop("value_bits"), {"values": "codebook"}, "field 'value_bits': missing"),
    (lambda e, t: e.pop("entries"), {"kind": "relative", "bits": 4}, "field 'entries': missing"),
    (lambda e, t: e.update(extra=1), {}, "field 'extra': not a field"),
    (lambda e, t: e.update(entries=5), {}, "field 'entries': not a field"),
    (lambda e, t: t.update({"w::codebook": t["w::codebook"][:2]}), {"values": "codebook"},
     "field 'values'.*beyond its codebook"),
    (lambda e, t: t.update({"w::codebook": t["w::codebook"] + 1}), {"values": "codebook"},
     "field 'codebook'.*code 0"),
    (lambda e, t: t.update({"w::codebook": torch.zeros(300)}), {"values": "codebook"}, "field 'codebook'"),
    (lambda e, t: e.update(entries=10 ** 9), {"kind": "relative", "bits": 4}, r"field 'entries'.*outside"),
    (lambda e, t: t.pop("w::values"), {}, "field 'values'.*missing"),
    (lambda e, t: e.update(codecs=["zlib"]), {}, "field 'codecs': malformed codecs"),
    (lambda e, t: e.update(codecs={"index": {"codec": "zlib", "raw_bytes": 10 ** 6, "dtype": "uint8"}}), {},
     "field 'codecs'.*implies"),
    (lambda e, t: _recompress(e, t, "index", zlib.compress(b"\1" * 8), 8), {}, "field 'codecs'.*implies"),
    (lambda e, t: _recompress(e, t, "values", b"garbage", 4 * e["nnz"], "float32"), {}, "does not decompress"),
    (lambda e, t: _recompress(e, t, "values", zlib.compress(b"\0" * (4 * e["nnz"] - 4)), 4 * e["nnz"], "float32"),
     {}, "decompresses to .* bytes, the header says"),
    (lambda e, t: _recompress(e, t, "values", zlib.compress(b"\0\0\x80\x3f" * (e["nnz"] + 1)), 4 * e["nnz"],
                              "float32"), {}, "decompresses to more than"),
    (lambda e, t: _recompress(e, t, "values", zlib.compress(b"\0\0\x80\x3f" * e["nnz"]) + b"xx", 4 * e["nnz"],
                              "float32"), {}, "other bytes follow"),
    (lambda e, t: _recompress(e, t, "values", zlib.compress(b"\0\0\x80\x3f" * e["nnz"]), 4 * e["nnz"], "int32"),
     {}, "field 'codecs'.*implies .* float32"),
    (lambda e, t: _recompress(e, t, "values", b"\1" * (4 * e["nnz"]), 4 * e["nnz"], "float32"), {},
     "compressed stream .* shorter than"),
], ids=["budget", "negative", "shape-type", "shape-bool", "dtype", "dtype-type", "order", "duplicate",
        "negative-index", "range", "nnz+1", "nnz-1-bitmask", "nnz-1-codebook", "nnz-str", "nnz-bool",
        "entries-1-codebook", "index-bits-1", "value-bits-1", "count", "bitmask", "codes-as-int32",
        "codes-as-float16", "values-as-int32", "index-as-int16", "index", "bits", "bitmask-bits", "values",
        "values-float64", "value-bits", "no-value-bits", "no-entries", "extra", "entries-not-relative",
        "codebook", "codebook-zero", "codebook-long", "entries", "missing", "codecs", "raw-bytes",
        "raw-bytes-wrong", "not-compressed", "short", "long", "trailing", "codec-dtype", "not-shorter"])
def test_malformed_entries_are_refused(mutate, kw, msg):
    entry, tensors = _bad(mutate, **kw)
    with pytest.raises(CorruptFileError, match=msg):
        _sparse.decode("w", entry, tensors, [BIG])


def test_a_relative_filler_with_a_value_is_refused():
    t = torch.zeros(100)
    t[[3, 90]] = torch.tensor([1.5, -2.0])
    entry, tensors = _encode(t, kind="relative", bits=3, raw=True)  # fillers between 3 and 90
    assert entry["entries"] > 2
    vals = tensors["w::values"].clone()
    vals[1] = 7.0  # a filler's value: it would write 7 at the filler's position
    tensors["w::values"] = vals
    with pytest.raises(CorruptFileError, match="field 'nnz'"):
        _sparse.decode("w", entry, tensors, [BIG])
    vals[1], vals[-1] = 0.0, 0.0  # the last entry a filler
    with pytest.raises(CorruptFileError, match="field 'values'.*filler|field 'entries'"):
        _sparse.decode("w", entry, tensors, [BIG])


def test_bits_after_the_last_code_are_refused():
    t = torch.zeros(37)
    t[[1, 5, 7]] = 1.0
    for kind, bits in (("bitmask", 1), ("relative", 3)):
        entry, tensors = _encode(t, kind=kind, bits=bits, raw=True)
        index = tensors["w::index"].clone()
        index[-1] |= 0x80  # the last byte's top bit lies after the last code (37 bits; 3 codes x 3 bits)
        tensors["w::index"] = index
        with pytest.raises(CorruptFileError, match="field 'index'.*(bits set after|out of range)"):
            _sparse.decode("w", entry, tensors, [BIG])


def test_version_1_entries_keep_their_own_rules():
    # version 1 stored float32 values for weights of any float dtype, and could store a value rounded to zero
    t = torch.zeros(2, 8, dtype=torch.float16)
    t[0, 1], t[1, 7] = 0.5, -0.25
    entry, tensors = _encode(t.float(), kind="relative", bits=2, raw=True)
    entry["dtype"] = "float16"
    assert torch.equal(_sparse.decode("w", entry, tensors, [BIG], version=1), t)
    with pytest.raises(CorruptFileError, match="float32 values for a float16 weight"):
        _sparse.decode("w", entry, tensors, [BIG], version=2)
    vals = tensors["w::values"].clone()
    vals[0] = 0.0  # a real entry whose value was rounded to zero
    tensors["w::values"] = vals
    back = _sparse.decode("w", entry, tensors, [BIG], version=1)
    assert back[0, 1] == 0 and back[1, 7] == -0.25
    entry["values"] = "float64"
    with pytest.raises(CorruptFileError, match="unknown value encoding 'float64'"):
        _sparse.decode("w", entry, tensors, [BIG], version=1)


def test_the_budget_is_checked_before_any_stream_is_read():
    entry, _ = _encode(_weight())
    with pytest.raises(CorruptFileError, match=r"tensor 'w' \(shape \[7, 30\]\) takes the file beyond max_numel"):
        _sparse.decode("w", entry, {}, [209])
    budget = [210]
    _sparse.decode("w", entry, _encode(_weight())[1], budget)
    assert budget == [0]
