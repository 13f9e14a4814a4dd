"""Compressed files: lossless round trips, encodings, size accounting, and 600 damaged files."""

import io
import json
import random
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save
from torch import nn

import bayes_sparse as bs
from bayes_sparse.export import CorruptFileError, _bits, fileformat


def _sparse_lenet(density_spread=(-14, 2)):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Unflatten(1, (1, 12, 12)), bs.VDConv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), bs.VDLinear(144, 40), nn.ReLU(), bs.VDLinear(40, 10))
    with torch.no_grad():
        for m in net:
            if isinstance(m, bs.SparseLayer):
                m.log_sigma2.uniform_(*density_spread)
    bs.threshold_(net)
    return net


@pytest.mark.parametrize("values", ["float32", "float16", "bfloat16", 4, "auto"])
def test_round_trip(tmp_path, values):
    net = _sparse_lenet()
    dense = bs.to_dense(net).eval()
    path = tmp_path / "m.safetensors"
    rep = bs.export.save(net, path, values=values)
    assert rep.total_bytes == path.stat().st_size
    back = bs.export.load(path)  # rebuilt from the header's module tree, no architecture given
    assert [type(m) for m in back.modules()] == [type(m) for m in dense.modules()]
    x = torch.rand(7, 144)
    if values == "float32":
        assert torch.equal(back(x), dense(x))  # bit-identical
        for k, v in bs.export.load_state_dict(path).items():
            assert torch.equal(v, dense.state_dict()[k]), k
    else:
        sd = bs.export.load_state_dict(path)
        for k, v in dense.state_dict().items():  # the mask survives exactly, only values are rounded
            assert torch.equal(sd[k] != 0, v != 0), k
        torch.testing.assert_close(back(x), dense(x), rtol=0.3, atol=0.3)


def test_load_into_a_given_architecture_and_needs_one_otherwise(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(x).relu()

    net = Net()
    bs.export.save(net, tmp_path / "n.safetensors")
    with pytest.raises(ValueError, match=r"does not record its module tree.*load\(path, model=MyNet\(\)\)"):
        bs.export.load(tmp_path / "n.safetensors")
    back = bs.export.load(tmp_path / "n.safetensors", model=Net())
    assert torch.equal(back.fc.weight, net.fc.weight)
    with pytest.raises(CorruptFileError, match="does not fit the architecture"):
        bs.export.load(tmp_path / "n.safetensors", model=nn.Sequential(nn.Linear(6, 4)))


def test_encodings_are_the_cheapest_and_decode_exactly():
    rng = np.random.default_rng(0)
    for density in (0.001, 0.02, 0.3, 0.9):
        n = 20000
        pos = np.flatnonzero(rng.random(n) < density)
        kind, bits, total = _bits.choose_index_encoding(pos, n, 32)
        assert total <= n + pos.size * 32 and total <= pos.size * 64
        for b in (3, 8, 16):
            codes, real = _bits.encode_relative(pos, b)
            assert codes.max(initial=0) < 2**b
            assert np.array_equal(_bits.decode_relative(codes, b)[real], pos)
            assert np.array_equal(_bits.unpack(_bits.pack(codes, b), b, codes.size), codes)
    assert _bits.choose_index_encoding(np.arange(0, 1000, 2), 1000, 32)[0] in ("bitmask", "relative")
    assert _bits.choose_index_encoding(np.array([5, 900_000]), 1_000_000, 32)[0] == "int32"


@pytest.mark.parametrize("bits", [1, 3, 7, 8, 9, 16])
def test_pack_lays_codes_out_bit_by_bit_little_endian(bits):
    codes = np.random.default_rng(bits).integers(0, 1 << bits, 1001)
    planes = ((codes[:, None] >> np.arange(bits)) & 1).astype(np.uint8)  # the layout, spelled out
    packed = _bits.pack(codes, bits)
    assert packed.dtype == np.uint8 and np.array_equal(packed, np.packbits(planes.reshape(-1), bitorder="little"))
    assert np.array_equal(_bits.unpack(packed, bits, codes.size), codes)


def test_choose_index_encoding_counts_the_entries_of_relative_entries():
    rng = np.random.default_rng(1)
    for density in (0.0005, 0.01, 0.2, 0.7):
        pos = np.flatnonzero(rng.random(30000) < density)
        kind, bits, total = _bits.choose_index_encoding(pos, 30000, 32)
        if kind == "relative":
            assert total == _bits.relative_entries(pos, bits) * (bits + 32)
        totals = [_bits.relative_entries(pos, b) * (b + 32) for b in range(1, 17)]
        assert total == min([30000 + pos.size * 32, pos.size * 64, *totals])


def test_save_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"values must be one of .* got 'int8'"):
        bs.export.save(nn.Linear(2, 2), tmp_path / "x", values="int8")
    with pytest.raises(ValueError, match=r"tolerance must be in \(0.0, inf\], got -1.0"):
        bs.export.save(nn.Linear(2, 2), tmp_path / "x", values="auto", tolerance=-1.0)
    with pytest.raises(ValueError, match="got 9"):
        bs.export.save(nn.Linear(2, 2), tmp_path / "x", values=9)
    with pytest.raises(RuntimeError, match="call bayes_sparse.threshold_"):
        bs.export.save(nn.Sequential(bs.VDLinear(2, 2)), tmp_path / "x")
    with pytest.raises(ValueError, match=r"effort must be one of \('auto', 'fast', 'best'\), got 'slow'"):
        bs.export.save(nn.Linear(2, 2), tmp_path / "x", effort="slow")


@pytest.mark.parametrize("values", ["float32", 4])
def test_every_effort_writes_a_file_that_loads_to_the_same_numbers(tmp_path, values, monkeypatch):
    net = _sparse_lenet()
    sizes, states = {}, {}
    for effort in ("fast", "best", "auto"):
        path = tmp_path / f"{effort}.safetensors"
        sizes[effort] = bs.export.save(net, path, values=values, effort=effort).total_bytes
        states[effort] = bs.export.load_state_dict(path)
    for k, v in states["best"].items():
        assert torch.equal(states["fast"][k], v) and torch.equal(states["auto"][k], v), k
    if values == "float32":
        for k, v in bs.to_dense(net).state_dict().items():
            assert torch.equal(states["fast"][k], v), k
    assert sizes["best"] <= sizes["fast"] and sizes["auto"] == sizes["best"]  # a small model: auto is best
    monkeypatch.setattr(fileformat._policy, "AUTO_BEST_NNZ", 10)  # now it is a large one: auto is fast
    rep = bs.export.save(net, tmp_path / "a.safetensors", values=values)
    assert rep.total_bytes == sizes["fast"] and all("lzma" not in r["encoding"] for r in rep.layers.values())


# ----- damaged files -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    net = _sparse_lenet()
    path = tmp_path_factory.mktemp("f") / "good.safetensors"
    bs.export.save(net, path, values=4)
    return path.read_bytes(), bs.export.load_state_dict(path)


def _load_bytes(tmp_path, data):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(data)
    return bs.export.load_state_dict(p)


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fuzz_600_damaged_files(tmp_path, good_file):
    data, reference = good_file
    rng = random.Random(1234)
    outcomes = {"error": 0, "harmless": 0}
    for i in range(600):
        b = bytearray(data)
        kind = i % 4
        if kind == 0:  # truncation
            b = b[: rng.randrange(0, len(b))]
        elif kind == 1:  # one flipped byte anywhere
            j = rng.randrange(len(b))
            b[j] ^= rng.randrange(1, 256)
        elif kind == 2:  # a flipped byte inside the safetensors/JSON header
            j = rng.randrange(8, 8 + int.from_bytes(data[:8], "little"))
            b[j] ^= rng.randrange(1, 256)
        else:  # a burst of random bytes
            j = rng.randrange(len(b))
            b[j:j + 16] = bytes(rng.randrange(256) for _ in range(16))
        try:
            loaded = _load_bytes(tmp_path, bytes(b))
        except CorruptFileError as e:
            assert str(e)
            outcomes["error"] += 1
        else:  # only a change that does not alter meaning (e.g. JSON whitespace) may load, and then exactly
            assert _same(loaded, reference), f"case {i} loaded different numbers"
            outcomes["harmless"] += 1
    assert outcomes["error"] >= 550, outcomes


def _rewrite_metadata(data, **changes):
    n = int.from_bytes(data[:8], "little")
    head = json.loads(data[8:8 + n])
    head["__metadata__"].update(changes)
    new = json.dumps(head).encode()
    new += b" " * (-len(new) % 8)
    return struct.pack("<Q", len(new)) + new + data[8 + n:]


def test_named_problems(tmp_path, good_file):
    data, _ = good_file
    with pytest.raises(CorruptFileError, match="too short"):
        _load_bytes(tmp_path, data[:5])
    with pytest.raises(CorruptFileError, match=r"claims \d+ bytes .*truncated"):
        _load_bytes(tmp_path, data[:100])
    with pytest.raises(CorruptFileError, match="not a bayes_sparse model file \\(format 'other'\\)"):
        _load_bytes(tmp_path, _rewrite_metadata(data, format="other"))
    with pytest.raises(CorruptFileError, match="format version '99'; this library reads versions 1, 2"):
        _load_bytes(tmp_path, _rewrite_metadata(data, version="99"))
    with pytest.raises(CorruptFileError, match="header checksum does not match"):
        _load_bytes(tmp_path, _rewrite_metadata(data, header_crc32="1"))
    import zlib
    for junk in ("not base64!", "aGVsbG8="):  # not base64; base64 of something that is not zlib
        with pytest.raises(CorruptFileError, match="header cannot be decoded"):
            _load_bytes(tmp_path, _rewrite_metadata(data, header=junk, header_crc32=str(zlib.crc32(junk.encode()))))
    with pytest.raises(CorruptFileError, match="not a bayes_sparse model file"):  # another tool's safetensors file
        _load_bytes(tmp_path, st_save({"w": torch.ones(3)}))
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)  # a pickle-based torch file is refused without being unpickled
    with pytest.raises(CorruptFileError):
        _load_bytes(tmp_path, buf.getvalue())
    with pytest.raises(CorruptFileError, match="cannot read"):
        bs.export.load_state_dict(tmp_path / "missing.safetensors")


def test_out_of_range_indices_are_caught_even_with_valid_checksums(tmp_path):
    # a writer bug (not damage): indices beyond the tensor, with correct checksums
    lin = nn.Linear(10, 2)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[0, 0] = 1.0
        lin.weight[1, 9] = 2.0
    path = tmp_path / "m.safetensors"
    bs.export.save(nn.Sequential(lin), path)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    head = json.loads(data[8:8 + n])
    inner = fileformat.decode_header(head["__metadata__"]["header"])
    inner["tensors"]["0.weight"]["shape"] = [2, 5]  # now index 19 is out of range
    inner["tree"] = None  # (the module tree would refuse the shape first)
    text = fileformat.encode_header(inner)
    import zlib
    data = _rewrite_metadata(data, header=text, header_crc32=str(zlib.crc32(text.encode())))
    with pytest.raises(CorruptFileError, match=r"'0.weight', field '(index|entries)': .*indices out of range.* \[2, 5\]"):
        _load_bytes(tmp_path, data)


def _craft(tmp_path, mutate, values="float32", model=None):
    """Save a small model, let ``mutate`` edit the inner header, fix the checksum, return the bytes."""
    import zlib
    model = model or nn.Sequential(nn.Linear(4, 2))
    path = tmp_path / "c.safetensors"
    bs.export.save(model, path, values=values)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    inner = fileformat.decode_header(json.loads(data[8:8 + n])["__metadata__"]["header"])
    mutate(inner)
    text = fileformat.encode_header(inner)
    return _rewrite_metadata(data, header=text, header_crc32=str(zlib.crc32(text.encode())))


@pytest.mark.parametrize("mutate,msg", [
    (lambda h: h.__setitem__("streams", ["a"]), "do not match the header"),
    (lambda h: h.__setitem__("crc32", {}), "a version 2 header holds"),
    (lambda h: h.__setitem__("tree", {"type": "Sequential", "children": 5}), "children is not a list"),
    (lambda h: h.__setitem__("tree", {"type": "Unflatten", "kwargs": {"dim": 1, "unflattened_size": 5}}),
     "cannot build Unflatten"),
    (lambda h: h.__setitem__("tree", {"type": "Os", "kwargs": {}}), "unknown module type 'Os'"),
    (lambda h: h["tensors"]["0.weight"].__setitem__("shape", [2 ** 31]), "beyond max_numel"),
    (lambda h: h["tensors"]["0.weight"].__setitem__("dtype", "int8"), "has dtype 'int8'"),
    (lambda h: h["tensors"]["0.weight"].__setitem__("dtype", "__class__"), "has dtype '__class__'"),
    (lambda h: h["tensors"]["0.weight"].__setitem__("value_bits", 64), r"field 'value_bits': 64 is outside \[1, 8\]"),
    (lambda h: h["tensors"]["0.weight"].update(index="rle", index_bits=1), "unknown index encoding"),
    (lambda h: h["tensors"]["0.weight"].__setitem__("entries", 10 ** 9), "field 'entries': 1000000000 is outside"),
    (lambda h: h["tensors"].__setitem__("0.bias", {"kind": "plain", "dtype": "float32"}), "field 'dtype'.*not F32"),
    (lambda h: h["tensors"].pop("0.bias"), "the stored tensor '0.bias' belongs to no entry"),
], ids=["streams-list", "v1-table", "children", "unflatten", "type", "huge", "int8", "dunder", "value-bits", "index",
        "entries", "restore", "missing"])
def test_crafted_headers_with_valid_checksums(tmp_path, mutate, msg):
    values = 4 if "value_bits" in msg else "float32"
    lin = nn.Linear(40, 2)
    with torch.no_grad():
        lin.weight.mul_((torch.rand_like(lin.weight) < 0.05).float())  # sparse: relative indices
    data = _craft(tmp_path, mutate, values=values, model=nn.Sequential(lin))
    p = tmp_path / "bad.safetensors"
    p.write_bytes(data)
    with pytest.raises(CorruptFileError, match=msg):
        bs.export.load(p)


def test_deeply_nested_header_json(tmp_path):
    import zlib
    path = tmp_path / "c.safetensors"
    bs.export.save(nn.Sequential(nn.Linear(4, 2)), path)
    data = path.read_bytes()
    inner = json.dumps({"tensors": {}})
    deep = inner[:-1] + ',"deep":' + "[" * 5000 + "]" * 5000 + "}"  # too deep for Python's json
    import base64
    text = base64.b64encode(zlib.compress(deep.encode())).decode()
    data = _rewrite_metadata(data, header=text, header_crc32=str(zlib.crc32(text.encode())))
    with pytest.raises(CorruptFileError, match="header cannot be decoded: RecursionError"):
        _load_bytes(tmp_path, data)


def test_every_recorded_module_round_trips_with_non_default_arguments(tmp_path):
    net = nn.Sequential(
        nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=False, padding_mode="reflect"),
        nn.BatchNorm2d(4, eps=1e-3, momentum=0.2), nn.ReLU6(), nn.MaxPool2d(2, stride=1, padding=1, dilation=2,
                                                                            ceil_mode=True),
        nn.AvgPool2d(3, stride=1, padding=1, ceil_mode=True, count_include_pad=False, divisor_override=None),
        nn.AdaptiveAvgPool2d((3, 2)), nn.Dropout(0.3), nn.GELU(approximate="tanh"), nn.Flatten(1, -1),
        nn.Unflatten(1, (4, 6)), nn.Conv1d(4, 3, 2), nn.Tanh(), nn.MaxPool1d(2, ceil_mode=True), nn.Flatten(),
        nn.Linear(9, 5), nn.Sigmoid(), nn.Identity(), nn.LogSoftmax(dim=1))
    net.eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
    x = torch.randn(3, 2, 9, 8)
    bs.export.save(net, tmp_path / "all.safetensors")
    back = bs.export.load(tmp_path / "all.safetensors")
    assert [repr(m) for m in back.modules()] == [repr(m) for m in net.modules()]
    assert torch.equal(back(x), net(x))


def test_bfloat16_models_save(tmp_path):
    net = nn.Sequential(nn.Linear(8, 3)).to(torch.bfloat16)
    bs.export.save(net, tmp_path / "b.safetensors")
    back = bs.export.load(tmp_path / "b.safetensors")
    assert back[0].weight.dtype == torch.bfloat16 and torch.equal(back[0].weight, net[0].weight)


@pytest.mark.parametrize("values", ["float32", 4])
def test_an_all_zero_weight_saves_and_loads(tmp_path, values):
    net = nn.Sequential(nn.Linear(6, 3), nn.Linear(3, 300))  # a layer pruned away entirely, small and large
    with torch.no_grad():
        net[0].weight.zero_()
        net[1].weight.zero_()
    bs.export.save(net, tmp_path / "z.safetensors", values=values)
    back = bs.export.load(tmp_path / "z.safetensors")
    assert not back[0].weight.any() and not back[1].weight.any()
    assert back[0].weight.shape == (3, 6) and back[1].weight.shape == (300, 3)


def test_describe_file_lists_each_tensor_from_the_headers(tmp_path):
    net = bs.sparsify(nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 3)), method="magnitude")
    bs.threshold_(net, sparsity=0.75)
    path = tmp_path / "m.safetensors"
    saved = bs.export.save(net, path)
    rep = bs.export.describe_file(path)
    assert rep.total_bytes == saved.total_bytes == path.stat().st_size
    assert set(rep.layers) == set(saved.layers) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for key, row in saved.layers.items():
        assert {k: rep.layers[key][k] for k in row} == row  # what save reported, read back from the headers
    assert (rep.layers["0.weight"]["nnz"], rep.layers["0.weight"]["numel"]) == (40, 160)
    assert rep.layers["0.bias"] == {"shape": [8], "encoding": "plain float32", "bytes": 32}
    text = str(rep)
    assert "0.weight" in text and "40/160" in text and f"{rep.total_bytes:,}" in text


def test_describe_file_refuses_a_damaged_header(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x04\x00")
    with pytest.raises(bs.export.CorruptFileError, match="too short"):
        bs.export.describe_file(path)
