"""Byte codecs: every stream comes back byte for byte, the smallest form is kept, and decompression of
untrusted streams never yields more than was announced."""

import lzma
import tracemalloc
import zlib

import numpy as np
import pytest
import torch

from bayes_sparse.export import CorruptFileError, _codecs

_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]  # the format's, spelled out


def _bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _streams(rng):
    """Random and repetitive streams of every stream dtype, and empty ones."""
    out = []
    for dtype in (torch.uint8, torch.int32, torch.float32, torch.float16, torch.bfloat16):
        n = int(rng.integers(1, 3000))
        noise = torch.from_numpy(rng.integers(0, 256, n * 4, dtype=np.uint8)).view(torch.int32).to(dtype)
        out.append(noise[:n].contiguous())
        sparse = torch.zeros(n, dtype=dtype)
        sparse[torch.from_numpy(rng.choice(n, size=max(1, n // 50), replace=False))] = 3
        out.append(sparse)
        out.append(torch.zeros(0, dtype=dtype))
        out.append(torch.from_numpy(np.zeros(0, np.float32)).to(dtype))  # stride 0, as made from numpy
    return out


def test_round_trip_of_random_streams_keeps_the_smallest_form():
    rng = np.random.default_rng(0)
    for stream in _streams(rng):
        raw = _bytes(stream)
        rle = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
        reference = {None: len(raw), "zlib": len(zlib.compress(raw, 9)),  # the settings files were first written with
                     "lzma": len(lzma.compress(raw, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS))}
        for effort, bound in (("best", min(reference.values())), ("fast", min(len(raw), len(rle.compress(raw) + rle.flush())))):
            stored, info = _codecs.compress(stream, effort)
            size = stored.numel() * stored.element_size()
            assert size <= bound if effort == "best" else size == bound  # best: never larger than the reference
            if info is None:  # nothing beat the raw bytes: the stream itself is stored
                assert stored is stream and size == len(raw)
                continue
            assert stored.dtype == torch.uint8 and size < len(raw)
            assert info["raw_bytes"] == len(raw) and info["dtype"] == str(stream.dtype)[6:]
            assert info["codec"] in (("zlib", "lzma") if effort == "best" else ("zlib",))
            back = _codecs.decompress("k", stored, info)
            assert back.dtype == stream.dtype and _bytes(back) == raw


def test_every_setting_tried_decodes_with_its_codecs_decoder():
    rng = np.random.default_rng(2)
    for dtype in (torch.uint8, torch.float16, torch.float32, torch.int32):
        stream = (torch.from_numpy(rng.standard_normal(3000).astype(np.float32)) * 5).to(dtype)
        raw = _bytes(stream)
        for effort in _codecs.EFFORTS:
            for name, fn in _codecs._candidates(effort, stream.element_size()):
                back = _codecs.decompress("k", _stored(fn(raw)), {"codec": name, "raw_bytes": len(raw),
                                                                   "dtype": str(dtype)[6:]})
                assert _bytes(back) == raw, (effort, name, dtype)


def test_float32_values_get_the_aligned_lzma_setting():
    # the sign/exponent byte of each float32 is predictable from its place in the element: lzma with lp=pb=2
    values = torch.from_numpy(np.random.default_rng(3).standard_normal(20000).astype(np.float32)) * 0.05
    raw = _bytes(values)
    stored, info = _codecs.compress(values)
    assert info["codec"] == "lzma"
    assert stored.numel() < len(lzma.compress(raw, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS))
    assert _bytes(_codecs.decompress("k", stored, info)) == raw


def test_unknown_effort():
    with pytest.raises(ValueError, match="effort must be one of"):
        _codecs.compress(torch.zeros(3), "hard")


def test_incompressible_and_repetitive_streams():
    noise = torch.from_numpy(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8))
    assert _codecs.compress(noise)[1] is None
    stored, info = _codecs.compress(torch.zeros(4096, dtype=torch.int32))
    assert info["raw_bytes"] == 16384 and stored.numel() < 100


def test_streams_written_with_the_reference_settings_decode():
    # files written before the codecs sized lzma's dictionary to the stream used preset 9 extreme as it is
    raw = _bytes(torch.arange(5000, dtype=torch.int32) % 11)
    for codec, packed in (("zlib", zlib.compress(raw, 9)),
                          ("lzma", lzma.compress(raw, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS))):
        back = _codecs.decompress("k", _stored(packed), {"codec": codec, "raw_bytes": len(raw), "dtype": "int32"})
        assert _bytes(back) == raw


@pytest.mark.parametrize("codec", ["zlib", "lzma"])
def test_each_codec_decodes_its_own_output(codec):
    stream = torch.arange(1000, dtype=torch.int32) % 7
    raw = _bytes(stream)
    packed = _codecs.CODECS[codec](raw)
    back = _codecs.decompress("k", torch.frombuffer(bytearray(packed), dtype=torch.uint8),
                              {"codec": codec, "raw_bytes": len(raw), "dtype": "int32"})
    assert torch.equal(back, stream)


def _stored(payload):
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8)


@pytest.mark.parametrize("info,msg", [
    ({"codec": "gzip", "raw_bytes": 8, "dtype": "uint8"}, "unknown codec 'gzip'"),
    ({"codec": "zlib", "raw_bytes": 8, "dtype": "int64"}, "dtype 'int64'"),
    ({"codec": "zlib", "raw_bytes": -1, "dtype": "uint8"}, "unknown codec"),
], ids=["codec", "dtype", "negative"])
def test_refuses_unknown_codecs_dtypes_and_sizes(info, msg):
    with pytest.raises(CorruptFileError, match=msg):
        _codecs.decompress("k", _stored(zlib.compress(b"\1" * 8)), info)


@pytest.mark.parametrize("codec", ["zlib", "lzma"])
def test_a_stream_longer_than_announced_is_refused_after_the_announced_length(codec):
    packed = _codecs.CODECS[codec](bytes(range(8)))
    with pytest.raises(CorruptFileError, match="decompresses to more than the 5 bytes"):
        _codecs.decompress("k", _stored(packed), {"codec": codec, "raw_bytes": 5, "dtype": "uint8"})
    reader = _codecs.StreamReader("k", _stored(packed), {"codec": codec}, 5)
    assert reader.range(0, 5).tolist() == [0, 1, 2, 3, 4]  # never more than announced
    with pytest.raises(CorruptFileError, match="more than the 5 bytes"):
        reader.finish()


@pytest.mark.parametrize("codec", ["zlib", "lzma"])
def test_trailing_bytes_after_the_compressed_data_are_refused(codec):
    packed = _codecs.CODECS[codec](bytes(range(8))) + b"\0junk"
    with pytest.raises(CorruptFileError, match="other bytes follow|does not decompress"):
        _codecs.decompress("k", _stored(packed), {"codec": codec, "raw_bytes": 8, "dtype": "uint8"})


@pytest.mark.parametrize("codec", ["zlib", "lzma"])
@pytest.mark.parametrize("feed", [1, 7, 1 << 20])
def test_the_stream_reader_reads_forward_in_any_ranges(codec, feed, monkeypatch):
    monkeypatch.setattr(_codecs, "_FEED", feed)  # compressed bytes handed over at a time
    raw = np.random.default_rng(0).integers(0, 4, 50000, dtype=np.uint8).tobytes()
    packed = _stored(_codecs.CODECS[codec](raw))
    reader = _codecs.StreamReader("k", packed, {"codec": codec}, len(raw))
    bounds = [0, 1, 1, 999, 998, 20000, 20000, 49999, 50000]  # overlapping by a byte, empty, to the end
    for b0, b1 in zip(bounds[::2], bounds[1::2]):
        assert reader.range(b0, b1).tobytes() == raw[b0:b1]
    reader.finish()
    with pytest.raises(ValueError, match="read forward"):
        reader.range(0, 1)


@pytest.mark.parametrize("codec", ["zlib", "lzma"])
def test_refuses_garbage_and_wrong_lengths(codec):
    raw = bytes(range(64)) * 4
    packed = _codecs.CODECS[codec](raw)
    with pytest.raises(CorruptFileError, match="does not decompress|decompresses to"):
        _codecs.decompress("k", _stored(b"\xff\x00garbage" * 3), {"codec": codec, "raw_bytes": 10, "dtype": "uint8"})
    with pytest.raises(CorruptFileError, match=r"decompresses to 256 bytes, the header says 300"):
        _codecs.decompress("k", _stored(packed), {"codec": codec, "raw_bytes": 300, "dtype": "uint8"})
    with pytest.raises(CorruptFileError, match="no whole number of int32"):
        _codecs.decompress("k", _stored(packed), {"codec": codec, "raw_bytes": 6, "dtype": "int32"})
    with pytest.raises(CorruptFileError, match="does not decompress|decompresses to"):  # truncated stream
        _codecs.decompress("k", _stored(packed[: len(packed) // 2]), {"codec": codec, "raw_bytes": 256,
                                                                      "dtype": "uint8"})


_BOMBS = {"zlib": lambda b: zlib.compress(b, 1),  # any stream of the format's codecs, made fast
          "lzma": lambda b: lzma.compress(b, format=lzma.FORMAT_RAW,
                                          filters=[{"id": lzma.FILTER_LZMA2, "preset": 0}])}


@pytest.mark.parametrize("codec", ["zlib", "lzma"])
@pytest.mark.parametrize("announced", [0, 1, 1000])
def test_a_bomb_is_refused_after_no_more_than_announced(codec, announced):
    bomb = _stored(_BOMBS[codec](b"\0" * (32 << 20)))  # 32 MiB of zeros in a few kB
    info = {"codec": codec, "raw_bytes": announced, "dtype": "uint8"}
    tracemalloc.start()
    try:
        with pytest.raises(CorruptFileError, match="more than the"):
            _codecs.decompress("k", bomb, info)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated to decompress {announced}"


def test_lzmas_dictionary_is_no_larger_than_the_stream():
    # a 64 MiB dictionary (the writer's setting for large streams) would cost 64 MiB for any stream
    import resource

    raw = bytes(range(256)) * 16
    packed = _stored(lzma.compress(raw, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):
        assert _codecs.decompress("k", packed, {"codec": "lzma", "raw_bytes": len(raw), "dtype": "uint8"}).numel()
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 32 << 10


def test_malformed_info_is_left_to_the_caller():
    # the container turns these into CorruptFileError("... cannot be decoded: KeyError ...")
    with pytest.raises(KeyError):
        _codecs.decompress("k", _stored(b"x"), {"codec": "zlib"})
    with pytest.raises(ValueError):
        _codecs.decompress("k", _stored(b"x"), {"codec": "zlib", "raw_bytes": "many", "dtype": "uint8"})
