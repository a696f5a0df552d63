"""The ``lipflow`` command (query, sample, runs) run as a user runs it: a bad input is one line on
stderr and exit code 2, every time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import run_stage
from test_bad_inputs import real_fake_run, results_db


@pytest.fixture
def results_tree(char_shards, tiny_run_config, tmp_path) -> tuple[Path, str]:
    """A results directory as the pipeline leaves it: a small database, a copy of the fixture's token
    shards and one finished run on them (untrained weights, a metrics table): (the directory, the run id)."""
    from lipflow.data.parquet import write_table_parquet

    results = results_db(tmp_path).parent
    shutil.copytree(char_shards, results / "data" / "char")
    run_dir = real_fake_run(tmp_path, char_shards, tiny_run_config)
    record_data_dir(run_dir, Path("results/data/char"))  # as recorded where it trained, found in any results tree
    write_table_parquet(run_dir / "train_metrics.parquet", pa.table({"step": [0], "loss": [1.0]}))
    (results / "runs").mkdir()
    shutil.move(run_dir, results / "runs" / "fake-00000000")
    return results, "fake-00000000"


def record_data_dir(run_dir: Path, data_dir: Path) -> None:
    """Make ``data_dir`` the data directory the run's config.json says it was trained on."""
    info = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**info, "data_dir": str(data_dir)}))


def error_line(done: subprocess.CompletedProcess) -> str:
    """The one line a refused command printed, once its exit code is checked to be 2."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, (done.returncode, done.stderr)
    return lines[0]


def test_sample_refused_after_loading_its_run_exits_2_every_time(results_tree, tmp_path, monkeypatch):
    """A sample refused once its run is loaded (its data directory holds no token shards, as with data_dir
    /etc; a prompt character not in the vocabulary too) printed its line, then aborted in about one try
    in five (SIGABRT, 'terminate called without an active exception'): an Arrow thread released the
    Python bytes of the run's metrics table while Python was exiting."""
    monkeypatch.delenv("OMP_NUM_THREADS")  # as a user runs it: with one Arrow CPU thread it never aborted
    results, run_id = results_tree
    record_data_dir(results / "runs" / run_id, tmp_path / "no_shards")
    for _ in range(20):
        done = run_stage("lipflow.cli", "sample", run_id, "--results", str(results), "--prompt", "The",
                         "--tokens", "5", "--device", "cpu")
        assert "no token shards at" in error_line(done)


def not_utf8(text: str) -> str:
    """``text`` with a byte that is not UTF-8 (0xff) appended, as Python hands such an argument over."""
    return text + os.fsdecode(b"\xff")


# argument → the command line (from the results directory and its run id) that has it with a 0xff byte
NOT_UTF8 = {
    "the SQL": lambda results, run_id: ["query", not_utf8("SELECT '"), "--db", str(results / "lipflow.duckdb")],
    "--db": lambda results, run_id: ["query", "SELECT 1", "--db", str(Path(shutil.copy(
        results / "lipflow.duckdb", results / not_utf8("copy"))))],
    "--prompt": lambda results, run_id: ["sample", run_id, "--results", str(results), "--prompt", not_utf8("The ")],
    "--results": lambda results, run_id: ["sample", run_id, "--prompt", "The", "--results", str(Path(shutil.copytree(
        results, results.parent / not_utf8("results"))))],
}


@pytest.mark.parametrize("argument", sorted(NOT_UTF8))
def test_an_argument_that_is_not_utf8_is_one_line_naming_it(argument, results_tree):
    done = run_stage("lipflow.cli", *NOT_UTF8[argument](*results_tree))
    assert f"{argument} is not valid UTF-8 text" in error_line(done)


def test_query_json_writes_nan_and_inf_as_null_at_any_depth(tmp_path):
    """As at the top level, a NaN or ±inf in a list, array, struct or map is null (it was the error 'Out of
    range float values are not JSON compliant'); a map key that is one keeps its name."""
    import duckdb

    db = tmp_path / "evals.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute("CREATE TABLE evals AS SELECT * FROM (VALUES ('a', 'nan'::DOUBLE), ('a', 1.5), ('b', '-inf'))"
                    " AS t(run_id, value)")
    sql = ("SELECT run_id, max(value) AS top, list(value ORDER BY value) AS values, {'max': max(value)} AS struct, "
           "map([max(value)], [max(value)]) AS map, [max(value), 2.0]::DOUBLE[2] AS pair FROM evals "
           "GROUP BY run_id ORDER BY run_id")
    done = run_stage("lipflow.cli", "query", sql, "--db", str(db), "--format", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout, parse_constant=lambda name: pytest.fail(f"{name} in JSON output")) == [
        {"run_id": "a", "top": None, "values": [1.5, None], "struct": {"max": None}, "map": {"nan": None},
         "pair": [None, 2.0]},
        {"run_id": "b", "top": None, "values": [None], "struct": {"max": None}, "map": {"-inf": None},
         "pair": [None, 2.0]}]
