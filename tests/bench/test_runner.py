"""End to end on the synthetic tiny net: bench with jobs=2, a simulated kill, resume with jobs=1, report, inspect."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bayes_sparse import cli
from bayes_sparse.bench import ResultsFile, parse_config, run_bench
from bayes_sparse.bench.runner import check_device

RAW = {"name": "tiny", "recipe": {"epochs": 1, "batch_size": 100, "lr": 1e-2, "latency_rounds": 1},
       "grid": {"nets": ["mlp_tiny"], "seeds": [0, 1]},
       "methods": {"vd": {"strength": "threshold", "values": [3.0]},
                   "magnitude": {"strength": "target_sparsity", "values": [0.5]}}}
KEYS = {"mlp_tiny/vd/threshold=3/seed=0", "mlp_tiny/vd/threshold=3/seed=1",
        "mlp_tiny/magnitude/target_sparsity=0.5/seed=0", "mlp_tiny/magnitude/target_sparsity=0.5/seed=1"}


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = run_bench(parse_config(RAW), out, jobs=2, progress=False)
    assert set(result.ran) == KEYS and result.skipped == []
    return out


def lines(out):
    return (out / "results.jsonl").read_text().splitlines()


def test_every_run_recorded_with_its_metrics(bench_dir):
    rows = [json.loads(x) for x in lines(bench_dir)]
    assert {r["key"] for r in rows} == KEYS
    config = parse_config(RAW)
    for r in rows:
        assert r["config_hash"] == config.hash
        assert 0 <= r["val_error"] <= 1 and 0 <= r["test_error"] <= 1
        assert [layer["name"] for layer in r["layers"]] == ["0", "2"]
        assert r["units_kept"] == [layer["units_kept"] for layer in r["layers"]]
        assert Path(r["model_path"]).is_file() and r["model_bytes"] == Path(r["model_path"]).stat().st_size
        assert set(r["latency"]) == {"batch1", "batch64"} and r["speedup_batch1"] > 0
        assert r["threads"] == 1 and r["train_seconds"] > 0
        kept = sum(layer["nonzero"] for layer in r["layers"])
        assert r["compression"] == pytest.approx(r["weights"] / kept)
        # MACs: a Linear layer uses each weight once per example
        assert r["macs"]["kept"] == kept and r["flop_reduction"] == pytest.approx(r["compression"])
        if r["method"] == "magnitude":
            assert r["compression"] == pytest.approx(2.0) and r["log_alpha_hist"] is None
        else:
            assert sum(r["log_alpha_hist"]["counts"]) == r["weights"]


def test_refuses_to_rerun_without_resume_and_another_config(bench_dir):
    with pytest.raises(ValueError, match=r"already holds 4 finished run\(s\) of this config; pass --resume"):
        run_bench(parse_config(RAW), bench_dir, progress=False)
    other = dict(RAW, recipe=dict(RAW["recipe"], epochs=2))
    with pytest.raises(ValueError, match=r"holds results of another config .*config 'tiny'.* Write to another folder"):
        run_bench(parse_config(other), bench_dir, resume=True, progress=False)


def test_resume_after_a_kill_runs_only_the_missing_run(bench_dir, tmp_path):
    out = tmp_path / "killed"
    out.mkdir()
    before = lines(bench_dir)
    # the process was killed while writing the fourth result: half a line, no newline
    (out / "results.jsonl").write_text("\n".join(before[:3]) + "\n" + before[3][: len(before[3]) // 2])
    with pytest.warns(UserWarning, match=r"line 4 is truncated or corrupt .* ignored.*\(3 earlier lines kept\)"):
        result = run_bench(parse_config(RAW), out, jobs=1, resume=True, progress=False)
    lost = json.loads(before[3])["key"]
    assert result.ran == [lost] and len(result.skipped) == 3
    after = lines(out)
    assert after[:3] == before[:3] and len(after) == 4  # earlier lines kept byte for byte, the tail repaired
    assert json.loads(after[3])["key"] == lost
    again = run_bench(parse_config(RAW), out, resume=True, progress=False)  # nothing left to run
    assert again.ran == [] and len(again.skipped) == 4


def test_results_file_tail_repair_and_refusals(tmp_path):
    path = tmp_path / "r.jsonl"
    good = json.dumps({"key": "a", "config_hash": "h"})
    path.write_text(good + "\n{\"key\": \"b\", \"conf")
    f = ResultsFile(path, "h")
    with pytest.warns(UserWarning, match="line 2 is truncated"):
        assert [r["key"] for r in f.read()] == ["a"]
    f.append({"key": "c", "config_hash": "h"})
    assert path.read_text() == good + "\n" + json.dumps({"key": "c", "config_hash": "h"}) + "\n"
    path.write_text(good + "\nnot json\n" + good + "\n")
    with pytest.raises(ValueError, match="line 2 is corrupt and is not the last line"):
        ResultsFile(path, "h").read()
    path.write_text(good)  # a complete last record without its newline
    f = ResultsFile(path, "h")
    assert len(f.read()) == 1
    f.append({"key": "d", "config_hash": "h"})
    assert [json.loads(x)["key"] for x in path.read_text().splitlines()] == ["a", "d"]


def test_report_writes_summary_and_plots(bench_dir, tmp_path, capsys):
    assert cli.main(["report", str(bench_dir / "results.jsonl"), "--out", str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| mlp_tiny | magnitude | target_sparsity=0.5 | 2 |" in summary and "Pareto fronts" in summary
    assert "2.0x ± 0.0" in summary  # magnitude at 50%: exactly 2x in both seeds
    for name in ("mlp_tiny_tradeoff.png", "mlp_tiny_density.png", "mlp_tiny_log_alpha.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out


def test_inspect_prints_the_table_of_a_saved_file(bench_dir, capsys):
    path = json.loads(lines(bench_dir)[0])["model_path"]
    assert cli.main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "0.weight" in out and "2.bias" in out and "encoding" in out and "total (file)" in out


def test_cli_bad_input_is_one_clear_line(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[grid]\nnets = ["mlp_tiny"]\n[methods.vd9]\nstrength = "penalty"\nvalues = [1.0]\n')
    assert cli.main(["bench", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bayes-sparse bench: error: ") and "unknown method 'vd9'" in err and "\n" == err[-1]
    assert err.count("\n") == 1


def test_cuda_refused_clearly_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="--device cuda: torch sees no CUDA device here .* run with --device cpu"):
        check_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        check_device("tpu")


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "bayes_sparse.cli", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "bench" in out.stdout and "report" in out.stdout and "inspect" in out.stdout
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["bayes-sparse"] == "bayes_sparse.cli:main"
