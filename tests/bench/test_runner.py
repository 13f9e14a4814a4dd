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
    with pytest.raises(ValueError, match=r"line 1 .* was trained with another recipe .*'epochs': 1.* Write to "
                                         r"another folder"):
        run_bench(parse_config(other), bench_dir, resume=True, progress=False)
    options = dict(RAW, methods=dict(RAW["methods"], magnitude=dict(RAW["methods"]["magnitude"],
                                                                    options={"scope": "global"})))
    with pytest.raises(ValueError, match=r"is a run of method 'magnitude' with other options or threshold choice"):
        run_bench(parse_config(options), bench_dir, resume=True, progress=False)


def test_a_grid_that_grows_or_changes_its_values_resumes_into_the_same_file(bench_dir, tmp_path):
    """A run's hash covers the recipe and its method's options, not the grid's values, seeds or other methods:
    a config that changes magnitude's values and adds L1 keeps the finished runs and runs only the new ones."""
    import shutil

    out = tmp_path / "grown"
    shutil.copytree(bench_dir, out, ignore=shutil.ignore_patterns(".bench.lock"))
    grown = dict(RAW, grid={"nets": ["mlp_tiny"], "seeds": [0]},
                 methods=dict(RAW["methods"], magnitude={"strength": "target_sparsity", "values": [0.5, 0.7]},
                              l1={"strength": "penalty", "values": [1.0]}))
    config = parse_config(grown)
    assert config.hash != parse_config(RAW).hash and config.run_hash("vd") == parse_config(RAW).run_hash("vd")
    result = run_bench(config, out, resume=True, progress=False)
    assert sorted(result.ran) == ["mlp_tiny/l1/penalty=1/seed=0", "mlp_tiny/magnitude/target_sparsity=0.7/seed=0"]
    assert sorted(result.skipped) == ["mlp_tiny/magnitude/target_sparsity=0.5/seed=0", "mlp_tiny/vd/threshold=3/seed=0"]
    rows = [json.loads(x) for x in lines(out)]
    assert len(rows) == 6  # the runs of seed 1, no longer in the grid, stay in the file
    assert all(r["run_hash"] == config.run_hash(r["method"]) and r["recipe_hash"] == config.recipe_hash for r in rows)


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
    for name in ("mlp_tiny_tradeoff.png", "mlp_tiny_density.png", "mlp_tiny_log_alpha.png", "mlp_tiny_speedup.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out


def test_report_puts_table_budget_and_plot_into_the_readme_block(bench_dir, tmp_path, capsys):
    rows = [json.loads(x) for x in lines(bench_dir)]
    name = rows[0]["config_name"]
    readme = tmp_path / "README.md"
    readme.write_text(f"# Project\n\n<!-- bench:{name}:start -->\nold table\n<!-- bench:{name}:end -->\ntail\n")
    out = tmp_path / "report"
    assert cli.main(["report", str(bench_dir / "results.jsonl"), "--out", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# Project") and text.endswith("tail\n")
    block = text.split(f"<!-- bench:{name}:start -->")[1].split(f"<!-- bench:{name}:end -->")[0]
    epochs = rows[0]["recipe"]["epochs"]
    assert f"{epochs} epochs" in block and "2 seeds: 0, 1" in block
    table = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("|")]
    assert all(line in block for line in table)
    assert "![error vs compression](report/mlp_tiny_tradeoff.png)" in block
    bare = tmp_path / "BARE.md"
    bare.write_text("no markers\n")
    assert cli.main(["report", str(bench_dir / "results.jsonl"), "--out", str(out), "--readme", str(bare)]) == 2
    assert f"<!-- bench:{name}:start -->" in capsys.readouterr().err and bare.read_text() == "no markers\n"


def test_report_flags_strengths_the_config_no_longer_sweeps_and_rows_with_fewer_seeds(bench_dir, tmp_path):
    folder = tmp_path / "old_grid"
    folder.mkdir()
    rows = [json.loads(x) for x in lines(bench_dir)]
    # one vd run lost (a part not yet run), and the config's grid since changed magnitude's value 0.5 -> 0.9
    kept = [r for r in rows if r["key"] != "mlp_tiny/vd/threshold=3/seed=1"]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    config = json.loads((bench_dir / "config.json").read_text())
    config["methods"]["magnitude"]["values"] = [0.9]
    (folder / "config.json").write_text(json.dumps(config))
    readme = tmp_path / "README.md"
    name = rows[0]["config_name"]
    readme.write_text(f"<!-- bench:{name}:start -->\n<!-- bench:{name}:end -->\n")
    assert cli.main(["report", str(folder / "results.jsonl"), "--readme", str(readme)]) == 0
    table = [line for line in (folder / "summary.md").read_text().splitlines() if line.startswith("| mlp_tiny")]
    by_method = {line.split("|")[2].strip(): line for line in table}
    assert "target_sparsity=0.5 †" in by_method["magnitude"] and "threshold=3 |" in by_method["vd"]
    assert [cell.strip() for cell in by_method["vd"].split("|")][4] == "1"
    block = readme.read_text()
    assert "† a strength the config no longer sweeps" in block
    assert "2 seeds: 0, 1; rows with fewer seeds (1) say so in the seeds column" in block
    # without a config.json (results from elsewhere) nothing is flagged
    (folder / "config.json").unlink()
    assert cli.main(["report", str(folder / "results.jsonl")]) == 0
    assert "†" not in (folder / "summary.md").read_text()


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


# ----- post-hoc strengths: one training serves every value -------------------------------------------
POSTHOC = {"name": "posthoc", "recipe": {"epochs": 2, "batch_size": 100, "lr": 1e-2, "latency_rounds": 1,
                                         "warmup": [0.0, 0.0]},
           "grid": {"nets": ["mlp_tiny"], "seeds": [0]},
           "methods": {"vd": {"strength": "threshold", "values": [0.0, 2.0, 5.0]}}}
TRAINING = "mlp_tiny/vd/threshold=*/seed=0"
#: The fields of a record that follow from the threshold (or from when it was written); every other one is the
#: shared training's.
PER_VALUE = {"key", "value", "threshold", "val_error", "test_error", "compression", "nonzero", "layers", "units_kept",
             "macs", "flop_reduction", "latency", "speedup_batch1", "speedup_batch64", "finetune_seconds",
             "posthoc_seconds", "wall_seconds", "model_path", "model_bytes", "warnings", "finished_at"}


@pytest.fixture(scope="module")
def posthoc_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("posthoc")
    result = run_bench(parse_config(POSTHOC), out, jobs=1, progress=False)
    assert result.trainings == [TRAINING]  # one process, one training
    assert result.ran == [f"mlp_tiny/vd/threshold={v:g}/seed=0" for v in (0.0, 2.0, 5.0)]
    return out


def test_trainings_of_a_config():
    c = parse_config(dict(POSTHOC, methods={**POSTHOC["methods"], "l0": {"strength": "penalty", "values": [0.1, 1]}},
                          grid={"nets": ["mlp_tiny"], "seeds": [0, 1]}))
    assert [(t.key, t.values) for t in c.trainings()] == [
        ("mlp_tiny/vd/threshold=*/seed=0", (0.0, 2.0, 5.0)), ("mlp_tiny/vd/threshold=*/seed=1", (0.0, 2.0, 5.0)),
        ("mlp_tiny/l0/penalty=0.1/seed=0", (0.1,)), ("mlp_tiny/l0/penalty=0.1/seed=1", (0.1,)),
        ("mlp_tiny/l0/penalty=1/seed=0", (1.0,)), ("mlp_tiny/l0/penalty=1/seed=1", (1.0,))]
    assert sorted(r.key for t in c.trainings() for r in t.runs()) == sorted(r.key for r in c.runs())
    assert [t.key for t in c.trainings(only=["l0"], seeds=[1])] == ["mlp_tiny/l0/penalty=0.1/seed=1",
                                                                      "mlp_tiny/l0/penalty=1/seed=1"]
    with pytest.raises(ValueError, match=r"method 'l1' is not in config 'posthoc'; its methods: vd, l0"):
        c.trainings(only=["l1"])
    with pytest.raises(ValueError, match=r"seed 7 is not in config 'posthoc'; its seeds: 0, 1"):
        c.trainings(seeds=[7])


def test_posthoc_values_share_one_training(posthoc_dir):
    rows = [json.loads(x) for x in lines(posthoc_dir)]
    assert [r["value"] for r in rows] == [0.0, 2.0, 5.0] and {r["training"] for r in rows} == {TRAINING}
    shared = set(rows[0]) - PER_VALUE
    assert {"train_seconds", "log_alpha_hist", "options", "seed", "training", "config_hash"} <= shared
    for r in rows[1:]:
        assert set(r) == set(rows[0]) and {k: r[k] for k in shared} == {k: rows[0][k] for k in shared}
    assert rows[0]["train_seconds"] > 0
    # the thresholds did their work on the same trained weights: a lower log-alpha threshold prunes more
    kept = [r["nonzero"] for r in rows]
    assert kept[0] < kept[1] <= kept[2] and len({r["model_path"] for r in rows}) == 3


def test_posthoc_training_runs_fit_svi_once_and_fine_tunes_copies(tmp_path, monkeypatch):
    from bayes_sparse.bench import runner

    config = parse_config(dict(POSTHOC, recipe=dict(POSTHOC["recipe"], epochs=1, finetune_epochs=1,
                                                    latency_rounds=0)))
    calls = []
    real = runner.fit_svi

    def counting(model, batches, epochs, **kw):
        calls.append((id(model), epochs))
        return real(model, batches, epochs, **kw)

    monkeypatch.setattr(runner, "fit_svi", counting)
    (training,) = config.trainings()
    records = runner.execute(config, training, tmp_path)
    assert [r["value"] for r in records] == [0.0, 2.0, 5.0]
    # one training, then one fine-tuning per value, each on its own copy of the trained model
    assert [e for _, e in calls] == [1, 1, 1, 1] and len({m for m, _ in calls}) == 4
    assert len({r["train_seconds"] for r in records}) == 1
    # a value's record does not depend on the other values computed in the same process
    (alone,) = runner.execute(config, training.only((2.0,)), tmp_path / "alone")
    for k in ("val_error", "test_error", "compression", "layers"):
        assert alone[k] == records[1][k]


def test_resume_redoes_only_the_missing_value(posthoc_dir, tmp_path):
    before = lines(posthoc_dir)
    out = tmp_path / "resume"
    out.mkdir()
    (out / "results.jsonl").write_text(before[0] + "\n" + before[2] + "\n")  # the threshold=2 record is lost
    result = run_bench(parse_config(POSTHOC), out, resume=True, progress=False)
    assert result.ran == ["mlp_tiny/vd/threshold=2/seed=0"] and result.trainings == [TRAINING]
    assert sorted(result.skipped) == ["mlp_tiny/vd/threshold=0/seed=0", "mlp_tiny/vd/threshold=5/seed=0"]
    after = lines(out)
    assert after[:2] == [before[0], before[2]] and len(after) == 3
    redone, lost = json.loads(after[2]), json.loads(before[1])
    assert redone["training"] == TRAINING
    for k in ("val_error", "test_error", "compression", "layers", "log_alpha_hist"):  # same seed, same recipe
        assert redone[k] == lost[k]
    again = run_bench(parse_config(POSTHOC), out, resume=True, progress=False)
    assert again.ran == [] and again.trainings == [] and len(again.skipped) == 3


def test_filters_run_parts_that_add_up_to_the_sweep(tmp_path, capsys):
    raw = {"name": "parts", "recipe": {"epochs": 1, "batch_size": 100, "lr": 1e-2, "latency_rounds": 0},
           "grid": {"nets": ["mlp_tiny"], "seeds": [0, 1]},
           "methods": {"vd": {"strength": "threshold", "values": [2.0, 4.0]},
                       "magnitude": {"strength": "target_sparsity", "values": [0.5]}}}
    config = parse_config(raw)
    out = tmp_path / "o"
    cfg = tmp_path / "parts.toml"
    cfg.write_text('name = "parts"\n[recipe]\nepochs = 1\nbatch_size = 100\nlr = 1e-2\nlatency_rounds = 0\n'
                   '[grid]\nnets = ["mlp_tiny"]\nseeds = [0, 1]\n[methods.vd]\nstrength = "threshold"\n'
                   'values = [2.0, 4.0]\n[methods.magnitude]\nstrength = "target_sparsity"\nvalues = [0.5]\n')
    a = run_bench(config, out, only=["vd"], seeds=[0], progress=False)
    assert a.ran == ["mlp_tiny/vd/threshold=2/seed=0", "mlp_tiny/vd/threshold=4/seed=0"]
    assert a.trainings == ["mlp_tiny/vd/threshold=*/seed=0"]
    # the second part, from the command line, into the same folder (its runs are not in the file: no --resume)
    assert cli.main(["bench", str(cfg), "--out", str(out), "--only", "magnitude,vd", "--seeds", "1",
                     "--no-progress"]) == 0
    assert "3 run(s) done (2 training(s)), 0 already in" in capsys.readouterr().out
    c = run_bench(config, out, only=["magnitude"], seeds=[0], progress=False)
    assert c.ran == ["mlp_tiny/magnitude/target_sparsity=0.5/seed=0"]
    keys = [json.loads(x)["key"] for x in lines(out)]
    assert len(keys) == len(set(keys)) and set(keys) == {r.key for r in config.runs()}
    assert {json.loads(x)["config_hash"] for x in lines(out)} == {config.hash}
    full = run_bench(config, out, resume=True, progress=False)
    assert full.ran == [] and len(full.skipped) == 6
    with pytest.raises(ValueError, match=r"already holds 2 finished run\(s\) of the selected methods/seeds; pass "
                                         r"--resume"):
        run_bench(config, out, only=["vd"], seeds=[1], progress=False)
    assert cli.main(["bench", str(cfg), "--out", str(out), "--only", "l0"]) == 2
    assert "method 'l0' is not in config 'parts'; its methods: vd, magnitude" in capsys.readouterr().err


def test_a_second_sweep_into_the_same_folder_is_refused(tmp_path):
    import fcntl

    with open(tmp_path / ".bench.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match=r"another bayes-sparse bench is writing to .*one after another"):
            run_bench(parse_config(RAW), tmp_path, progress=False)


def test_a_failed_value_keeps_the_other_values_of_its_training(tmp_path, monkeypatch):
    """A post-hoc value whose threshold/export raises is reported as failed; the training's other values keep
    their records (the training is not lost)."""
    from bayes_sparse.bench import runner

    raw = dict(RAW, methods={"vd": {"strength": "threshold", "values": [2.0, 3.0]}}, grid={"nets": ["mlp_tiny"],
                                                                                           "seeds": [0]})
    config = parse_config(raw)
    training = config.trainings()[0]
    real = runner._evaluate

    def flaky(config, run, *args):
        if run.value == 2.0:
            raise RuntimeError("disk full")
        return real(config, run, *args)

    monkeypatch.setattr(runner, "_evaluate", flaky)
    records = runner.execute(config, training, tmp_path)
    assert records[0] == {"key": "mlp_tiny/vd/threshold=2/seed=0", "failed": "RuntimeError: disk full"}
    assert records[1]["key"] == "mlp_tiny/vd/threshold=3/seed=0" and 0 <= records[1]["test_error"] <= 1


def _group_pids(pgid: int) -> set[int]:
    """The processes of process group ``pgid`` (Linux /proc), zombies excluded."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.add(int(stat.parent.name))
    return pids


def _with_torch_loaded(pids: set[int]) -> set[int]:
    """The processes among ``pids`` that have libtorch mapped (Linux /proc)."""
    loaded = set()
    for pid in pids:
        try:
            if "libtorch" in Path(f"/proc/{pid}/maps").read_text():
                loaded.add(pid)
        except OSError:
            continue
    return loaded


def _wait_for(predicate, timeout: float) -> bool:
    import time
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


_ORPHAN_DRIVER = """
import multiprocessing, os, sys, time
from pathlib import Path


def child(before, ready):
    time.sleep(before)  # still starting up (importing torch, say) when the sweep is killed, or not
    from bayes_sparse.bench.runner import _end_with_parent
    _end_with_parent(period=0.2)
    Path(ready).touch()
    time.sleep(120)  # a training that would go on, unseen


if __name__ == "__main__":
    before, ready, pid_file = float(sys.argv[1]), sys.argv[2], sys.argv[3]
    p = multiprocessing.get_context("spawn").Process(target=child, args=(before, ready))
    p.start()
    Path(pid_file).write_text(str(p.pid))
    while before == 0 and not Path(ready).exists():  # the watch runs: die under it
        time.sleep(0.05)
    os._exit(0)  # killed outright: no clean-up, the child is left to another parent
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from Linux's /proc")
@pytest.mark.parametrize("before", [0.0, 3.0], ids=["killed-while-watching", "killed-before-the-watch-starts"])
def test_a_process_of_the_sweep_ends_when_the_sweep_dies_even_before_its_watch_starts(tmp_path, before):
    # the second case is the race a SIGKILL'd sweep hit: a worker still importing when its parent died read the
    # new parent's pid as "the sweep's" and trained on for ever
    import os
    import signal
    script = tmp_path / "driver.py"
    script.write_text(_ORPHAN_DRIVER)
    # no pipes to the driver: the child inherits them, and waiting for their end would wait for the child
    with open(tmp_path / "stderr", "w") as err:
        code = subprocess.run([sys.executable, str(script), str(before), str(tmp_path / "ready"),
                               str(tmp_path / "pid")], stdout=subprocess.DEVNULL, stderr=err, timeout=120,
                              cwd=Path(__file__).resolve().parents[2]).returncode
    assert code == 0, (tmp_path / "stderr").read_text()
    pid = int((tmp_path / "pid").read_text())
    assert before == 0 or _alive(pid)  # the sweep is gone while its process is still starting up
    try:
        assert _wait_for(lambda: not _alive(pid), before + 30), f"process {pid} outlived the sweep"
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process groups from Linux's /proc")
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_a_killed_sweep_leaves_no_worker_training_on(tmp_path, signal_name):
    """SIGTERM (like Ctrl-C) ends the workers before the command exits (130, naming --resume); after SIGKILL of
    the command the workers (and the multiprocessing manager) notice their parent is gone and end themselves."""
    import os
    import signal
    cfg = tmp_path / "long.toml"
    cfg.write_text('name = "long"\n[recipe]\nepochs = 100000\nbatch_size = 100\nlr = 0.01\nlatency_rounds = 0\n'
                   '[grid]\nnets = ["mlp_tiny"]\nseeds = [0, 1]\n'
                   '[methods.magnitude]\nstrength = "target_sparsity"\nvalues = [0.5]\n')
    proc = subprocess.Popen([sys.executable, "-m", "bayes_sparse.cli", "bench", str(cfg), "--out",
                             str(tmp_path / "out"), "--jobs", "2", "--no-progress"],
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # the multiprocessing manager and both training workers past their start: each imports torch (for its
        # initializer) only after reading all the command sent it, so the command has recorded it as its worker.
        # Counting processes alone raced: a worker still being spawned counts, but is not yet the pool's, and a
        # signal then rightly reports 0 trainings ended (seen in CI).
        assert _wait_for(lambda: len(_with_torch_loaded(_group_pids(proc.pid) - {proc.pid})) >= 3, 120), \
            _group_pids(proc.pid)
        os.kill(proc.pid, getattr(signal, signal_name))
        proc.wait(timeout=60)
        if signal_name == "SIGTERM":
            assert proc.returncode == 130
            err = proc.stderr.read()
            assert "2 training(s) in progress were ended" in err and "--resume" in err, err
        assert _wait_for(lambda: not _group_pids(proc.pid), 30), _group_pids(proc.pid)
    finally:
        for pid in _group_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.stderr.close()
