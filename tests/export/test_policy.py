"""Encoding policy: which tensors are stored sparse, how each weight's values and indices are encoded, and
auto bits read from the posterior through ``layer.posterior_std()`` within the tolerance."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import bayes_sparse as bs
from bayes_sparse.export import _bits, _policy, _sparse


@pytest.mark.parametrize("values", ["float32", "float16", "bfloat16", "auto", 1, 4, 8])
def test_check_values_accepts(values):
    _policy.check_values(values)


@pytest.mark.parametrize("values", ["int8", "Float32", 0, 9, -1, 4.0, True, None])
def test_check_values_refuses(values):
    with pytest.raises(ValueError, match=r"values must be one of \['bfloat16', 'float16', 'float32'\], 'auto' or an "
                                         r"int in \[1, 8\]"):
        _policy.check_values(values)


def test_value_bits():
    nz = np.linspace(-1, 1, 50).astype(np.float32)
    assert [_policy.value_bits(v, nz, None, 0.1) for v in ("float32", "float16", "bfloat16", 3, "auto")] == \
        [32, 16, 16, 3, 8]  # auto without a posterior: 8
    assert _policy.value_bits("auto", nz, np.full(50, 10.0, np.float32), 0.1) == 2


def test_sparse_weights_are_linear_and_conv_weights():
    net = nn.Sequential(nn.Conv1d(1, 2, 3), nn.BatchNorm1d(2), nn.Sequential(nn.Linear(4, 4), nn.ReLU()),
                        nn.Conv3d(1, 1, 1), nn.LayerNorm(3))
    assert _policy.sparse_weights(net) == {"0.weight": "0", "2.0.weight": "2.0", "3.weight": "3"}
    assert _policy.sparse_weights(nn.Linear(2, 2)) == {"weight": ""}


@pytest.mark.parametrize("values,dtype", [("float32", torch.float32), ("float16", torch.float16),
                                          ("bfloat16", torch.bfloat16), (4, torch.float16), ("auto", torch.float16)])
def test_plain_tensors(values, dtype):
    bias = torch.tensor([0.1, -2.5, 3.0])
    enc = _policy.encode_plain("b", bias, values)
    assert enc.tensors["b"].dtype == dtype and torch.equal(enc.tensors["b"], bias.to(dtype))
    assert enc.entry == ({"kind": "plain"} if values == "float32" else {"kind": "plain", "dtype": "float32"})
    assert enc.report == {"bytes": 3 * dtype.itemsize, "encoding": f"plain {str(dtype)[6:]}"}
    count = torch.tensor(7, dtype=torch.int64)  # non-float32 tensors are stored as they are in every mode
    enc = _policy.encode_plain("n", count, values)
    assert enc.entry == {"kind": "plain"} and enc.tensors["n"] is count


def _masked(numel, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=g) * (torch.rand(numel, generator=g) < density)


def _decode(enc, key="w"):
    entry = json.loads(json.dumps(enc.entry))
    return _sparse.decode(key, entry, enc.tensors, [10 ** 9])


def test_a_dense_ish_mask_gets_a_bitmask_and_a_very_sparse_one_relative_indices():
    dense_ish = _masked(4096, 0.5).reshape(64, 64)
    sparse = _masked(4096, 0.01).reshape(64, 64)
    for values in ("float32", "float16", 4):
        a = _policy.encode_weight("w", dense_ish, values, None, 0.1)
        b = _policy.encode_weight("w", sparse, values, None, 0.1)
        assert a.entry["index"] == "bitmask" and b.entry["index"] == "relative", values
        assert set(a.tensors) <= {"w::index", "w::values", "w::codebook"}
        for enc, t in ((a, dense_ish), (b, sparse)):
            assert torch.equal(_decode(enc) != 0, t != 0)
            if values == "float32":
                assert torch.equal(_decode(enc), t)


def test_two_far_apart_weights_get_int32_indices():
    t = torch.zeros(1 << 17)
    t[[5, (1 << 17) - 1]] = torch.tensor([0.5, -2.0])
    enc = _policy.encode_weight("w", t, "float32", None, 0.1)
    assert enc.entry["index"] == "int32" and torch.equal(_decode(enc), t)


def _stored_bytes(streams):
    return sum(v.numel() * v.element_size() for v in streams.values())


@pytest.mark.parametrize("density", [0.002, 0.03, 0.15])
@pytest.mark.parametrize("values", ["float32", 4])
def test_the_smaller_candidate_wins_and_the_report_counts_its_bytes(density, values):
    t = _masked(20000, density, seed=3).reshape(100, 200)
    enc = _policy.encode_weight("w", t, values, None, 0.1)
    flat = t.reshape(-1)
    positions = torch.nonzero(flat).reshape(-1).numpy()
    nz = flat[positions].numpy()
    book, codes = (None, None) if values == "float32" else _bits.kmeans_codebook(nz, 15)
    bits_v = 32 if values == "float32" else 4
    kind, bits_i, _ = _bits.choose_index_encoding(positions, flat.numel(), bits_v)
    nz_t, stored = torch.from_numpy(nz), "float32" if values == "float32" else values
    sizes = [_stored_bytes(_sparse.encode(t, positions, nz_t, stored, book, codes, kind, bits_i, bits_v)[1])]
    if kind != "bitmask":
        sizes.append(_stored_bytes(_sparse.encode(t, positions, nz_t, stored, book, codes, "relative", 8,
                                                  8 if book is not None else bits_v)[1]))
    assert enc.report["bytes"] == _stored_bytes(enc.tensors) == min(sizes)
    assert enc.report["nnz"] == positions.size and enc.report["numel"] == 20000
    assert enc.report["encoding"].startswith(f"{enc.entry['index']}{enc.entry['index_bits']} + ")
    assert ("float32" if values == "float32" else "4-bit codebook") in enc.report["encoding"]


def _rms(x):
    return float(np.sqrt(np.mean(np.asarray(x, np.float64) ** 2)))


@pytest.mark.parametrize("tolerance", [0.02, 0.1, 0.3, 1.0])
def test_auto_bits_is_the_smallest_width_within_the_tolerance(tolerance):
    rng = np.random.default_rng(0)
    values = rng.normal(0, 1, 500).astype(np.float32)
    std = np.abs(rng.normal(0, 0.3, 500)).astype(np.float32)
    bits = _policy.auto_bits(values, std, tolerance)
    budget = tolerance * _rms(std)

    def error(b):
        book, codes = _bits.kmeans_codebook(values, 2 ** b - 1)
        return _rms(book[codes] - values)

    assert 2 <= bits <= 8
    assert error(bits) <= budget or bits == 8
    assert all(error(b) > budget for b in range(2, bits))


def test_auto_bits_is_monotone_and_exact_for_few_distinct_values():
    rng = np.random.default_rng(1)
    values = rng.normal(0, 1, 300).astype(np.float32)
    std = np.full(300, 0.2, np.float32)
    widths = [_policy.auto_bits(values, std, tol) for tol in (0.01, 0.05, 0.2, 1.0, 5.0)]
    assert widths == sorted(widths, reverse=True)
    assert _policy.auto_bits(np.array([1.0, -1.0, 0.5] * 10, np.float32), np.zeros(30, np.float32), 0.1) == 2


def _vd_net():
    torch.manual_seed(0)
    net = bs.sparsify(nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 5)), method="vd")
    with torch.no_grad():
        for m in (net[0], net[2]):
            m.log_sigma2.uniform_(-12, 4)
    bs.threshold_(net)
    return net


def test_posterior_stds_come_from_the_layers_protocol():
    net = _vd_net()
    stds = _policy.posterior_stds(net)
    assert set(stds) == {"0", "2"}
    assert all(torch.equal(stds[n], net.get_submodule(n).posterior_std()) for n in stds)
    mag = bs.sparsify(nn.Sequential(nn.Linear(4, 3)), method="magnitude")
    assert _policy.posterior_stds(mag) == {"0": None}


def test_auto_reads_the_posterior_through_posterior_std_only(tmp_path, monkeypatch):
    """A layer whose posterior_std() says "very uncertain" gets 2 bits, "certain" 8, "no posterior" 8."""
    net = _vd_net()
    shape = net[0].weight.shape
    for std, bits in ((lambda: torch.full(shape, 100.0), 2), (lambda: torch.full(shape, 1e-9), 8), (lambda: None, 8)):
        monkeypatch.setattr(net[0], "posterior_std", std)
        rep = bs.export.save(net, tmp_path / "m.safetensors", values="auto")
        assert rep.layers["0.weight"]["encoding"].split(" + ")[1].startswith(f"{bits}-bit codebook")


def test_encode_weight_takes_a_posterior_that_requires_grad():
    t = _masked(200, 0.3).reshape(10, 20)
    std = torch.full((10, 20), 50.0, requires_grad=True) * 1.0  # .numpy() refuses it without detach()
    enc = _policy.encode_weight("w", t, "auto", std, 0.1)
    assert enc.report["encoding"].split(" + ")[1].startswith("2-bit codebook")


# ----- codec effort --------------------------------------------------------------------------------
@pytest.mark.parametrize("effort", ["auto", "fast", "best"])
def test_check_effort_accepts(effort):
    _policy.check_effort(effort)


@pytest.mark.parametrize("effort", ["Fast", "max", "", None, 1])
def test_check_effort_refuses(effort):
    with pytest.raises(ValueError, match=r"effort must be one of \('auto', 'fast', 'best'\)"):
        _policy.check_effort(effort)


def test_auto_effort_is_best_for_small_models_and_fast_for_large_ones():
    n = _policy.AUTO_BEST_NNZ
    assert [_policy.resolve_effort("auto", k) for k in (0, n, n + 1)] == ["best", "best", "fast"]
    assert [_policy.resolve_effort(e, 10 * n) for e in ("fast", "best")] == ["fast", "best"]
    assert [_policy.resolve_effort(e, 0) for e in ("fast", "best")] == ["fast", "best"]


@pytest.mark.parametrize("values", ["float32", "float16", 4])
@pytest.mark.parametrize("density", [0.002, 0.03, 0.3])
def test_fast_effort_round_trips_and_best_is_never_larger(values, density):
    t = _masked(20000, density, seed=5).reshape(100, 200)
    fast = _policy.encode_weight("w", t, values, None, 0.1, effort="fast")
    best = _policy.encode_weight("w", t, values, None, 0.1, effort="best")
    assert best.report["bytes"] <= fast.report["bytes"]
    assert all(c["codec"] == "zlib" for c in fast.entry.get("codecs", {}).values())
    assert torch.equal(_decode(fast), _decode(best))
    assert torch.equal(_decode(fast) != 0, t != 0)
    if values == "float32":
        assert torch.equal(_decode(fast), t)
