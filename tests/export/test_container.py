"""Container: what is written is read back exactly; damaged, truncated, foreign or crafted files are refused
with CorruptFileError before any number is trusted."""

import base64
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from bayes_sparse.export import CorruptFileError, _container


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.weight::index": torch.randint(0, 255, (37,), dtype=torch.uint8, generator=g),
            "a.weight::values": torch.randn(11, generator=g).half(), "a.bias": torch.randn(3, generator=g),
            "n": torch.tensor(7, dtype=torch.int64), "empty": torch.zeros(0)}


def _entries():
    return {"a.weight": {"kind": "sparse", "shape": [2, 3]}, "a.bias": {"kind": "plain"}, "n": {"kind": "plain"},
            "empty": {"kind": "plain"}}


@pytest.fixture
def written(tmp_path):
    path = tmp_path / "f.safetensors"
    tree = {"type": "Sequential", "children": []}
    n = _container.write(path, _entries(), _tensors(), tree)
    return path, n, tree


def _frame(data):
    """(length field, safetensors JSON header, tensor bytes) of a safetensors file: read independently."""
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def _reframe(head, body):
    text = json.dumps(head).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def test_crc_is_crc32_of_the_tensor_bytes():
    for t in _tensors().values():
        assert _container.crc(t) == (zlib.crc32(t.numpy().tobytes()) if t.numel() else 0)
    assert _container.crc(torch.arange(6.0).reshape(2, 3).t()) == zlib.crc32(np.array([0, 3, 1, 4, 2, 5], np.float32)
                                                                              .tobytes())  # contiguous order


def test_header_text_is_zlib_compressed_sorted_compact_json():
    header = {"b": [1, 2, {"y": None, "x": "é"}], "a": 1.5}
    text = _container.encode_header(header)
    assert zlib.decompress(base64.b64decode(text)) == b'{"a":1.5,"b":[1,2,{"x":"\\u00e9","y":null}]}'
    assert _container.decode_header(text) == header


def test_write_and_read_back(written):
    path, n, tree = written
    data = path.read_bytes()
    assert n == len(data)
    length, head, body = _frame(data)
    assert (8 + length) % 8 == 0  # the data starts aligned, as safetensors writes it
    meta = head["__metadata__"]
    assert meta["format"] == "bayes_sparse" and meta["version"] == "2"
    assert meta["header_crc32"] == str(zlib.crc32(meta["header"].encode()))
    stored = st_load(data)  # plain safetensors underneath
    assert all(torch.equal(stored[k], v) for k, v in _tensors().items())
    header, tensors = _container.read(path)
    assert header["tensors"] == _entries() and header["tree"] == tree
    # the header's copy of the whole safetensors tensor table, with a CRC32 of each tensor's bytes
    for k, v in _tensors().items():
        row = head[k]
        assert header["streams"][k] == {"dtype": row["dtype"], "shape": row["shape"], "offsets": row["data_offsets"],
                                        "crc32": _container.crc(v)}
        a, b = row["data_offsets"]
        assert a % v.element_size() == 0 and body[a:b] == v.numpy().tobytes()  # each aligned to its element
    assert tensors.keys() == _tensors().keys()
    assert all(torch.equal(tensors[k], v) and tensors[k].dtype == v.dtype for k, v in _tensors().items())


def _read_bytes(tmp_path, data):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(data)
    return _container.read(p)


def test_a_damaged_tensor_fails_its_checksum(tmp_path, written):
    data = written[0].read_bytes()
    n, head, body = _frame(data)
    for key, info in head.items():
        if key == "__metadata__" or info["data_offsets"][0] == info["data_offsets"][1]:
            continue
        b = bytearray(data)
        b[8 + n + info["data_offsets"][0]] ^= 0x41
        with pytest.raises(CorruptFileError, match=f"tensor '{key}' fails its checksum"):
            _read_bytes(tmp_path, bytes(b))


def test_every_truncation_is_refused(tmp_path, written):
    data = written[0].read_bytes()
    for length in sorted({*range(0, 24), *range(24, len(data), 17), len(data) - 1}):
        with pytest.raises(CorruptFileError):
            _read_bytes(tmp_path, data[:length])
    with pytest.raises(CorruptFileError, match="too short"):
        _read_bytes(tmp_path, data[:7])
    with pytest.raises(CorruptFileError, match=r"claims \d+ bytes .*\(truncated"):
        _read_bytes(tmp_path, data[:40])


def _with_metadata(data, **changes):
    _, head, body = _frame(data)
    head["__metadata__"].update(changes)
    return _reframe(head, body)


def _with_header(data, header):
    text = _container.encode_header(header)
    return _with_metadata(data, header=text, header_crc32=str(zlib.crc32(text.encode())))


def test_framing_and_identity_problems(tmp_path, written):
    data = written[0].read_bytes()
    with pytest.raises(CorruptFileError, match="cannot read"):
        _container.read(tmp_path / "missing")
    with pytest.raises(CorruptFileError, match="not a readable safetensors file"):
        _read_bytes(tmp_path, struct.pack("<Q", 4) + b"{[}]")
    with pytest.raises(CorruptFileError, match="not a bayes_sparse model file \\(format None\\)"):
        _read_bytes(tmp_path, st_save({"w": torch.ones(2)}))
    with pytest.raises(CorruptFileError, match="format 'other'"):
        _read_bytes(tmp_path, _with_metadata(data, format="other"))
    with pytest.raises(CorruptFileError, match="format version '3'; this library reads versions 1, 2"):
        _read_bytes(tmp_path, _with_metadata(data, version="3"))
    with pytest.raises(CorruptFileError, match="format version 2; "):
        _read_bytes(tmp_path, _with_metadata(data, version=2))
    with pytest.raises(CorruptFileError, match="the metadata holds .*'x'.*; a model file holds exactly"):
        _read_bytes(tmp_path, _with_metadata(data, x="1"))
    with pytest.raises(CorruptFileError, match="header checksum does not match"):
        _read_bytes(tmp_path, _with_metadata(data, header_crc32="0"))


def _v2(**changes):
    return {"tensors": {}, "tree": None, "streams": {}, **changes}


@pytest.mark.parametrize("header,msg", [
    ([], "no tensor table"), ({"tensors": []}, "no tensor table"),
    (_v2(streams={"a.bias": 1}), "do not match the header's"),
    (_v2(streams="x"), "do not match the header's"),
    ({"tensors": {}, "tree": None, "crc32": {}}, "a version 2 header holds"),
    (_v2(extra=1), "a version 2 header holds"),
], ids=["list", "table", "keys", "streams-type", "v1-table", "extra"])
def test_crafted_headers_with_valid_checksums(tmp_path, written, header, msg):
    with pytest.raises(CorruptFileError, match=msg):
        _read_bytes(tmp_path, _with_header(written[0].read_bytes(), header))


def _edit_table(data, name, **changes):
    _, head, body = _frame(data)
    head[name].update(changes)
    return _reframe(head, body)


@pytest.mark.parametrize("name,changes,msg", [
    ("a.weight::values", {"dtype": "I16"},
     "field 'dtype': the safetensors header says 'I16', its checksummed copy 'F16'"),
    ("a.weight::values", {"dtype": "BF16"}, "field 'dtype'"),
    ("a.bias", {"dtype": "I32"}, "field 'dtype'"),
    ("a.bias", {"shape": [1, 3]}, "field 'shape'"),
    ("a.weight::index", {"shape": [37, 1]}, "field 'shape'"),
    ("a.weight::index", {"shape": [36]}, "field 'data_offsets': 37 bytes for U8 \\[36\\]"),
    ("a.bias", {"dtype": "F64"}, "field 'data_offsets': 12 bytes for F64"),
    ("a.bias", {"dtype": "C64"}, "field 'dtype': 'C64' is not one of"),
    ("a.bias", {"data_offsets": [0, 12]}, "do not tile the data|field 'data_offsets'"),
    ("a.bias", {"extra": 1}, "entry of 'a.bias' is malformed"),
], ids=["dtype-swap", "dtype-16", "bias-dtype", "bias-shape", "index-shape", "short", "f64", "c64", "offsets",
        "extra"])
def test_every_byte_of_the_tensor_table_is_checked(tmp_path, written, name, changes, msg):
    # a change in the safetensors tensor table keeps every tensor's CRC32: its checksummed copy catches it
    with pytest.raises(CorruptFileError, match=msg):
        _read_bytes(tmp_path, _edit_table(written[0].read_bytes(), name, **changes))


def test_duplicate_json_keys_are_refused(tmp_path, written):
    data = written[0].read_bytes()
    n, head, body = _frame(data)
    text = data[8:8 + n].decode().rstrip()
    dup = text[:-1] + ',"a.bias":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}'
    with pytest.raises(CorruptFileError, match="the key 'a.bias' appears twice"):
        _read_bytes(tmp_path, _reframe_text(dup, body))
    inner = json.dumps(_container.decode_header(head["__metadata__"]["header"]))
    inner = inner[:-1] + ', "tensors": {}}'  # the last copy empty: every entry would be dropped
    packed = base64.b64encode(zlib.compress(inner.encode())).decode()
    with pytest.raises(CorruptFileError, match="the key 'tensors' appears twice"):
        _read_bytes(tmp_path, _with_metadata(data, header=packed, header_crc32=str(zlib.crc32(packed.encode()))))


def _reframe_text(text, body):
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def test_nan_in_json_is_refused():
    with pytest.raises(CorruptFileError, match="NaN is not a JSON value"):
        _container.decode_header(base64.b64encode(zlib.compress(b'{"a": NaN}')).decode())


def test_a_file_longer_than_its_header_implies_is_refused_without_reading_it(tmp_path, written, monkeypatch):
    data = written[0].read_bytes()
    p = tmp_path / "long.safetensors"
    p.write_bytes(data)
    with open(p, "r+b") as f:
        f.truncate(len(data) + (1 << 40))  # a terabyte more (sparse on disk)
    reads = []
    real = _container._read_exactly
    monkeypatch.setattr(_container, "_read_exactly", lambda f, n, *a: reads.append(n) or real(f, n, *a))
    with pytest.raises(CorruptFileError, match="its header accounts for .*trailing bytes; refused before reading"):
        _container.load(p)
    assert sum(reads) < len(data)  # the length field and the JSON header, not the data
    with pytest.raises(CorruptFileError, match="trailing bytes"):
        _read_bytes(tmp_path, data + b"\0")
    with pytest.raises(CorruptFileError, match="truncated"):
        _read_bytes(tmp_path, data[:-1])


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "dev-null", "directory", "dangling", "loop"])
def test_only_regular_files_are_read(tmp_path, kind):
    import os

    p = tmp_path / "m.safetensors"
    if kind == "fifo":
        os.mkfifo(p)  # opening it for reading would block until a writer came
    elif kind == "dev-zero":
        p.symlink_to("/dev/zero")  # reading it would never end
    elif kind == "dev-null":
        p.symlink_to("/dev/null")
    elif kind == "directory":
        p.mkdir()
    elif kind == "dangling":
        p.symlink_to(tmp_path / "nowhere")
    else:
        p.symlink_to(p)
    msg = "cannot read" if kind in ("dangling", "loop") else "not a regular file: refused without reading it"
    with pytest.raises(CorruptFileError, match=msg):
        _container.load(p)


def test_version_1_files_are_read_with_their_crc_table(tmp_path, written):
    # a version 1 file: the same frame, a "crc32" table instead of the copy of the tensor table
    data = written[0].read_bytes()
    header = _container.decode_header(_frame(data)[1]["__metadata__"]["header"])
    v1 = {"tensors": header["tensors"], "tree": header["tree"],
          "crc32": {k: r["crc32"] for k, r in header["streams"].items()}}
    text = _container.encode_header(v1)
    data = _with_metadata(data, version="1", header=text, header_crc32=str(zlib.crc32(text.encode())))
    back, tensors = _read_bytes(tmp_path, data)
    assert back == v1 and tensors.keys() == _tensors().keys()
    with pytest.raises(CorruptFileError, match="a version 1 header holds"):
        _read_bytes(tmp_path, _with_metadata(_with_header(written[0].read_bytes(), header), version="1"))


@pytest.mark.parametrize("text,msg", [
    ("not base64!", "cannot be decoded: (ValueError|Error)"),
    (base64.b64encode(b"plain").decode(), "cannot be decoded: error"),
    (base64.b64encode(zlib.compress(b'{"a": 1')[:-4]).decode(), "truncated or larger than 16 MiB"),
    (base64.b64encode(zlib.compress(b" " * (17 << 20))).decode(), "decompresses to more than 16777216 bytes"),
    (base64.b64encode(zlib.compress(b"\xff\xfe")).decode(), "UnicodeDecodeError"),
    (base64.b64encode(zlib.compress(b"[" * 100000 + b"]" * 100000)).decode(), "RecursionError"),
], ids=["base64", "zlib", "truncated", "bomb", "utf8", "deep"])
def test_decode_header_refuses(text, msg):
    with pytest.raises(CorruptFileError, match=msg):
        _container.decode_header(text)


def test_decode_state_restores_plain_tensors():
    tensors = {"h": torch.tensor([1.5, -2.0]).half(), "b": torch.tensor([0.25, 3.0]).bfloat16(),
               "f": torch.tensor([1.0, 2.0]), "i": torch.tensor([3], dtype=torch.int64)}
    header = {"tensors": {"h": {"kind": "plain", "dtype": "float32"}, "b": {"kind": "plain", "dtype": "float32"},
                          "f": {"kind": "plain"}, "i": {"kind": "plain"}}}
    out = _container.decode_state("p", header, tensors)
    assert out["h"].dtype == out["b"].dtype == torch.float32
    assert out["h"].tolist() == [1.5, -2.0] and out["b"].tolist() == [0.25, 3.0]
    assert torch.equal(out["i"], tensors["i"]) and out["i"].dtype == torch.int64
    out["f"][0] = 9  # a copy: the stored tensors are not handed out
    assert tensors["f"][0] == 1.0


@pytest.mark.parametrize("entries,msg", [
    ({"x": []}, "malformed entry for 'x'"), ({"x": {"kind": "plain"}}, "tensor 'x' is missing"),
    ({"f": {"kind": "plain", "dtype": "int8"}}, "unsupported dtype 'int8'"),
    ({"f": {"kind": "ragged"}}, "unknown entry kind 'ragged'"),
    ({"f": {"kind": "sparse"}}, "tensor 'f', field '[a-z_]+': missing"),
    ({"f": {"kind": "plain", "dtype": None}}, "field 'dtype': unsupported dtype None"),
    ({"f": {"kind": "plain", "dtype": "float32"}}, "restored to float32 is stored as F16 or BF16, not F32"),
    ({"f": {"kind": "plain", "extra": 1}}, "field 'extra': not a field of a plain entry"),
    ({}, "the stored tensor 'f' belongs to no entry"),
], ids=["entry", "missing", "dtype", "kind", "sparse", "dtype-null", "not-half", "extra", "orphan"])
def test_decode_state_refuses(entries, msg):
    with pytest.raises(CorruptFileError, match=msg):
        _container.decode_state("p", {"tensors": entries}, {"f": torch.ones(2)})
