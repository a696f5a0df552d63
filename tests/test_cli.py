"""The ``lipflow`` command (query, sample, runs) run as a user runs it: a bad input is one line on
stderr and exit code 2, every time."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
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
    write_table_parquet(run_dir / "train_metrics.parquet",
                        pa.table({"run_id": ["fake-00000000"], "step": [0], "loss": [1.0]}))
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
    command = ("lipflow.cli", "sample", run_id, "--results", str(results), "--prompt", "The", "--tokens", "5",
               "--device", "cpu")
    # 10 tries, side by side on every core: an abort in one try in five goes unseen in 0.8¹⁰ ≈ 11% of runs
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for done in pool.map(lambda _: run_stage(*command), range(10)):
            assert "no token shards at" in error_line(done)


def test_sample_refuses_a_tokenizer_of_another_vocabulary_than_the_weights(results_tree):
    """Weights from before lipflow recorded their token manifest's sha256 are not checked against the data
    directory; sampled with a tokenizer of more tokens than their embedding table, the prompt's ids ran
    past it (torch's IndexError, a traceback). It is refused as the evaluation stage refuses it."""
    from lipflow.train.checkpoint import save_weights
    from test_bad_inputs import seeded_model

    results, run_id = results_tree
    run_dir = results / "runs" / run_id
    info = json.loads((run_dir / "config.json").read_text())
    save_weights(run_dir / "model.safetensors", seeded_model(info["config"], 5).state_dict(),
                 {"config": info["config"], "vocab_size": 5})
    (run_dir / "config.json").write_text(json.dumps({**info, "vocab_size": 5}))
    done = run_stage("lipflow.cli", "sample", run_id, "--results", str(results), "--prompt", "The", "--tokens", "5",
                     "--device", "cpu")
    assert "trained with vocabulary 5 but the tokenizer in" in error_line(done) and done.stdout == ""

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


def test_a_database_path_that_is_not_utf8_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """$LIPFLOW_DB (what lipflow query and lipflow.connect() read without --db) and the plots' --db reach
    DuckDB, which failed on a file name that is not UTF-8 with a bare 'RuntimeError: std::bad_cast'
    traceback, exit 1."""
    import lipflow
    from lipflow.cli import main
    from lipflow.results.figures import main as plots_main

    db = tmp_path / not_utf8("lipflow")
    db.write_bytes(b"")
    monkeypatch.setenv("LIPFLOW_DB", str(db))
    with pytest.raises(ValueError, match=r"^\$LIPFLOW_DB .* is not valid UTF-8 text"):
        lipflow.connect()
    assert main(["query", "SELECT 1"]) == 2
    assert plots_main(["--db", str(db), "--training-curves", "--out-dir", str(tmp_path / "figures")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all("is not valid UTF-8 text" in line for line in lines), lines


def test_an_empty_database_path_is_named_and_an_empty_lipflow_db_is_unset(tmp_path, monkeypatch, capsys):
    """``--db ''`` read as Path('') named the database '.' ("no results database at ."); an empty $LIPFLOW_DB
    (a shell's ``LIPFLOW_DB= lipflow query``) is unset: results/lipflow.duckdb."""
    import duckdb

    import lipflow
    from lipflow.cli import main

    (tmp_path / "results").mkdir()
    with duckdb.connect(str(tmp_path / "results" / "lipflow.duckdb")) as con:
        con.execute("CREATE TABLE runs AS SELECT 'a' AS run_id")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIPFLOW_DB", "")
    assert lipflow.connect().execute("SELECT run_id FROM runs").fetchall() == [("a",)]
    assert main(["query", "--db", "", "SELECT 1"]) == 2
    assert capsys.readouterr().err == "lipflow: error: the database path is empty (name a file, or none for " \
                                      "$LIPFLOW_DB, else results/lipflow.duckdb)\n"
    with pytest.raises(ValueError, match=r"^the database path is empty \(name a file"):  # the Python API's words too
        lipflow.connect("")


def query_of_table(tmp_path, table_sql: str, sql: str, *options: str) -> str:
    """``lipflow query SQL`` (exit 0 asserted) on a database holding one table ``evals`` made by ``table_sql``."""
    import duckdb

    db = tmp_path / "evals.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute(f"CREATE OR REPLACE TABLE evals AS {table_sql}")
    done = run_stage("lipflow.cli", "query", sql, "--db", str(db), *options)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_query_json_writes_nan_and_inf_as_protobufs_strings_at_any_depth(tmp_path):
    """A NaN or ±inf, at the top level or in a list, array, struct or map, is "NaN", "Infinity" or "-Infinity"
    (it was null, which reads as a missing value, while table and CSV print nan and inf); a map key that is
    one keeps DuckDB's name of it."""
    sql = ("SELECT run_id, max(value) AS top, list(value ORDER BY value) AS values, {'max': max(value)} AS struct, "
           "map([max(value)], [max(value)]) AS map, [max(value), 2.0]::DOUBLE[2] AS pair, NULL::DOUBLE AS missing "
           "FROM evals GROUP BY run_id ORDER BY run_id")
    out = query_of_table(tmp_path, "SELECT * FROM (VALUES ('a', 'nan'::DOUBLE), ('a', 1.5), ('b', '-inf'), "
                                   "('c', 'inf')) AS t(run_id, value)", sql, "--format", "json")
    assert json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} in JSON output")) == [
        {"run_id": "a", "top": "NaN", "values": [1.5, "NaN"], "struct": {"max": "NaN"}, "map": {"nan": "NaN"},
         "pair": ["NaN", 2.0], "missing": None},
        {"run_id": "b", "top": "-Infinity", "values": ["-Infinity"], "struct": {"max": "-Infinity"},
         "map": {"-inf": "-Infinity"}, "pair": ["-Infinity", 2.0], "missing": None},
        {"run_id": "c", "top": "Infinity", "values": ["Infinity"], "struct": {"max": "Infinity"},
         "map": {"inf": "Infinity"}, "pair": ["Infinity", 2.0], "missing": None}]


def test_query_json_writes_a_decimal_as_a_number(tmp_path):
    """A DECIMAL (DuckDB's type of a literal such as 2.50, and of SUMMARIZE's null_percentage) was written
    as a JSON string ("2.50"), so a reader of --format json got text where the query computed a number."""
    sql = ("SELECT 2.50 AS literal, [0.25] AS listed, (SELECT null_percentage FROM (SUMMARIZE evals) "
           "WHERE column_name = 'value') AS nulls")
    out = query_of_table(tmp_path, "SELECT * FROM (VALUES ('a', 1.5::DOUBLE), ('b', NULL)) AS t(run_id, value)", sql,
                         "--format", "json")
    assert json.loads(out) == [{"literal": 2.5, "listed": [0.25], "nulls": 50.0}]


def test_query_table_and_csv_write_a_nested_value_as_json(tmp_path):
    """A list, struct or map cell was Python's text of it: "[Decimal('1.5'), None]", "{'at':
    datetime.date(2026, 12, 5)}", which no CSV reader can take apart; it is its JSON text in both formats."""
    import csv
    import io

    sql = ("SELECT [1.5, NULL] AS losses, {'at': DATE '2026-12-05', 'x': 2.50} AS info, "
           "map(['k'], [['nan'::DOUBLE, 1.0]]) AS m FROM evals")
    header, row = csv.reader(io.StringIO(query_of_table(tmp_path, "SELECT 'a' AS run_id", sql, "--format", "csv")))
    assert header == ["losses", "info", "m"]
    assert [json.loads(cell) for cell in row] == [[1.5, None], {"at": "2026-12-05", "x": 2.5}, {"k": ["NaN", 1.0]}]
    table = query_of_table(tmp_path, "SELECT 'a' AS run_id", sql)
    assert table.splitlines()[2].split(" | ")[0].strip() == "[1.5, null]"


def test_query_writes_a_blob_as_duckdb_writes_it_as_text():
    """A BLOB was Python's text of it (b'ab') in every format; it is DuckDB's own text of it, every byte."""
    import duckdb

    from lipflow.cli import format_rows

    every_byte = bytes(range(256))
    with duckdb.connect() as con:
        duckdb_text, blob, listed = con.execute("SELECT ?::BLOB::VARCHAR, ?::BLOB, [?::BLOB]",
                                                [every_byte, every_byte, b"a'b"]).fetchone()
    assert blob == every_byte and "\\x0A" in duckdb_text and "~" in duckdb_text
    assert json.loads(format_rows(["b", "l"], [(blob, listed)], "json")) == [{"b": duckdb_text, "l": ["a\\x27b"]}]
    assert format_rows(["b"], [(blob,)], "csv").splitlines()[1] == '"' + duckdb_text.replace('"', '""') + '"'
    assert format_rows(["b"], [(blob,)], "table").splitlines()[2] == duckdb_text


def test_query_table_keeps_a_cell_with_a_line_break_on_its_row():
    """A text cell with a line break printed as extra lines that read as rows of their own ('(2 rows)'
    in a one-row result); the table shows it as \\n, and CSV and JSON keep the text as it is."""
    from lipflow.cli import format_rows

    rows = [("a\n(2 rows)\tx\r", 1)]
    table = format_rows(["note", "n"], rows, "table").splitlines()
    assert table[2:] == ["a\\n(2 rows)\\tx\\r | 1", "(1 row)"]
    assert json.loads(format_rows(["note", "n"], rows, "json")) == [{"note": "a\n(2 rows)\tx\r", "n": 1}]


def test_sample_from_a_run_with_non_finite_weights_is_one_line(results_tree):
    """A diverged run may keep NaN weights; sampling it was torch.multinomial's traceback."""
    import torch
    from safetensors.torch import load_file

    from lipflow.train.checkpoint import save_weights

    results, run_id = results_tree
    run_dir = results / "runs" / run_id
    weights = load_file(run_dir / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], float("nan"))
    info = json.loads((run_dir / "config.json").read_text())
    save_weights(run_dir / "model.safetensors", weights, {"config": info["config"], "vocab_size": info["vocab_size"]})
    summary = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**summary, "status": "diverged", "diverged_step": 7}))
    done = run_stage("lipflow.cli", "sample", run_id, "--results", str(results), "--prompt", "The", "--tokens", "5",
                     "--device", "cpu")
    assert error_line(done).endswith(f"run {run_id} has non-finite weights ({name}; it diverged at step 7): "
                                     "there is nothing to sample")
    assert done.stdout == ""


@pytest.fixture
def metrics_db(tmp_path) -> Path:
    """A database whose runs and train_metrics share the column val_loss, as lipflow's do."""
    import duckdb

    db = tmp_path / "metrics.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute("CREATE TABLE runs AS SELECT 'a-00000000' AS run_id, 1.5 AS val_loss, DATE '2026-12-05' AS day")
        con.execute("CREATE TABLE train_metrics AS SELECT 'a-00000000' AS run_id, i AS step, 3.0 - i AS val_loss "
                    "FROM range(3) t(i)")
    return db


def test_query_json_refuses_two_columns_of_one_name_which_table_and_csv_show(metrics_db):
    """A JSON object holds one value per name: the run's val_loss was silently dropped for the step's."""
    sql = "SELECT r.run_id, r.val_loss, m.step, m.val_loss FROM runs r JOIN train_metrics m USING (run_id) WHERE step = 1"
    done = run_stage("lipflow.cli", "query", sql, "--db", str(metrics_db), "--format", "json")
    assert "column 'val_loss' appears twice in the result" in error_line(done) and done.stdout == ""
    done = run_stage("lipflow.cli", "query", sql, "--db", str(metrics_db), "--format", "csv")
    assert done.returncode == 0 and done.stdout.splitlines() == ["run_id,val_loss,step,val_loss", "a-00000000,1.5,1,2.0"]


def test_query_json_writes_a_map_key_json_cannot_hold_as_its_text(metrics_db):
    done = run_stage("lipflow.cli", "query", "SELECT histogram(day) AS h, map([1], ['x']) AS m FROM runs",
                     "--db", str(metrics_db), "--format", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [{"h": {"2026-12-05": 1}, "m": {"1": "x"}}]


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_query_error_while_rows_are_computed_is_one_line_with_no_partial_result(metrics_db, fmt):
    """DuckDB computes a result while it is fetched: an error in row 50,001 came after the first rows,
    outside the error handling (a traceback)."""
    sql = "SELECT i, CASE WHEN i > 50000 THEN (i::VARCHAR || 'x')::INT END AS bad FROM range(100000) t(i)"
    done = run_stage("lipflow.cli", "query", sql, "--db", str(metrics_db), "--format", fmt)
    assert "Could not convert string '50001x'" in error_line(done) and done.stdout == ""


def test_query_max_rows_is_the_largest_result_printed(metrics_db):
    sql = "SELECT i FROM range(25000) t(i)"
    done = run_stage("lipflow.cli", "query", sql, "--db", str(metrics_db), "--format", "csv", "--max-rows", "25000")
    assert done.returncode == 0 and done.stdout.splitlines() == ["i", *map(str, range(25000))]
    done = run_stage("lipflow.cli", "query", sql, "--db", str(metrics_db), "--format", "csv", "--max-rows", "24999")
    assert "the result has more than 24,999 rows (--max-rows)" in error_line(done) and done.stdout == ""
    assert "--max-rows must be at least 1, got 0" in error_line(
        run_stage("lipflow.cli", "query", sql, "--db", str(metrics_db), "--max-rows", "0"))


# ------------------------------------------------------------------------------------------ query: red team
# With external access off DuckDB still lets a query read the database's own file and its write-ahead-log
# paths (<db>.wal, .wal.recovery, .wal.checkpoint), following a link planted there, and `..` through a
# linked folder reaches a file of the same name elsewhere: lipflow query allows only generator and catalog
# table functions and no table name that names a file.

@pytest.mark.parametrize("sql, words", [
    ("SELECT content FROM read_text('{db}.wal.recovery')", "table function read_text() is not allowed"),
    ("SELECT * FROM (SELECT 1) t WHERE 1 IN (SELECT size FROM read_blob('{link}/../{name}'))",
     "table function read_blob() is not allowed"),
    ("SELECT * FROM '{db}.wal.recovery'", "names a file"),
    ("DESCRIBE '{db}.wal.recovery'", "names a file"),
    ("WITH q AS (SELECT * FROM query('SELECT 1')) SELECT * FROM q", "table function query() is not allowed"),
    ("SELECT * FROM secret.txt", "'secret.txt' names a file, or a schema the database does not have"),
], ids=["read_text_of_a_planted_link", "read_blob_through_dot_dot", "from_a_path", "describe_a_path",
        "query_function", "unquoted_dotted_name"])
def test_query_reads_no_file_through_the_paths_duckdb_allows(tmp_path, sql, words):
    db = results_db(tmp_path)
    Path(f"{db}.wal.recovery").symlink_to(tmp_path / "secret.txt")
    (tmp_path / "secret.txt").write_text("a secret\n")
    (tmp_path / "elsewhere" / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere" / db.name).write_text("another file of the database's name\n")
    (db.parent / "link").symlink_to(tmp_path / "elsewhere" / "sub")
    done = run_stage("lipflow.cli", "query", sql.format(db=db, link=db.parent / "link", name=db.name), "--db", str(db))
    assert words in error_line(done) and "a secret" not in done.stdout + done.stderr and done.stdout == ""


@pytest.mark.parametrize("definition", [
    "CREATE VIEW runs AS SELECT content FROM read_text('{db}.wal.recovery')",
    "CREATE MACRO secret() AS TABLE SELECT content FROM read_text('{db}.wal.recovery'); "
    "CREATE VIEW runs AS SELECT * FROM (SELECT 1) t, LATERAL (SELECT (SELECT content FROM secret()) AS content)",
], ids=["view", "view_of_a_macro"])
def test_query_reads_no_file_through_a_view_the_database_holds(tmp_path, definition):
    """The statement checks read the query's own text: a view (or a macro it calls) stored in a database
    someone else made, reading a link planted at one of the paths DuckDB allows, printed the linked file
    for `SELECT * FROM runs`. What DuckDB's plan of the query calls is checked too."""
    import duckdb

    db = tmp_path / "theirs.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute(definition.format(db=db))
    Path(f"{db}.wal.recovery").symlink_to(tmp_path / "secret.txt")
    (tmp_path / "secret.txt").write_text("a secret\n")
    done = run_stage("lipflow.cli", "query", "SELECT * FROM runs", "--db", str(db))
    assert "table function read_text() is not allowed" in error_line(done), done.stderr
    assert "a secret" not in done.stdout + done.stderr and done.stdout == ""

def test_query_checks_a_plan_deeper_than_pythons_json_reader_goes(metrics_db, capsys):
    """The plan check must not refuse a query DuckDB runs: the plan of 300 nested subqueries is nested
    deeper than Python's json module reads (its recursion limit)."""
    import lipflow.cli

    sql = "SELECT x FROM range(1) t(x)"
    for _ in range(300):
        sql = f"SELECT x + 1 AS x FROM ({sql}) ORDER BY x LIMIT 1"
    assert lipflow.cli.main(["query", sql, "--db", str(metrics_db), "--format", "csv"]) == 0
    assert capsys.readouterr().out == "x\n300\n"

def test_query_keeps_generators_catalog_functions_and_shows(tmp_path, capsys):
    import lipflow.cli

    db = results_db(tmp_path)
    for sql, first in [("SELECT sum(i) AS s FROM range(4) t(i)", "6"), ("SELECT count(*) FROM generate_series(1, 3)", "3"),
                       ("SELECT table_name FROM duckdb_tables()", "runs"), ("SELECT name FROM pragma_table_info('runs')",
                                                                             "run_id"),
                       ("SHOW TABLES", "best"), ("DESCRIBE runs", "run_id"), ("SELECT count(*) FROM (SUMMARIZE runs)", "2"),
                       ("WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 3) SELECT max(n) FROM t",
                        "3"), ("PIVOT runs ON run_id IN ('a-00000000') USING max(val_loss)", "1.5"),
                       ("SELECT j.key FROM runs, json_each('{\"lr\": 1}') j", "lr"),
                       ("SELECT count(*) FROM json_tree('{\"a\": [1, 2]}')", "4"),
                       ("SELECT count(*) FROM main.runs JOIN lipflow.main.runs USING (run_id)", "1")]:
        code = lipflow.cli.main(["query", sql, "--db", str(db), "--format", "csv"])  # in process: 12 queries
        out, err = capsys.readouterr()
        assert code == 0 and out.splitlines()[1].split(",")[0] == first, (sql, err)


@pytest.mark.parametrize("sql, fmt, words", [
    ("SELECT to_days(2147483647) AS i", "csv", "a value of the result has no Python equivalent"),
    ("SELECT from_json('" + "[" * 600 + "1" + "]" * 600 + "', '" + "[" * 600 + '"INTEGER"' + "]" * 600 + "') AS x",
     "json", "nested too deeply to print as json"),  # json output recursed past Python's limit from ~500 levels
], ids=["interval_beyond_python", "deep_list"])
def test_query_values_python_cannot_print_are_one_line(metrics_db, sql, fmt, words):
    done = run_stage("lipflow.cli", "query", sql, "--db", str(metrics_db), "--format", fmt)
    assert words in error_line(done) and done.stdout == ""


def test_query_beyond_duckdbs_nesting_limit_gives_no_advice_lipflow_refuses(metrics_db, capsys):
    """DuckDB's error advised 'SET max_expression_depth', a statement lipflow query refuses."""
    import lipflow.cli

    sql = "SELECT " + "(" * 1200 + "1" + ")" * 1200
    assert lipflow.cli.main(["query", sql, "--db", str(metrics_db)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lipflow: error: Parser Error: Max expression depth limit of 1000 exceeded. (a limit lipflow "
                   "query keeps: simplify the query)"]


@pytest.mark.parametrize("sql, hint", [
    ("SELECT * FROM run", 'Table with name run does not exist! Did you mean "runs"?'),
    ("SELECT val_los FROM runs", 'not found in FROM clause! Candidate bindings: "val_loss"'),
], ids=["table", "column"])
def test_query_of_a_misspelt_name_keeps_duckdbs_suggestion_in_its_one_line(metrics_db, capsys, sql, hint):
    """The one line was DuckDB's first, which drops the next one's 'Did you mean' for a misspelt name."""
    import lipflow.cli

    assert lipflow.cli.main(["query", sql, "--db", str(metrics_db)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(hint), err


def test_query_into_a_closed_stdout_is_one_line(metrics_db):
    done = subprocess.run(f"{shlex.quote(sys.executable)} -m lipflow.cli query 'SELECT 1' --db {metrics_db} >&-",
                          shell=True, capture_output=True, text=True, timeout=120)
    assert "standard output is closed" in error_line(done)


def test_query_interrupted_by_ctrl_c_is_one_line_and_exit_130(metrics_db, monkeypatch, capsys):
    """DuckDB ends a query on Ctrl-C with RuntimeError('Query interrupted'), which was a traceback (exit 1).
    (In process: a SIGINT sent to a subprocess races its imports and DuckDB's interrupt checks.)"""
    import lipflow.cli

    real_fetch_rows = lipflow.cli.fetch_rows

    def interrupted(cursor, max_rows):
        real_fetch_rows(cursor, max_rows)
        raise RuntimeError("Query interrupted")

    monkeypatch.setattr(lipflow.cli, "fetch_rows", interrupted)
    assert lipflow.cli.main(["query", "SELECT 1", "--db", str(metrics_db)]) == 130
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == ["lipflow: interrupted"] and captured.out == ""


REPO = Path(__file__).resolve().parent.parent
COMMAND_FILES = sorted([*REPO.glob("bench/*.py"), *REPO.glob("lipflow/**/*.py")])


def test_every_commands_help_describes_it_in_whole_sentences():
    """A command's --help description is its docstring's first paragraph (summary_of), never the
    first line alone: ``python -m lipflow.plots --help`` once ended "… and the ``runs``"."""
    import ast

    from lipflow.errors import summary_of

    users = [path for path in COMMAND_FILES if "description=summary_of(__doc__)" in path.read_text()]
    assert len(users) >= 18, [p.name for p in users]
    for path in users:
        summary = summary_of(ast.get_docstring(ast.parse(path.read_text()), clean=False))
        assert summary.endswith("."), (path, summary)
    assert summary_of("First line\nends here.\n\nSecond paragraph.") == "First line ends here."
    assert not [path for path in COMMAND_FILES if "description=__doc__" in path.read_text()]


# ---------------------------------------------------------------- the README's command lines
# A command the README shows: `lipflow <query|sample|runs>`, `python -m lipflow.<module> [subcommand]`, or
# a script under bench/ (bench/NAME.py, or a bash script bench/NAME). Its --flags run up to the next
# command or a `|`, `;`, `&&` or `#`; bench/compare_revisions.py's up to its `--`, its SCRIPT's after it.
README_COMMAND = re.compile(r"bench/[A-Za-z0-9_]+(?:\.py)?|lipflow\.[A-Za-z0-9_.|]+")
README_FLAG = re.compile(r"--[a-z][a-z0-9-]*")
# Where a `python -m` module's main() is when the module's own __main__ calls it at import
MAIN_MODULES = {"lipflow.results": "lipflow.results.cli", "lipflow.plots": "lipflow.results.figures"}


def readme_command_lines() -> list[str]:
    """The README's shell text: each line of its fenced blocks (backslash continuations joined) and each
    inline code span (its line breaks read as spaces)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    fence = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
    lines = [line for block in fence.findall(text) for line in block.replace("\\\n", " ").splitlines()]
    return lines + [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", fence.sub("", text))]


def readme_command_flags(values: dict[tuple[tuple[str, ...], str], set[str]] | None = None
                         ) -> dict[tuple[str, ...], set[str]]:
    """Every command the README shows, ("lipflow", subcommand), ("module", name[, subcommand]) or
    ("bench", path), with the --flags it is shown with; ``values``, when given, gets (command, flag) →
    the words shown after the flag (up to the next option, each `a|b` alternative a word of its own)."""
    shown: dict[tuple[str, ...], set[str]] = {}
    for line in readme_command_lines():
        flag = None  # the option whose values the next words are
        tokens = [token.strip("`") for token in line.split()]
        commands: list[tuple[str, ...]] = []  # what the flags go to (lipflow.data.corpus|tokenize: both)
        script: tuple[str, ...] | None = None  # compare_revisions' SCRIPT
        for i, token in enumerate(tokens):
            following = tokens[i + 1] if i + 1 < len(tokens) else ""
            before = (commands, script)
            if token in ("|", ";", "&&") or token.startswith("#"):
                commands, script = [], None
            elif token == "lipflow" and following in ("query", "sample", "runs"):
                commands, script = [("lipflow", following)], None
            elif token.startswith("bench/") and README_COMMAND.fullmatch(token):
                if commands == [("bench", "bench/compare_revisions.py")]:
                    script = ("bench", token)
                else:
                    commands, script = [("bench", token)], None
            elif tokens[i - 1:i] == ["-m"] and token.startswith("lipflow.") and README_COMMAND.fullmatch(token):
                name, _, other = token.partition("|")
                names = [name] + ([name.rsplit(".", 1)[0] + "." + other] if other else [])
                sub = (following,) if re.fullmatch(r"[a-z][a-z-]*", following) else ()
                commands, script = [("module", module, *sub) for module in names], None
            elif token == "--" and script is not None:
                commands, script = [script], None
            for command in commands:
                shown.setdefault(command, set())
                if token.lstrip("[").startswith("--"):
                    shown[command].update(README_FLAG.findall(token))
            if (commands, script) != before or token == "--":  # a command word, or compare_revisions' `--`
                flag, token = None, ""
            elif token.lstrip("[").startswith("-") or not commands:
                option = token.lstrip("[").split("=", 1)
                flag = option[0] if token.lstrip("[").startswith("--") else None
                token = option[1] if len(option) == 2 else ""  # --flag=value: the value is a word
            if flag and token and values is not None and not token.startswith(("<", "$", '"', "'")):
                for command in commands:
                    values.setdefault((command, flag), set()).update(
                        word for word in token.strip("[]").split("|") if word and word != "...")
    return shown


class _Parsed(Exception):
    """Raised by the patched ``parse_args`` with the parser a command built."""

    def __init__(self, parser):
        super().__init__()
        self.parser = parser


def accepted_flags(command: tuple[str, ...], monkeypatch) -> set[str]:
    """The options ``command`` accepts: those of the argparse parser it builds, caught at parse_args (in
    this process; nothing runs), or a bench bash script's `case` arms."""
    kind, name, *sub = command
    if kind == "bench" and not name.endswith(".py"):
        arms = re.findall(r"^\s*(--[a-z|-]+)\)", (REPO / name).read_text(encoding="utf-8"), re.M)
        return set(README_FLAG.findall(" ".join(arms)))
    return {option for action in command_parser(command, monkeypatch)._actions for option in action.option_strings}


def command_parser(command: tuple[str, ...], monkeypatch):
    """The argparse parser a Python ``command`` builds (its subcommand's), caught at parse_args."""
    import argparse
    import importlib
    import runpy

    kind, name, *sub = command

    def caught(self, args=None, namespace=None):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", caught)
    if kind == "bench":
        monkeypatch.setattr(sys, "argv", [name])
        monkeypatch.setattr(sys, "path", list(sys.path))  # the scripts put the repository first
        run = lambda: runpy.run_path(str(REPO / name), run_name="__main__")  # noqa: E731
    else:
        if kind == "lipflow":
            module, sub = "lipflow.cli", [name]
        else:
            module = MAIN_MODULES.get(name, name)
        main = (getattr(importlib.import_module(module), "main", None)
                or importlib.import_module(f"{module}.__main__").main)
        run = lambda: main([])  # noqa: E731
    with pytest.raises(_Parsed) as parsed:
        run()
    parser = parsed.value.parser
    for word in sub:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
    return parser


def test_every_flag_the_readme_shows_on_a_command_is_one_its_parser_accepts(monkeypatch):
    """README drift: each command line the README shows names a script that exists and only options its
    parser takes (a renamed or removed option fails here, and so did `bench/train_step` without its .py)."""
    shown = readme_command_flags()
    assert {("lipflow", "query"), ("bench", "bench/gpu_check"), ("module", "lipflow.data.tokenize")} <= set(shown)
    assert "--rounds" in shown[("bench", "bench/train_step.py")]  # after compare_revisions' `--`
    assert "--repeats" in shown[("bench", "bench/compare_revisions.py")]
    assert "--config-json" in shown[("module", "lipflow.data.tokenize")]
    unknown = {}
    for command, flags in sorted(shown.items()):
        if command[0] == "bench":
            assert (REPO / command[1]).is_file(), f"the README shows {command[1]}, which does not exist"
        missing = flags - accepted_flags(command, monkeypatch)
        if missing:
            unknown[command] = sorted(missing)
    assert not unknown, unknown


def test_every_value_the_readme_gives_an_option_with_choices_is_one_of_them(monkeypatch):
    """README drift: a value the README shows for an option with a fixed set of choices (`lipflow query
    --format csv`, bench/train_step.py's `--shape`, bench/reference_recipe.py's `--arms`,
    bench/reference_side_by_side.py's `--points`) is one its parser takes: a renamed arm, point or shape
    would pass the flag check above and fail only when someone ran the command."""
    values: dict[tuple[tuple[str, ...], str], set[str]] = {}
    readme_command_flags(values)
    assert "appendix.s2" in values[(("bench", "bench/reference_recipe.py"), "--arms")]
    assert values[(("lipflow", "query"), "--format")] >= {"csv", "json"}
    checked, refused = 0, {}
    for (command, flag), words in sorted(values.items()):
        if command[0] == "bench" and not command[1].endswith(".py"):
            continue  # a bash script: its values are its own (bench/gpu_check checks --only itself)
        action = next(a for a in command_parser(command, monkeypatch)._actions if flag in a.option_strings)
        if action.choices is not None:
            checked += 1
            if words - {str(choice) for choice in action.choices}:
                refused[(command, flag)] = sorted(words - {str(choice) for choice in action.choices})
    assert checked >= 4 and not refused, (checked, refused)


def test_each_bench_scripts_usage_line_names_exactly_the_options_its_parser_takes(monkeypatch):
    """A bench script's docstring opens with its usage (``python bench/NAME.py [--opt …]``); it named
    no option the parser lacks, but left out some it takes (bench/evals.py, constraints.py and
    train_step.py their ``--threads``, which the README's commands use; tokenize.py ``--batch-docs``;
    reference_side_by_side.py ``--max-val-windows``). ``--out`` is every bench's (bench/common.py)."""
    import ast

    checked = {}
    for path in sorted(set(REPO.glob("bench/*.py")) - {REPO / "bench" / "common.py"}):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        usage = re.search(rf"^ *python bench/{re.escape(path.name)}(.*?)(?:\n\n|\Z)", doc, re.S | re.M)
        assert usage, f"{path.name}: no usage line in its docstring"
        shown = set(README_FLAG.findall(usage.group(1)))
        parser = command_parser(("bench", f"bench/{path.name}"), monkeypatch)
        actions = [action.option_strings for action in parser._actions
                   if action.option_strings and not {"--help", "--out"} & set(action.option_strings)]
        taken = {option for options in actions for option in options}
        # an action shown by any of its names (`--no-profile` for `--profile/--no-profile`)
        checked[path.name] = (sorted(shown - taken - {"--out"}),
                              sorted(options[0] for options in actions if not shown & set(options)))
    assert len(checked) >= 11, checked
    assert {name: wrong for name, wrong in checked.items() if wrong != ([], [])} == {}
