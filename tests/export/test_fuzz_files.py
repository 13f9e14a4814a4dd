"""A seeded slice of ``benchmarks/fuzz_files.py``: damaged and crafted files (checksums recomputed), huge
declared sizes, hostile module trees and special paths must load exactly (or, for a consistent edit of a
field that alone declares a tensor's shape or dtype, load that declaration faithfully) or raise
CorruptFileError, each within a second. The full run (20,000+ cases, each in a worker subprocess under a
memory limit and a timeout) writes ``benchmarks/results/fuzz_files.json``."""

import importlib.util
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz_files.py"


@pytest.fixture(scope="module")
def fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_files", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_files"] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("fuzz_files", None)


def test_a_seeded_slice_of_the_fuzzer(tmp_path, fuzz):
    bases = fuzz.make_bases(tmp_path)  # also checks that the lossless ones load bit for bit
    kinds, failures, slow = Counter(), [], []

    def report(i, outcome, detail, seconds):
        kinds[detail.split()[1].split("_")[0]] += 1
        if outcome in fuzz.FAILURES:
            failures.append((i, outcome, detail))
        if seconds > 1.0:
            slow.append((i, seconds, detail))

    t0 = time.perf_counter()
    counts = fuzz.run_cases(2024, range(800), bases, tmp_path, report)
    assert not failures, failures[:5]
    assert not slow, slow[:5]
    assert sum(counts.values()) == 800 and counts["clean_error"] > 600 and counts["exact_load"] > 10, counts
    # damage, crafted single-field edits, the crafted files, huge sizes and hostile trees, special paths
    assert {"damage", "crafted", "targeted", "huge", "hostile", "special"} <= set(kinds), kinds
    assert time.perf_counter() - t0 < 30


def test_the_oracle_catches_a_silent_wrong_load(tmp_path, fuzz, monkeypatch):
    # the slice is only as good as its oracle: a reader that ignores a declared dtype must be caught
    import torch

    from bayes_sparse.export import _container

    bases = fuzz.make_bases(tmp_path)
    refs = fuzz.references(bases)
    real = _container._decode

    def wrong(path, header, plans, tensors):
        out = real(path, header, plans, tensors)
        return {k: v + 1 if v.is_floating_point() else v for k, v in out.items()}
    monkeypatch.setattr(_container, "_decode", wrong)
    name = "seq_float32_best"
    case = fuzz.Case("none", bases[name].read_bytes())
    assert fuzz.judge(case, fuzz.materialize(case, tmp_path), refs[name], use_tree=False)[0] == "silent_wrong"
    monkeypatch.setattr(_container, "_decode", real)
    assert fuzz.judge(case, fuzz.materialize(case, tmp_path), refs[name], use_tree=True)[0] == "exact_load"
    assert torch.is_tensor(refs[name]["0.weight"]) and refs[name]["__repr__"].startswith("Sequential(")
