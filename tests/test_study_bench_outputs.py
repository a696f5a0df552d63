"""What the studies and the benchmarks write over: each study command replaces only its own kind of
earlier output (a sealed file of the same kind, never a run's sealed weights or tables); the image-MLP
study checks its --config-json against the config schema; a benchmark appends to a bench table only
(checked before anything is measured, every column kept); bench/summarize.py names a bad file."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO, train_here

sys.path.insert(0, str(REPO))  # bench.common

TINY_MLP = {"width": 8, "steps": 4, "eval_every": 2, "batch_size": 16, "epsilons": [0.0, 0.3], "pgd_steps": 2}
TINY_ICL = {"d": 2, "n": 4, "layers": [1], "n_grid": [4], "sigma": {"kind": "identity"}, "train_steps": 3,
            "batch_size": 16, "test_prompts": 20000, "theory_samples": 1000, "regression_prompts": 1000}


def filled_mlp() -> dict:
    """TINY_MLP with the schema's defaults filled: the block the pipeline passes (the red team's $CFG)."""
    from lipflow.config import check_config

    config = {"image_mlp": dict(TINY_MLP)}
    check_config(config)
    return config["image_mlp"]


def one_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, (done.returncode, done.stderr[-2000:])
    return lines[0]


# the tests that use it run on one xdist worker, so the run is trained once (-n 2 --dist loadgroup)
TRAINED_RUN_GROUP = pytest.mark.xdist_group("trained_run")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, char_shards) -> Path:
    """A run directory the train stage wrote (sealed weights and metrics), plus a sealed evaluation table."""
    from lipflow.config import check_config
    from lipflow.data.parquet import write_table_parquet

    config = {"runs": {"tiny": {"d_model": 16, "n_layers": 1, "n_heads": 2, "context": 8, "batch_size": 2,
                                "steps": 2, "eval_every": 2, "eval_batches": 1, "checkpoint_every": 0,
                                "device": "cpu"}}}
    check_config(config)
    run_dir = tmp_path_factory.mktemp("runs") / "tiny-00000000"
    assert train_here(config["runs"]["tiny"], char_shards, run_dir) == 0
    write_table_parquet(run_dir / "evals.parquet", pa.table({"run_id": ["tiny-00000000"], "eval": ["val"],
                                                             "metric": ["loss"], "value": [1.0]}))
    for name in ("model.safetensors", "train_metrics.parquet", "evals.parquet"):
        assert (run_dir / f"{name}.sha256").exists(), name
    return run_dir


RUN_FILES = ("model.safetensors", "train_metrics.parquet", "evals.parquet")


def copy_of(run_dir: Path, name: str, dest: Path) -> Path:
    """``name`` of the run and its sidecar copied to ``dest`` (still matching: a sealed file of another stage)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes((run_dir / name).read_bytes())
    Path(f"{dest}.sha256").write_bytes((run_dir / f"{name}.sha256").read_bytes())
    return dest


# ---------------------------------------------------------------- the studies' outputs


@TRAINED_RUN_GROUP
@pytest.mark.parametrize("name", RUN_FILES)
def test_image_mlp_out_replaces_its_own_table_but_not_a_runs_sealed_file(name, trained_run, tmp_path, capsys):
    """The red-team repro: --out on a run's weights (or metrics, or evaluations) is refused in one line
    naming --out and the file, which keeps its bytes; a rerun over the study's own table succeeds."""
    from lipflow.studies import image_mlp

    target = trained_run / name
    before = target.read_bytes()
    assert image_mlp.main(["--config-json", json.dumps(filled_mlp()), "--out", str(target)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--out" in lines[0] and str(target) in lines[0], lines
    assert "refusing to replace" in lines[0], lines
    assert target.read_bytes() == before
    if name == RUN_FILES[0]:  # once: the study's own earlier table is replaced
        out = tmp_path / "robustness.parquet"
        for _ in range(2):
            assert image_mlp.main(["--config-json", json.dumps(TINY_MLP), "--out", str(out)]) == 0, \
                capsys.readouterr().err[-2000:]
        assert pq.read_schema(out).names == ["metric", "value", "method", "optimizer", "weight_constraint", "seed",
                                             "epsilon"]
        assert {(row["method"], row["optimizer"]) for row in pq.read_table(out).to_pylist()} == {
            (name, method["optimizer"]) for name, method in filled_mlp()["methods"].items()}


@pytest.mark.parametrize("extra", [{}, {"optimizer": "muon", "weight_constraint": "none"}])
def test_image_mlp_out_replaces_its_table_of_the_earlier_layouts(extra, tmp_path, capsys):
    """Its tables before the optimizer and weight_constraint columns and before the seed column are still the
    study's own: a rerun replaces them (as --forcerun image_mlp_robustness does) instead of refusing a
    foreign file; a table with one more column is not the study's and is kept."""
    import pyarrow as pa

    from lipflow.data.parquet import write_table_parquet
    from lipflow.studies import image_mlp

    out = tmp_path / "robustness.parquet"
    write_table_parquet(out, pa.Table.from_pylist([{"metric": "clean_accuracy", "value": 0.5, "method": "m", **extra,
                                                    "epsilon": None}]))
    assert image_mlp.main(["--config-json", json.dumps(TINY_MLP), "--out", str(out)]) == 0, capsys.readouterr().err
    assert pq.read_schema(out).names == list(image_mlp.COLUMNS)
    foreign = tmp_path / "mine.parquet"
    write_table_parquet(foreign, pa.Table.from_pylist([{"metric": "m", "value": 0.5, "method": "m", **extra,
                                                        "epsilon": None, "note": "mine"}]))
    before = foreign.read_bytes()
    assert image_mlp.main(["--config-json", json.dumps(TINY_MLP), "--out", str(foreign)]) == 2
    assert "refusing to replace" in capsys.readouterr().err and foreign.read_bytes() == before


def icl_commands(tmp_path: Path, run_dir: Path) -> dict[str, tuple[list[str], Path]]:
    """Each ICL command pointed at a copy of one of the run's sealed files: (arguments, the file)."""
    cfg = json.dumps(TINY_ICL)
    weights = copy_of(run_dir, "model.safetensors", tmp_path / "train" / "L1_n4.safetensors")
    metrics = copy_of(run_dir, "train_metrics.parquet", tmp_path / "baselines" / "baselines.parquet")
    table = copy_of(run_dir, "evals.parquet", tmp_path / "icl" / "loss_by_layers.parquet")
    summary = tmp_path / "check" / "summary.json"
    summary.parent.mkdir()
    summary.write_text(json.dumps({"passed": True, "my_notes": "keep"}))
    return {"train": (["train", "--config-json", cfg, "--layers", "1", "--n", "4", "--out", str(weights),
                       "--no-progress"], weights),
            "baselines": (["baselines", "--config-json", cfg, "--out", str(metrics)], metrics),
            "collect": (["collect", "--config-json", cfg, "--baselines", str(metrics), "--runs", str(weights),
                         "--out-dir", str(table.parent)], table),
            "check": (["check", "--config-json", cfg, "--results-dir", str(table.parent), "--out", str(summary)],
                      summary)}


@TRAINED_RUN_GROUP
def test_icl_commands_replace_only_their_own_kind_of_output(trained_run, tmp_path, capsys):
    """train over a run's weights, baselines over its metrics, collect over an evaluation table named
    like one of its tables, check over a JSON with a `passed` key: each refused in one line naming the
    option and the file, which keeps its bytes. Then the study's own outputs, each rerun over itself."""
    from lipflow.studies.icl.__main__ import main as icl_main

    for command, (args, target) in icl_commands(tmp_path / "foreign", trained_run).items():
        before = target.read_bytes()
        capsys.readouterr()
        assert icl_main(args) == 2, command
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        flag = "--out-dir" if command == "collect" else "--out"
        assert len(lines) == 1 and flag in lines[0] and str(target) in lines[0], (command, lines)
        assert "refusing to replace" in lines[0], lines
        assert target.read_bytes() == before, command
    own = tmp_path / "own"
    cfg = json.dumps(TINY_ICL)
    steps = [["train", "--config-json", cfg, "--layers", "1", "--n", "4", "--out", str(own / "L1_n4.safetensors"),
              "--no-progress"],
             ["baselines", "--config-json", cfg, "--out", str(own / "baselines.parquet")],
             ["collect", "--config-json", cfg, "--baselines", str(own / "baselines.parquet"),
              "--runs", str(own / "L1_n4.safetensors"), "--out-dir", str(own / "icl")],
             ["check", "--config-json", cfg, "--results-dir", str(own / "icl"), "--out", str(own / "summary.json")]]
    for args in steps:
        for _ in range(2):
            assert icl_main(args) == 0, (args[0], capsys.readouterr().err[-2000:])


# ---------------------------------------------------------------- image_mlp --config-json


@pytest.mark.parametrize("bad, key", [({"width": "x"}, "image_mlp.width"), ({"methods": {}}, "image_mlp.methods"),
                                      ({"steps": 0}, "image_mlp.steps"), ({"stepz": 3}, "image_mlp.stepz"),
                                      ({"methods": {"m": {"optimizer": "sgd"}}}, "image_mlp.methods.m.optimizer")])
def test_image_mlp_checks_its_config_against_the_schema(bad, key, tmp_path, capsys):
    """A bad --config-json is one line naming the key (as the config check names it), exit 2, no output;
    the pipeline's config check refuses the same block."""
    from lipflow.config import ConfigError, check_config
    from lipflow.studies import image_mlp

    out = tmp_path / "robustness.parquet"
    assert image_mlp.main(["--config-json", json.dumps({**filled_mlp(), **bad}), "--out", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lipflow: error: --config-json") and key in lines[0], lines
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match=re.escape(key)):
        check_config({"image_mlp": {**TINY_MLP, **bad}})


# ---------------------------------------------------------------- bench tables


def bench_table(path: Path, n: int = 2) -> pa.Table:
    from bench.common import SCHEMA, row

    table = pa.Table.from_pylist([row("mine", f"m{i}", i + 1.0, "s") for i in range(n)], schema=SCHEMA)
    pq.write_table(table, path)
    return table


def test_append_rows_keeps_every_row_and_column_and_refuses_another_table(tmp_path):
    """Appending keeps the old rows (a file with the bench columns in another order too); a table with a
    column more, or one less, or of another type, or not Parquet at all is refused in one line naming the
    file and the difference, and keeps its bytes."""
    from bench.common import SCHEMA, append_rows, row

    def check_out(path: Path) -> None:
        from bench.common import check_out

        check_out(path)

    ours = tmp_path / "ours.parquet"
    old = bench_table(ours)
    pq.write_table(old.select(list(reversed(SCHEMA.names))), ours)  # same columns, another order
    append_rows(ours, [row("mine", "new", 3.0, "s")])
    table = pq.read_table(ours)
    assert table.column_names == SCHEMA.names and table.column("metric").to_pylist() == ["m0", "m1", "new"]

    extra = tmp_path / "extra.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3], "metric": ["a", "b", "c"]}), extra)
    fewer = tmp_path / "fewer.parquet"
    pq.write_table(old.drop(["git_commit"]), fewer)
    retyped = tmp_path / "retyped.parquet"
    pq.write_table(old.set_column(2, "value", pa.array(["1", "2"])), retyped)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    for path, words in ((extra, "has column x, which the bench schema lacks"),
                        (fewer, "lacks column git_commit, which the bench schema has"),
                        (retyped, "column value is string"), (notes, "is not a readable Parquet file")):
        before = path.read_bytes()
        for attempt in (lambda p: append_rows(p, [row("mine", "new", 3.0, "s")]), check_out):
            with pytest.raises(ValueError) as err:
                attempt(path)
            message = str(err.value)
            assert str(path) in message and words in message and "\n" not in message, message
        assert path.read_bytes() == before


def bench_scripts() -> list[str]:
    """Every bench script that appends rows (calls save_rows or append_rows)."""
    return sorted(p.name for p in (REPO / "bench").glob("*.py")
                  if p.name != "common.py" and re.search(r"\b(save_rows|append_rows)\(", p.read_text()))


def test_every_bench_script_checks_out_before_measuring(tmp_path):
    """The red-team repro (bench/duckdb_queries.py --quick --out mine.parquet dropped column x): every
    script that appends refuses a foreign --out in one line naming it, within seconds (before
    measuring), exit code 2, and the file keeps its bytes."""
    scripts = bench_scripts()
    assert len(scripts) >= 9, scripts
    foreign = tmp_path / "mine.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3], "metric": ["a", "b", "c"]}), foreign)
    before = foreign.read_bytes()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {}
    for i in range(0, len(scripts), 3):  # three at a time on a small machine
        batch = {name: subprocess.Popen([sys.executable, str(REPO / "bench" / name), "--out", str(foreign)],
                                        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, start_new_session=True) for name in scripts[i:i + 3]}
        for name, proc in batch.items():
            try:
                out, err = proc.communicate(timeout=90)
            except subprocess.TimeoutExpired:  # measuring: the check did not come first
                os.killpg(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
            procs[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    for name, done in procs.items():
        line = one_line(done)
        assert str(foreign) in line and "has column x" in line, (name, line)
    assert foreign.read_bytes() == before


def test_summarize_names_a_file_that_is_not_a_bench_table(tmp_path):
    notes, other = tmp_path / "notes.txt", tmp_path / "other.parquet"
    notes.write_text("my notes\n")
    pq.write_table(pa.table({"metric": ["a"], "value": [1.0]}), other)
    for path, words in ((notes, "is not a readable Parquet file"), (other, "has no column bench")):
        done = subprocess.run([sys.executable, str(REPO / "bench" / "summarize.py"), str(path)],
                              capture_output=True, text=True, timeout=120)
        line = one_line(done)
        assert str(path) in line and words in line, line
        assert done.stdout == ""
    ours = tmp_path / "ours.parquet"
    bench_table(ours)
    done = subprocess.run([sys.executable, str(REPO / "bench" / "summarize.py"), str(ours)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "| mine | m1 | 2 | s |" in done.stdout, done.stderr


def test_image_mlp_refuses_method_keys_the_config_refuses_and_names_out_of_memory(tmp_path, capsys):
    """The stage checks its --config-json as the config checks the image_mlp block (a method's
    `steps` used to be ignored with exit 0), and a batch beyond memory is one line, not a traceback."""
    from lipflow.studies.image_mlp import main

    methods = {"a": {"optimizer": "muon", "steps": 100}}
    assert main(["--config-json", json.dumps({"methods": methods}), "--out", str(tmp_path / "t.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lipflow: error: --config-json: image_mlp.methods.a.steps: a method sets only"), err
    huge = {"width": 2**22}
    assert main(["--config-json", json.dumps(huge), "--out", str(tmp_path / "t.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lipflow: error: out of memory (") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "t.parquet").exists()


def test_image_mlp_refuses_an_out_folder_that_does_not_exist_before_training(tmp_path, capsys, monkeypatch):
    """--out in a missing folder failed only when the table was written, after the whole study had trained
    (about 2 minutes with the defaults); now one line naming --out and the folder, before any training."""
    from lipflow.studies import image_mlp

    trained = []
    monkeypatch.setattr(image_mlp, "run_image_mlp_study", lambda cfg: trained.append(cfg) or [])
    out = tmp_path / "missing" / "robustness.parquet"
    assert image_mlp.main(["--config-json", "{}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lipflow: error: --out {out}: folder {out.parent} does not exist", err
    assert trained == [] and not out.parent.exists()
