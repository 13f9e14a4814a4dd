"""Files written by earlier versions load to exactly the numbers they loaded to when they were written.

The fixtures (``tests/export/fixtures``, made by ``make_fixtures.py`` at the commit it names) cover a
thresholded Sparse VD ``nn.Sequential`` saved lossless, float16, with a 4-bit codebook and with auto bits,
and a plain Linear whose two non-zeros are stored with int32 indices; together they use the bitmask,
relative and int32 index encodings, zlib/lzma-compressed streams and a recorded module tree.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import bayes_sparse as bs

FIXTURES = Path(__file__).resolve().parent / "fixtures"
NAMES = sorted(p.name[: -len(".safetensors")] for p in FIXTURES.glob("*.safetensors") if ".expected." not in p.name)


def _expected(name: str) -> dict[str, torch.Tensor]:
    """The stored numbers; a ``K::shape``/``K::positions``/``K::values`` triple is a large sparse tensor."""
    stored = load_file(str(FIXTURES / f"{name}.expected.safetensors"))
    out = {k: v for k, v in stored.items() if "::" not in k}
    for key in {k.split("::")[0] for k in stored if "::" in k}:
        values = stored[f"{key}::values"]
        flat = torch.zeros(int(torch.prod(stored[f"{key}::shape"])), dtype=values.dtype)
        flat[stored[f"{key}::positions"]] = values
        out[key] = flat.reshape(stored[f"{key}::shape"].tolist())
    return out


def _assert_exact(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k


def test_the_fixtures_are_there():
    assert NAMES == ["int32_linear", "vd_seq_auto", "vd_seq_codebook4", "vd_seq_float16", "vd_seq_float32"]


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_reads_the_stored_numbers(name):
    _assert_exact(bs.export.load_state_dict(FIXTURES / f"{name}.safetensors"), _expected(name))


@pytest.mark.parametrize("name", NAMES)
def test_load_rebuilds_the_recorded_tree_with_the_stored_numbers(name):
    model = bs.export.load(FIXTURES / f"{name}.safetensors")
    assert not model.training
    _assert_exact(model.state_dict(), _expected(name))
    if name.startswith("vd_seq"):
        assert [type(m) for m in model] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Flatten,
                                            nn.Linear, nn.ReLU, nn.Linear]
        assert model(torch.rand(2, 1, 6, 6)).shape == (2, 10)
