"""Red-team round 14: bad inputs the earlier catalogs did not reach, each one line, exit 2, nothing replaced."""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from conftest import run_stage
from lipflow.results.inputs import EVALUATION_COLUMNS


def one_error_line(done) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    return lines[0]


def test_merge_over_a_table_of_evaluation_column_names_but_nested_values_is_one_line(tmp_path):
    """A file at --out with the evaluation columns' names whose run_id holds lists (no evaluation table) is
    refused in one line naming --out, and kept; pyarrow's group-by of list keys raised a traceback."""
    out = tmp_path / "evals.parquet"
    pq.write_table(pa.table({c: pa.array([[1]]) for c in EVALUATION_COLUMNS}), out)
    before = out.read_bytes()
    done = run_stage("lipflow.results", "merge-evals", "--run-id", "r-0000000a", "--out", str(out), cwd=tmp_path)
    line = one_error_line(done)
    assert "--out" in line and str(out) in line, line
    assert out.read_bytes() == before


def training_curves_db(path):
    """A results database with what the training-curves figure reads: one run of the runs block, two steps."""
    import duckdb

    from lipflow.results.training_curves import COLUMNS

    text = {"run_id": "a-00000000", "name": "a", "model": "gpt", "optimizer": "adamw", "status": "completed",
            "weight_constraint": "none", "experiment": None}
    runs = pa.table({c: pa.array([text.get(c)], pa.string() if kind == "text" else pa.float64())
                     for c, kind in COLUMNS["runs"].items()})
    metrics = pa.table({c: pa.array(["a-00000000"] * 2) if c == "run_id" else pa.array([1.0, 2.0])
                        for c in COLUMNS["train_metrics"]})
    with duckdb.connect(str(path)) as con:
        con.register("runs_arrow", runs)
        con.register("metrics_arrow", metrics)
        con.execute("CREATE TABLE runs AS SELECT * FROM runs_arrow")
        con.execute("CREATE TABLE train_metrics AS SELECT * FROM metrics_arrow")
    return path


def test_plots_receipt_in_a_missing_folder_is_refused_before_any_figure_is_replaced(tmp_path):
    """--receipt in a folder that does not exist is refused before drawing (as the database build and the
    image-MLP study refuse theirs), not after the figures were replaced."""
    db = training_curves_db(tmp_path / "lipflow.duckdb")
    figures = tmp_path / "figures"
    args = ["--db", str(db), "--out-dir", str(figures), "--training-curves"]
    assert run_stage("lipflow.plots", *args, cwd=tmp_path).returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in figures.iterdir()}
    done = run_stage("lipflow.plots", *args, "--receipt", str(tmp_path / "nowhere" / "x.drawn"), cwd=tmp_path)
    line = one_error_line(done)
    assert "--receipt" in line and "nowhere" in line, line
    assert {p.name: p.stat().st_mtime_ns for p in figures.iterdir()} == before


def test_plots_receipt_in_the_folder_it_draws_into_is_fine(tmp_path):
    """A receipt inside --out-dir, which the command makes, is no missing folder."""
    db = training_curves_db(tmp_path / "lipflow.duckdb")
    figures = tmp_path / "new" / "figures"
    done = run_stage("lipflow.plots", "--db", str(db), "--out-dir", str(figures), "--training-curves",
                     "--receipt", str(figures / "training_curves.drawn"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (figures / "training_curves.drawn").is_file()


def test_seal_of_a_named_pipe_is_one_line_and_writes_no_sidecar(tmp_path):
    """``seal`` of something that is no regular file (a named pipe, which it waited on for ever; a device,
    /dev/null, got a /dev/null.sha256) is refused in one line naming it, before the files after it."""
    import os

    fifo = tmp_path / "pipe.parquet"
    os.mkfifo(fifo)
    later = tmp_path / "later.parquet"
    later.write_bytes(b"x")
    try:
        done = subprocess.run([sys.executable, "-m", "lipflow.results", "seal", str(fifo), str(later)],
                              capture_output=True, text=True, cwd=tmp_path, timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError("seal waited on the named pipe") from None
    line = one_error_line(done)
    assert str(fifo) in line and "not a regular file" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["later.parquet", "pipe.parquet"]


def test_image_mlp_method_that_diverges_is_one_line_naming_it_and_writes_no_table(tmp_path):
    """A method whose weights turn non-finite (AdamW at lr 1e29, which the schema allows) was scored as if
    trained: its NaN model 'reached' ~10 % accuracy, which then set the matched-accuracy target of every
    method, and the study exited 0 with a table of NaN certificates. It is refused in one line naming the
    method's lr, and no table is written."""
    import json

    block = {"seeds": 1, "width": 16, "n_layers": 2, "steps": 5, "eval_every": 5, "epsilons": [0, 0.1],
             "pgd_steps": 2, "methods": {"fine": {"optimizer": "adamw", "lr": 0.003},
                                         "blown": {"optimizer": "adamw", "lr": 1e29}}}
    out = tmp_path / "robustness.parquet"
    done = run_stage("lipflow.studies.image_mlp", "--config-json", json.dumps(block), "--out", str(out), cwd=tmp_path)
    line = one_error_line(done)
    assert "image_mlp.methods.blown.lr" in line and "non-finite" in line, line
    assert not out.exists() and not (tmp_path / "robustness.parquet.sha256").exists()


def test_a_key_repeated_in_a_json_option_is_one_line_naming_it(tmp_path):
    """``--config-json '{"name": "a", "name": "b"}'`` (and ``--params-json``) kept the last value without a
    word, as json.loads does; a key repeated in a config file or a JSONL record is refused, and so is it here,
    before anything is written."""
    out = tmp_path / "corpus"
    done = run_stage("lipflow.data.corpus", "--config-json", '{"name": "a", "val_fraction": 0.1, "name": "b"}',
                     "--out-dir", str(out), cwd=tmp_path)
    line = one_error_line(done)
    assert "--config-json" in line and "'name'" in line and "twice" in line, line
    assert not out.exists()
    nested = run_stage("lipflow.data.corpus", "--config-json", '{"name": "a", "paths": [{"x": 1, "x": 2}]}',
                       "--out-dir", str(out), cwd=tmp_path)
    assert "'x'" in one_error_line(nested)
