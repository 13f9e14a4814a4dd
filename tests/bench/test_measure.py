"""``bayes-sparse measure``: every saved model timed afterwards into latency.jsonl, resumable, merged by report."""

import json
import os

import pytest

from bayes_sparse import cli
from bayes_sparse.bench import parse_config, run_bench
from bayes_sparse.bench.measure import LATENCY_FILE, measure
from bayes_sparse.bench.report import read_results, write_report
from bayes_sparse.bench.runner import _lock
from bayes_sparse.export import load_state_dict

RAW = {"name": "tiny_measure", "recipe": {"epochs": 1, "batch_size": 100, "lr": 1e-2, "latency_rounds": 0},
       "grid": {"nets": ["mlp_tiny"], "seeds": [0]},
       "methods": {"vd": {"strength": "threshold", "values": [3.0]},
                   "magnitude": {"strength": "target_sparsity", "values": [0.5, 0.95]}}}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("measure")
    run_bench(parse_config(RAW), out, jobs=1, progress=False)
    return out


def test_sweep_without_latency_then_measure_fills_it_in(swept):
    results = swept / "results.jsonl"
    rows = read_results(results)
    assert all(r["latency"] is None and "latency_measured" not in r for r in rows)
    done = measure(results, rounds=1, progress=False)
    assert sorted(done.measured) == sorted(r["key"] for r in rows) and done.skipped == []
    timed = [json.loads(x) for x in (swept / LATENCY_FILE).read_text().splitlines()]
    assert {t["key"] for t in timed} == {r["key"] for r in rows}
    by_key = {t["key"]: t for t in timed}
    for r in rows:
        t = by_key[r["key"]]
        assert t["recipe_hash"] == r["recipe_hash"]
        assert set(t["latency"]) == {"batch1", "batch64"}
        assert t["speedup_batch1"] == pytest.approx(t["latency"]["batch1"]["dense_ms"] / t["latency"]["batch1"]["sparse_ms"])
        removed = any(layer["units_kept"] < layer["units"] for layer in r["layers"][:-1])
        assert ("latency_shrunk" in t) == removed
        if removed:  # the shrunk model keeps the hidden units that are non-zero and read by the classifier
            state = load_state_dict(r["model_path"])
            w1, b1, w2 = state["0.weight"], state["0.bias"], state["2.weight"]
            alive = int((((w1 != 0).any(1) | (b1 != 0)) & (w2 != 0).any(0)).sum())
            assert t["latency_shrunk"]["parameters"] == alive * (w1.shape[1] + 1 + w2.shape[0]) + w2.shape[0]
            assert t["latency_shrunk"]["parameters_dense"] == w1.numel() + b1.numel() + w2.numel() + w2.shape[0]
    assert any("latency_shrunk" in t for t in timed)  # 95% sparsity on the tiny net removes hidden units
    # report merges the lines: the table shows the speedups measured afterwards
    merged = {r["key"]: r for r in read_results(results)}
    assert all(m["latency_measured"] == "afterwards" and m["speedup_batch64"] == by_key[k]["speedup_batch64"]
               for k, m in merged.items())
    summary = write_report(results, swept / "report")["summary"].read_text()
    row = next(line for line in summary.splitlines() if "target_sparsity=0.95" in line).split(" | ")
    assert "shrunk b=1" in summary and all(cell.endswith("x") for cell in row[8:12])  # speedups, shrunk ones too

    # resume: nothing left to time; a truncated last line (killed while writing) is timed again, lines kept
    again = measure(results, rounds=1, progress=False)
    assert again.measured == [] and len(again.skipped) == len(rows)
    text = (swept / LATENCY_FILE).read_text()
    (swept / LATENCY_FILE).write_text(text[:-40])
    with pytest.warns(UserWarning, match="truncated or corrupt"):
        redo = measure(results, rounds=1, progress=False)
    assert redo.measured == [timed[-1]["key"]]
    assert [json.loads(x)["key"] for x in (swept / LATENCY_FILE).read_text().splitlines()] == [t["key"] for t in timed]

    # a run redone since it was timed (another record under the same key) is timed again, never given the old line
    lines = results.read_text().splitlines()
    redone = dict(json.loads(lines[0]), test_error=0.5)
    results.write_text("\n".join([json.dumps(redone)] + lines[1:]) + "\n")
    assert read_results(results)[0].get("latency_measured") is None
    assert measure(results, rounds=1, progress=False).measured == [redone["key"]]
    assert read_results(results)[0]["latency_measured"] == "afterwards"


def test_measure_refuses_missing_files_a_running_sweep_and_bad_rounds(swept, tmp_path):
    results = swept / "results.jsonl"
    with pytest.raises(ValueError, match="rounds must be an int >= 1, got 0"):
        measure(results, rounds=0)
    with _lock(swept):
        with pytest.raises(ValueError, match="a bayes-sparse bench or measure is using .*; time its models after"):
            measure(results, rounds=1, force=True, progress=False)
    # a results file whose model files are gone: the first missing run is named
    moved = tmp_path / "results.jsonl"
    rows = [json.loads(x) for x in results.read_text().splitlines()]
    moved.write_text("".join(json.dumps(dict(r, model_path=str(tmp_path / "gone.safetensors"))) + "\n" for r in rows))
    with pytest.raises(FileNotFoundError, match=f"run '{rows[0]['key']}': its model file .*gone.safetensors is missing"):
        measure(moved, rounds=1, progress=False)
    assert not (tmp_path / LATENCY_FILE).exists()
    assert cli.main(["measure", str(moved)]) == 2
    assert cli.main(["measure", str(swept / "nothing.jsonl")]) == 2


def test_model_path_falls_back_to_the_results_folder(swept, tmp_path):
    """A sweep folder moved elsewhere (the recorded paths are relative to where it ran) still measures."""
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(swept, moved, ignore=shutil.ignore_patterns(LATENCY_FILE, "report"))
    rows = [json.loads(x) for x in (moved / "results.jsonl").read_text().splitlines()]
    (moved / "results.jsonl").write_text("".join(
        json.dumps(dict(r, model_path=os.path.join("elsewhere", "models", os.path.basename(r["model_path"])))) + "\n"
        for r in rows))
    assert len(measure(moved / "results.jsonl", rounds=1, progress=False, shrunk=False).measured) == len(rows)
