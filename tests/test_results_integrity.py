"""What the results stage and the notebook API read is what they say it is: the database build loads
the tables it is given and drops none of a user's objects, every run's files are its own and of the
kinds lipflow writes (else one line naming the file), the views count what a run trained on, the
plots replace only their own figures, and ``lipflow.load_run`` names the file or argument at fault."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

import lipflow
import lipflow.results
from lipflow.data.parquet import write_table_parquet
from lipflow.results import SUMMARY_COLUMNS, build

REPO = Path(__file__).resolve().parent.parent
MANIFEST = {"format": "lipflow-token-shards/1", "dtype": "uint16", "vocab_size": 10, "tokenizer": {},
            "splits": {"train": {"shards": [{"file": "train/shard-00000.arrow", "num_tokens": 100,
                                             "sha256": "0" * 64}]}}}


def make_run(results: Path, run_id: str, cfg: dict, steps: int = 5, evals: pa.Table | None = None,
             metrics: pa.Table | None = None, **summary_values) -> Path:
    """A finished-looking run directory (as tests/test_database.py makes them: no weights)."""
    run_dir = results / "runs" / run_id
    run_dir.mkdir(parents=True)
    summary = {k: None for k in SUMMARY_COLUMNS}
    summary.update(run_id=run_id, status="completed", versions={}, start_time=1.0, end_time=2.0, steps_completed=steps)
    summary.update(summary_values)
    (run_dir / "run.json").write_text(json.dumps(summary))
    (run_dir / "config.json").write_text(json.dumps({"run_id": run_id, "vocab_size": 10, "config": cfg,
                                                     "data_dir": "results/data/pydoc/char"}))
    if metrics is None:
        metrics = pa.table({"run_id": [run_id] * steps, "step": list(range(1, steps + 1)), "loss": [1.0] * steps})
    write_table_parquet(run_dir / "train_metrics.parquet", metrics)
    if evals is None:
        evals = pa.table({"run_id": [run_id], "eval": ["val"], "metric": ["loss"], "value": [1.5]})
    write_table_parquet(run_dir / "evals.parquet", evals)
    return run_dir


def write_manifest(results: Path) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    (results / "manifest.json").write_text(json.dumps(MANIFEST))
    return results / "manifest.json"


def build_cli(results: Path, out: Path | None = None, study_tables: list[Path] = ()) -> int:
    """``python -m lipflow.results build`` on every run directory under ``results``."""
    out = out or results / "lipflow.duckdb"
    return lipflow.results.main(["build", "--out", str(out), "--manifest", str(results / "manifest.json"),
                                 "--run-dirs", *map(str, sorted((results / "runs").iterdir())),
                                 "--study-tables", *map(str, study_tables)])


def build_here(results: Path) -> Path:
    """build() on every run directory under ``results``; returns the database."""
    build(results / "lipflow.duckdb", results / "manifest.json", sorted((results / "runs").iterdir()),
          results=results)
    return results / "lipflow.duckdb"


# ------------------------------------------------------------------------------------------ a rebuild keeps a user's objects


@pytest.fixture
def built(tmp_path, tiny_run_config) -> Path:
    """results/ with one run and a database built from it."""
    results = tmp_path / "results"
    make_run(results, "a-00000000", tiny_run_config)
    write_manifest(results)
    assert build_cli(results) == 0
    return results


@pytest.mark.parametrize("statement, name", [
    ("CREATE TABLE icl_my_notes AS SELECT 'keep me' AS note", "icl_my_notes"),
    ("CREATE VIEW image_mlp_best AS SELECT * FROM runs WHERE status = 'completed'", "image_mlp_best"),
    ("CREATE SCHEMA mine; CREATE TABLE mine.runs AS SELECT 42 AS x", "runs"),
    ("CREATE MACRO my_score(a, b) AS a * 2 + b", "my_score"),
])
def test_a_rebuild_refuses_to_drop_a_users_object_named_like_lipflows(built, capsys, statement, name):
    """README (Failure behaviour): the build replaces --out only when it holds none of a user's own
    objects. A table named icl_… or a view named image_mlp_… that is no study table, a table named
    like one of lipflow's in a schema of the user's, a macro: the rebuild refuses (exit 2, one line)
    and leaves them in place."""
    db = built / "lipflow.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute(statement)
    capsys.readouterr()
    code = build_cli(built)
    err = capsys.readouterr().err
    with duckdb.connect(str(db), read_only=True) as con:
        objects = {n for (n,) in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name <> 'main' OR table_name LIKE 'icl_%' "
            "UNION ALL SELECT view_name FROM duckdb_views() WHERE NOT internal "
            "UNION ALL SELECT function_name FROM duckdb_functions() WHERE function_type = 'macro' "
            "AND NOT internal").fetchall()}
    assert code == 2 and err.count("\n") == 1, err
    assert name in objects


@pytest.mark.parametrize("statement, named", [
    ("CREATE SEQUENCE my_ids", "sequence 'my_ids'"),
    ("CREATE TYPE mood AS ENUM ('ok', 'not ok')", "type 'mood'"),
    ("CREATE INDEX my_index ON runs (run_id)", "index 'my_index'"),
    ("CREATE TRIGGER log_new_runs AFTER INSERT ON runs FOR EACH ROW INSERT INTO bench (bench) VALUES (NEW.run_id)",
     "trigger 'log_new_runs'"),  # DuckDB 2 keeps triggers; a rebuild dropped one without a word
    ("CREATE SCHEMA mine; CREATE TABLE mine.runs AS SELECT 42 AS x", "table 'mine.runs'"),
    ("CREATE SCHEMA mine", "schema 'mine'"),
])
def test_a_rebuild_names_a_users_object_of_any_kind(built, capsys, statement, named):
    """Whatever the kind of a user's object, the refusal names it (with its schema) and the database
    is left as it was."""
    db = built / "lipflow.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute(statement)
    before = db.read_bytes()
    capsys.readouterr()
    assert build_cli(built) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err, err
    assert db.read_bytes() == before


def test_an_out_that_is_not_utf8_is_one_line_naming_it(tmp_path, capsys):
    """DuckDB failed on a --out name that is not UTF-8 (bytes Python hands over as lone surrogates) with a
    bare 'RuntimeError: std::bad_cast' traceback, exit 1; it is refused before any work."""
    out = tmp_path / os.fsdecode(b"lipflow\xff.duckdb")
    assert lipflow.results.main(["build", "--out", str(out), "--manifest", str(tmp_path / "manifest.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out is not valid UTF-8 text (at byte" in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_rebuild_replaces_the_study_tables_it_made(tmp_path, tiny_run_config):
    """The study tables a build loads are lipflow's by their exact names: the next build replaces them."""
    results = tmp_path / "results"
    make_run(results, "a-00000000", tiny_run_config)
    write_manifest(results)
    table = results / "image_mlp" / "robustness.parquet"
    table.parent.mkdir()
    write_table_parquet(table, pa.table({"metric": ["certificate_l2"], "value": [15.0], "method": ["muon_soft_cap"],
                                         "epsilon": pa.array([None], pa.float64())}))
    assert build_cli(results, study_tables=[table]) == 0
    assert build_cli(results, study_tables=[table]) == 0


# ------------------------------------------------------------------------------------------ what the build loads


def test_runs_keeps_the_config_keys_of_every_run_not_only_the_first(tmp_path, tiny_run_config):
    """A run directory from before a config key existed (README: `masses`, `nesterov`… were added
    later; load_run fills them from their defaults) built together with a newer run: the ``runs``
    table has the newer run's key as a column (null for the older run), not only the first run's keys."""
    results = tmp_path / "results"
    older = {k: v for k, v in tiny_run_config.items() if k != "nesterov"}
    make_run(results, "a-00000000", older)  # sorts first
    make_run(results, "b-11111111", {**tiny_run_config, "nesterov": False})
    write_manifest(results)
    with duckdb.connect(str(build_here(results)), read_only=True) as con:
        columns = [c for (c,) in con.execute("SELECT column_name FROM information_schema.columns "
                                              "WHERE table_name = 'runs'").fetchall()]
        assert "nesterov" in columns
        assert con.execute("SELECT nesterov FROM runs WHERE run_id = 'b-11111111'").fetchone() == (False,)


@pytest.mark.parametrize("evals", [
    pa.table({"run_id": ["a-00000000"], "metric": ["loss"], "value": [1.5]}),  # no `eval` column
    pa.table({"run_id": ["a-00000000"], "eval": ["val"], "metric": ["loss"]}),  # no `value` column
    pa.table({"run_id": ["a-00000000"], "eval": ["val"], "metric": ["loss"], "value": ["1.5"]}),  # text values
], ids=["no_eval_column", "no_value_column", "text_values"])
def test_an_evaluation_table_without_its_columns_is_named(tmp_path, tiny_run_config, capsys, evals):
    """README: bad input to a stage stops it with one line naming the file. An evals.parquet that
    lacks the `eval` or `value` column, or holds `value` as text, is named (not a pyarrow "Field does
    not exist in schema" or a DuckDB binder error)."""
    results = tmp_path / "results"
    make_run(results, "a-00000000", tiny_run_config, evals=evals)
    write_manifest(results)
    code = build_cli(results)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "evals.parquet" in err, err


def test_a_run_directory_without_its_evaluation_table_is_named(tmp_path, tiny_run_config, capsys):
    """Every pipeline run has an evals.parquet (merge-evals writes an empty one for
    `evaluations.enabled: []`; the database rule has every run's as an input), as it has a
    train_metrics.parquet: one that is gone (here with its sidecar left behind) stops the build with
    one line naming it, never a run loaded without its evaluations (val_loss NULL)."""
    results = tmp_path / "results"
    run_dir = make_run(results, "a-00000000", tiny_run_config)
    (run_dir / "evals.parquet").unlink()
    write_manifest(results)
    code = build_cli(results)
    err = capsys.readouterr().err
    assert code == 2 and "evals.parquet" in err, err


def test_the_build_loads_no_study_table_its_command_does_not_ask_for(tmp_path, tiny_run_config, monkeypatch):
    """The build loads the study tables named by --study-tables only: a results/icl table left by an
    earlier config (the ICL study since switched off) never lands in the database as icl_* to feed the
    icl_vs_pgd view as if it were this config's."""
    results = tmp_path / "results"
    make_run(results, "a-00000000", tiny_run_config)
    write_manifest(results)
    (results / "icl").mkdir()
    write_table_parquet(results / "icl" / "loss_by_layers.parquet",
                        pa.table({"method": ["transformer"], "n_layers": [1], "n": [20], "loss": [0.5]}))
    monkeypatch.chdir(tmp_path)
    assert build_cli(Path("results")) == 0
    with duckdb.connect(str(results / "lipflow.duckdb"), read_only=True) as con:
        tables = {t for (t,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert "icl_loss_by_layers" not in tables


@pytest.mark.parametrize("name", ["notes/mine.parquet", "icl/summary.parquet"],
                         ids=["no_study", "no_table_of_the_study"])
def test_a_study_table_of_another_name_is_refused(tmp_path, tiny_run_config, capsys, name):
    """--study-tables takes lipflow's study tables only (a table of another name would be one the
    next rebuild refuses to drop): anything else is one line naming the file, before any work."""
    results = tmp_path / "results"
    make_run(results, "a-00000000", tiny_run_config)
    write_manifest(results)
    table = results / name
    table.parent.mkdir()
    write_table_parquet(table, pa.table({"x": [1]}))
    assert build_cli(results, study_tables=[table]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(table) in err, err
    assert not (results / "lipflow.duckdb").exists()


@pytest.mark.parametrize("overlay, tables", [("icl: {enabled: true}\n", [f"results/icl/{name}.parquet" for name in (
    "loss_by_layers", "loss_by_n", "preconditioner", "preconditioner_error", "step_sizes", "agreement", "training")]),
                                             ("", [])], ids=["icl_on", "icl_off"])
def test_the_database_rule_names_the_studies_tables_the_config_has_on(tmp_path, overlay, tables):
    """The database job's command line names the tables of the studies the config has on, and no
    other (a dry run, printing the job's command)."""
    (tmp_path / "config.yaml").write_text("runs: {}\n" + overlay)
    dry = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                          "database", "--configfile", str(tmp_path / "config.yaml"), "-c1", "-n",
                          "-p"], capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    command = next(line for line in dry.stdout.splitlines() if "lipflow.results build" in line)
    named = command.split("--study-tables", 1)[1].split(">", 1)[0].split()
    assert named == tables, command


# ------------------------------------------------------------------------------------------ views


def rank_run(results: Path, run_id: str, cfg: dict, b3: float, n_eval: int) -> None:
    """A rank_vs_n run: training metrics over all its steps, a val loss and the rank evaluation's rows."""
    steps = cfg["steps"]
    rows = [("val", "loss", 2.0, None, None, None),
            ("rank", "generalization_gap", 0.1, None, None, None),
            ("rank", "b3_rademacher_sum", b3, None, None, n_eval),
            ("rank", "numerical_rank", 4.0, "qk", 0.01, None),
            ("rank", "stable_rank", 3.0, "qk", None, None),
            ("rank", "edelman_norm_proxy", 5.0, None, None, None),
            ("rank", "spectrum_adaptive_proxy", 6.0, None, None, None)]
    evals = pa.table({"run_id": [run_id] * len(rows), "eval": [r[0] for r in rows], "metric": [r[1] for r in rows],
                      "value": [r[2] for r in rows], "matrix": pa.array([r[3] for r in rows], pa.string()),
                      "rtol": pa.array([r[4] for r in rows], pa.float64()),
                      "n": pa.array([r[5] for r in rows], pa.int64())})
    metrics = pa.table({"run_id": [run_id] * steps, "step": list(range(1, steps + 1)), "loss": [1.5] * steps})
    make_run(results, run_id, cfg, steps=steps, evals=evals, metrics=metrics)


@pytest.mark.parametrize("train_tokens, n_tokens, n_sequences", [(2048, 100, 6), (64, 64, 4), (None, 100, 6)])
def test_rank_bound_counts_the_tokens_a_run_trained_on(tmp_path, tiny_run_config, train_tokens, n_tokens,
                                                       n_sequences):
    """table_rank_bound.rst: n_sequences = ⌊training tokens / context⌋. A run trains on the first
    min(train_tokens, split size) tokens (TokenShards.num_tokens; all of the split without
    train_tokens), and the rank evaluation's n is the split's (6 windows of 16 here): a train_tokens
    above the 100-token split counts 100 tokens, not 2048, and the B3 bound is rescaled to that n."""
    results = tmp_path / "results"
    cfg = {**tiny_run_config, "experiment": "rank_vs_n", "train_tokens": train_tokens}  # context 16
    rank_run(results, "rank.n-00000000", cfg, b3=12.0, n_eval=100 // 16)
    write_manifest(results)  # one train shard of 100 tokens
    with duckdb.connect(str(build_here(results)), read_only=True) as con:
        row = con.execute("SELECT n_tokens, n_sequences, b3_bound FROM rank_bound").fetchone()
    assert row[:2] == (n_tokens, n_sequences)
    assert math.isclose(row[2], 12.0 * math.sqrt(6 / n_sequences))


# ------------------------------------------------------------------------------------------ merge-evals


@pytest.mark.parametrize("run_ids, values", [(["r-0000000a", None], [1.0, 0.5]),
                                             (["r-0000000a", "r-0000000a"], ["1.0", "0.5"])],
                         ids=["null_run_id", "text_values"])
def test_merge_evals_refuses_a_table_that_is_no_evaluation_table_in_one_line(tmp_path, capsys, run_ids, values):
    """README: merge-evals takes only evaluation tables of one run; anything else (a row without a
    run_id, text values) is one line naming the file, and nothing is written."""
    write_table_parquet(tmp_path / "val.parquet", pa.table({"run_id": run_ids, "eval": ["val", "val"],
                                                           "metric": ["loss", "accuracy"], "value": values}))
    code = lipflow.results.main(["merge-evals", "--run-id", "r-0000000a", "--out", str(tmp_path / "evals.parquet"),
                                 str(tmp_path / "val.parquet")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "val.parquet" in err, err
    assert not (tmp_path / "evals.parquet").exists()


# ------------------------------------------------------------------------------------------ figures


def test_plots_on_a_database_without_lipflow_views_is_one_line(tmp_path, capsys):
    """`python -m lipflow.plots --db X` on a database that is not a lipflow database (or one built
    before a view existed) is one line `lipflow: error: …` naming the database and the view, exit 2."""
    from lipflow.results.figures import main

    db = tmp_path / "other.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute("CREATE TABLE t (x INTEGER)")
    code = main(["--db", str(db), "--out-dir", str(tmp_path / "figures"), "--experiment", "precision"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "other.duckdb" in err or "precision" in err, err
    assert err.startswith("lipflow: error: ") and "other.duckdb" in err and "precision" in err, err


def test_a_users_figure_that_mentions_lipflow_is_not_replaced(tmp_path, tiny_run_config, capsys):
    """README: the plots replace only figures lipflow drew (marked in their PNG/SVG metadata). A user's
    own PNG whose Title metadata mentions lipflow carries no mark: it is refused (exit 2) and left as it was."""
    from lipflow.results.figures import main
    from lipflow.results.plotting import pyplot

    results = tmp_path / "results"
    cfg = {**tiny_run_config, "experiment": "lipschitz_tradeoff"}
    make_run(results, "tradeoff.a-00000000", cfg, lipschitz_bound=3.0, max_activation=2.0)
    make_run(results, "tradeoff.b-11111111", cfg, lipschitz_bound=5.0, max_activation=2.0)
    write_manifest(results)
    assert build_cli(results) == 0
    figures = tmp_path / "figures"
    figures.mkdir()
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    fig.savefig(figures / "tradeoff_accuracy.png", metadata={"Title": "my lipflow runs, annotated by hand"})
    plt.close(fig)
    before = hashlib.sha256((figures / "tradeoff_accuracy.png").read_bytes()).hexdigest()
    capsys.readouterr()
    code = main(["--db", str(results / "lipflow.duckdb"), "--out-dir", str(figures),
                 "--experiment", "lipschitz_tradeoff"])
    after = hashlib.sha256((figures / "tradeoff_accuracy.png").read_bytes()).hexdigest()
    assert after == before
    assert code == 2


@pytest.mark.parametrize("fmt", ["png", "svg"])
def test_the_figure_mark_is_lipflows_metadata_only(tmp_path, fmt):
    """A figure lipflow wrote carries its mark; a user's figure naming lipflow in its title or as
    another program does not."""
    from lipflow.results.plotting import is_lipflow_figure, pyplot, write_figure

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    write_figure(fig, tmp_path / f"ours.{fmt}", fmt)
    other = {"png": {"Title": "lipflow", "Software": "lipflow-fork"}, "svg": {"Title": "lipflow"}}[fmt]
    fig.savefig(tmp_path / f"theirs.{fmt}", format=fmt, metadata=other)
    plt.close(fig)
    assert is_lipflow_figure(tmp_path / f"ours.{fmt}")
    assert not is_lipflow_figure(tmp_path / f"theirs.{fmt}")


# ------------------------------------------------------------------------------------------ load_run


def loadable_run(results: Path, run_id: str, cfg: dict, **kwargs) -> Path:
    """A run directory load_run accepts: make_run's files plus checksummed weights of a fresh model."""
    from lipflow.config import run_defaults
    from lipflow.model import build_model
    from lipflow.train.checkpoint import save_weights

    run_dir = make_run(results, run_id, cfg, **kwargs)
    model = build_model(run_defaults(**cfg), 10)
    save_weights(run_dir / "model.safetensors", model.state_dict(), {"config": cfg, "vocab_size": 10})
    return run_dir


def test_load_run_names_config_json_when_it_lacks_data_dir(tmp_path, tiny_run_config):
    """README: a JSON file of lipflow's that lacks a key is an error naming the file: load_run (and so
    `lipflow sample`) on a config.json without data_dir names config.json and the key."""
    results = tmp_path / "results"
    run_dir = loadable_run(results, "tiny-00000000", tiny_run_config)
    info = json.loads((run_dir / "config.json").read_text())
    del info["data_dir"]
    (run_dir / "config.json").write_text(json.dumps(info))
    with pytest.raises(Exception) as caught:
        lipflow.load_run("tiny-00000000", results=results, device="cpu")
    assert "config.json" in str(caught.value), repr(caught.value)
    assert "data_dir" in str(caught.value), repr(caught.value)
    from conftest import run_stage

    sample = run_stage("lipflow.cli", "sample", "tiny-00000000", "--results", str(results), "--prompt", "x",
                       "--device", "cpu")
    assert sample.returncode == 2 and f"{run_dir / 'config.json'}: missing key 'data_dir'" in sample.stderr, sample.stderr


@pytest.mark.parametrize("foreign", ["train_metrics.parquet", "run.json"])
def test_load_run_refuses_files_of_another_run(tmp_path, tiny_run_config, foreign):
    """As the database build does ("a run directory holds the run it is named after"), load_run
    refuses a run.json or train_metrics.parquet of another run in the run's folder, naming the file,
    instead of returning them as this run's .summary / .metrics."""
    results = tmp_path / "results"
    run_dir = loadable_run(results, "tiny-00000000", tiny_run_config)
    other = make_run(results, "other-11111111", tiny_run_config)
    for name in (foreign, f"{foreign}.sha256"):
        if (other / name).exists():
            (run_dir / name).write_bytes((other / name).read_bytes())
    with pytest.raises(Exception) as caught:
        run = lipflow.load_run("tiny-00000000", results=results, device="cpu")
        print(run.summary["run_id"], run.metrics.run_id.unique())
    assert foreign in str(caught.value), repr(caught.value)


def test_load_run_refuses_a_run_json_its_checksummed_metrics_contradict(tmp_path, tiny_run_config):
    """As the database build does, load_run refuses a completed run's run.json whose bound or final val
    loss is not what its checksummed metrics say at the final step: .summary gave the edited numbers
    (a bound of 1.5) that the build refused to load."""
    metrics = pa.table({"run_id": ["tiny-00000000"] * 5, "step": [1, 2, 3, 4, 5], "loss": [1.0] * 5,
                        "val_loss": [None] * 4 + [2.5], "lipschitz_bound": [None] * 4 + [7.25]})
    results = tmp_path / "results"
    run_dir = loadable_run(results, "tiny-00000000", tiny_run_config, metrics=metrics, final_val_loss=2.5,
                           lipschitz_bound=7.25)
    assert lipflow.load_run("tiny-00000000", results=results, device="cpu").summary["lipschitz_bound"] == 7.25
    summary = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**summary, "lipschitz_bound": 1.5}))
    with pytest.raises(ValueError, match=re.escape(f"{run_dir / 'run.json'}: lipschitz_bound is 1.5, but its "
                                                   "train_metrics say 7.25 at the final step 5 (edited?)")):
        lipflow.load_run("tiny-00000000", results=results, device="cpu")


def test_load_run_given_a_run_name_lists_that_names_run_ids(tmp_path, tiny_run_config):
    """A user knows the name from config.yaml, not the hash: `lipflow sample tiny` said only that 'tiny'
    is not a run id; the one line now names the finished runs of that name (not 'tiny.x')."""
    from conftest import run_stage

    results = tmp_path / "results"
    for run_id in ("tiny-00000000", "tiny-11111111", "tiny.x-22222222"):
        make_run(results, run_id, tiny_run_config)
    with pytest.raises(ValueError, match=r"'tiny' is a run name, not a run id; .*: tiny-00000000, tiny-11111111$"):
        lipflow.load_run("tiny", results=results, device="cpu")
    sample = run_stage("lipflow.cli", "sample", "tiny", "--results", str(results), "--prompt", "x")
    assert sample.returncode == 2 and sample.stderr.count("\n") == 1 and "tiny-11111111" in sample.stderr, sample.stderr


def test_load_run_names_the_device_argument(tmp_path, tiny_run_config):
    """A device torch does not know is a ValueError naming the `device` argument, not torch's RuntimeError."""
    results = tmp_path / "results"
    loadable_run(results, "tiny-00000000", tiny_run_config)
    with pytest.raises(ValueError, match="device: 'tpu'"):
        lipflow.load_run("tiny-00000000", results=results, device="tpu")


@pytest.mark.parametrize("device", ["meta", "meta:0"])
def test_load_run_refuses_the_meta_device_naming_the_device_argument(tmp_path, tiny_run_config, device):
    """The meta device, where a model's tensors hold no values, is a one-line ValueError naming the
    `device` argument, never a Run whose model has no weights."""
    results = tmp_path / "results"
    loadable_run(results, "tiny-00000000", tiny_run_config)
    with pytest.raises(ValueError, match=rf"^device: '{device}' holds no tensor values") as caught:
        lipflow.load_run("tiny-00000000", results=results, device=device)
    assert "\n" not in str(caught.value)


def test_weights_of_another_shape_are_one_line_naming_the_checkpoint(tmp_path, tiny_run_config):
    """Checksummed weights holding a tensor of another shape under one of the model's parameter names
    (a model class whose layer changed shape since training) are a CheckpointError naming the file and
    the parameter, and `lipflow sample` one line with exit code 2, never torch's traceback."""
    import torch

    from conftest import run_stage
    from lipflow.config import run_defaults
    from lipflow.errors import CheckpointError
    from lipflow.model import build_model
    from lipflow.train.checkpoint import save_weights

    results = tmp_path / "results"
    run_dir = loadable_run(results, "tiny-00000000", tiny_run_config)
    tensors = build_model(run_defaults(**tiny_run_config), 10).state_dict()
    name = next(key for key, tensor in tensors.items() if tensor.dim() == 2)
    tensors[name] = torch.zeros(3, 3)
    save_weights(run_dir / "model.safetensors", tensors, {"config": tiny_run_config, "vocab_size": 10})
    with pytest.raises(CheckpointError, match=name) as caught:
        lipflow.load_run("tiny-00000000", results=results, device="cpu")
    assert str(run_dir / "model.safetensors") in str(caught.value) and "\n" not in str(caught.value)
    sample = run_stage("lipflow.cli", "sample", "tiny-00000000", "--results", str(results), "--prompt", "x",
                       "--device", "cpu")
    assert sample.returncode == 2 and sample.stderr.count("\n") == 1 and name in sample.stderr, sample.stderr


@pytest.mark.parametrize("forged, named", [({"n_heads": "x"}, "config.n_heads: 'x' is not of type 'integer'"),
                                            ({"n_heads": 3}, "config.n_heads: 3 does not divide d_model 32"),
                                            ({"n_layers": None}, "config.n_layers: empty (null), not of type 'integer'"),
                                            ([1, 2], "stores a config that is no mapping")])
def test_weights_resealed_with_an_invalid_config_are_one_line_naming_the_weights(tmp_path, tiny_run_config,
                                                                                  forged, named):
    """Weights forged with an invalid stored config (config.json edited to agree, the sidecar resealed)
    are a CheckpointError naming model.safetensors and the key, never torch's or the model's traceback."""
    from lipflow.config import run_defaults
    from lipflow.errors import CheckpointError
    from lipflow.model import build_model
    from lipflow.train.checkpoint import save_weights

    results = tmp_path / "results"
    run_dir = loadable_run(results, "tiny-00000000", tiny_run_config)
    config = {**tiny_run_config, **forged} if isinstance(forged, dict) else forged
    save_weights(run_dir / "model.safetensors", build_model(run_defaults(**tiny_run_config), 10).state_dict(),
                 {"config": config, "vocab_size": 10})
    if isinstance(forged, dict):
        info = json.loads((run_dir / "config.json").read_text())
        (run_dir / "config.json").write_text(json.dumps({**info, "config": config}))
    with pytest.raises(CheckpointError, match=re.escape(named)) as caught:
        lipflow.load_run("tiny-00000000", results=results, device="cpu")
    assert str(run_dir / "model.safetensors") in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("vocab_size", ["x", -3, 0])
def test_weights_resealed_with_a_forged_vocab_size_are_one_line_naming_the_weights(tmp_path, tiny_run_config,
                                                                                   vocab_size):
    """A vocabulary size that is no positive integer (config.json and the weights forged to agree) is a
    CheckpointError naming model.safetensors, not torch's TypeError or RuntimeError from the embedding."""
    from lipflow.errors import CheckpointError
    from lipflow.train.checkpoint import save_weights

    results = tmp_path / "results"
    run_dir = loadable_run(results, "tiny-00000000", tiny_run_config)
    save_weights(run_dir / "model.safetensors", {}, {"config": tiny_run_config, "vocab_size": vocab_size})
    info = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**info, "vocab_size": vocab_size}))
    with pytest.raises(CheckpointError, match=f"stores vocab_size {re.escape(repr(vocab_size))}, not a vocabulary"):
        lipflow.load_run("tiny-00000000", results=results, device="cpu")


def test_a_stored_config_with_a_key_the_schema_no_longer_has_still_loads(tmp_path, tiny_run_config):
    """The stored config is checked as a run's for the keys today's schema knows: a run trained when the
    schema had a key since removed loads (its model never read that key), rather than being refused."""
    from lipflow.config import run_defaults
    from lipflow.model import build_model
    from lipflow.train.checkpoint import save_weights

    results = tmp_path / "results"
    run_dir = loadable_run(results, "tiny-00000000", tiny_run_config)
    config = {**tiny_run_config, "retired_knob": 1}
    model = build_model(run_defaults(**tiny_run_config), 10)
    save_weights(run_dir / "model.safetensors", model.state_dict(), {"config": config, "vocab_size": 10})
    info = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**info, "config": config}))
    run = lipflow.load_run("tiny-00000000", results=results, device="cpu")
    import torch

    assert all(torch.equal(a, b) for a, b in zip(run.model.state_dict().values(), model.state_dict().values()))


def test_the_build_refuses_a_manifest_other_than_the_runs(tmp_path, tiny_run_config, capsys):
    """A run's config.json records the sha256 of the token manifest it trained on; a build given
    another manifest (whose shards table would describe data the run never saw) is one line naming
    --manifest and the run, and the recorded manifest builds."""
    results = tmp_path / "results"
    run_dir = make_run(results, "a-00000000", tiny_run_config)
    manifest = write_manifest(results)
    info = json.loads((run_dir / "config.json").read_text())
    info["manifest_sha256"] = hashlib.sha256(b"other shards").hexdigest()
    (run_dir / "config.json").write_text(json.dumps(info))
    assert build_cli(results) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lipflow: error: --manifest {manifest} is not the token manifest run 'a-00000000'"), err
    assert len(err.splitlines()) == 1 and not (results / "lipflow.duckdb").exists()
    info["manifest_sha256"] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    (run_dir / "config.json").write_text(json.dumps(info))
    assert build_cli(results) == 0


def test_the_build_refuses_a_config_json_edited_after_training(tmp_path, tiny_run_config, capsys):
    """run.json records the hash of the config the run trained with; a config.json edited since
    (lr, constraint…) would put another run's settings into ``runs``: one line naming the file."""
    from lipflow.provenance import config_hash

    results = tmp_path / "results"
    run_dir = make_run(results, "a-00000000", tiny_run_config, config_hash=config_hash(tiny_run_config))
    write_manifest(results)
    assert build_cli(results) == 0
    info = json.loads((run_dir / "config.json").read_text())
    info["config"]["lr"] = info["config"]["lr"] * 10
    (run_dir / "config.json").write_text(json.dumps(info))
    assert build_cli(results) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lipflow: error: {run_dir / 'config.json'}: its config is not the one run 'a-00000000' "
                          "trained with"), err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("bound, edit, words", [
    (7.25, {"steps_completed": 5000}, "steps_completed is 5000, but its train_metrics end at step 5"),
    (7.25, {"lipschitz_bound": 1.5}, "lipschitz_bound is 1.5, but its train_metrics say 7.25 at the final step 5"),
    (7.25, {"final_val_loss": 0.5}, "final_val_loss is 0.5, but its train_metrics say 2.5 at the final step 5"),
    # each was accepted: a bound for a model without a certificate (its metrics have none), none for one with
    # it, and the final val accuracy and largest activation, which were not compared at all
    (None, {"lipschitz_bound": 1.5}, "lipschitz_bound is 1.5, but its train_metrics say None at the final step 5"),
    (7.25, {"lipschitz_bound": None}, "lipschitz_bound is None, but its train_metrics say 7.25 at the final step 5"),
    (7.25, {"final_val_accuracy": 0.99},
     "final_val_accuracy is 0.99, but its train_metrics say 0.25 at the final step 5"),
    (7.25, {"max_activation": 0.5}, "max_activation is 0.5, but its train_metrics say 3.0 at the final step 5"),
])
def test_the_build_refuses_a_run_json_its_checksummed_metrics_contradict(tmp_path, tiny_run_config, capsys, bound,
                                                                         edit, words):
    """run.json has no sidecar; a completed run's steps, final val loss and accuracy, bound and largest
    activation must be what its checksummed metrics say at the final (eval) step, so a hand edit is one
    line, not a fact in `runs`."""
    metrics = pa.table({"run_id": ["a-00000000"] * 5, "step": [1, 2, 3, 4, 5], "loss": [1.0] * 5,
                        "val_loss": [None, None, None, None, 2.5], "val_accuracy": [None] * 4 + [0.25],
                        "lipschitz_bound": pa.array([None] * 4 + [bound], pa.float64()),
                        "max_activation": [None] * 4 + [3.0]})
    results = tmp_path / "results"
    run_dir = make_run(results, "a-00000000", tiny_run_config, metrics=metrics, final_val_loss=2.5,
                       final_val_accuracy=0.25, lipschitz_bound=bound, max_activation=3.0)
    write_manifest(results)
    assert build_cli(results) == 0
    summary = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**summary, **edit}))
    assert build_cli(results) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lipflow: error: {run_dir / 'run.json'}: {words} (edited?)", err


@pytest.mark.parametrize("status", ["x", "Completed", ""])
def test_the_build_refuses_a_run_json_status_the_trainer_never_writes(tmp_path, tiny_run_config, capsys, status):
    """A completed run edited to another status skipped every consistency check and counted in no view
    that reads 'completed' or 'diverged': one line naming the file, and the database is not written."""
    results = tmp_path / "results"
    run_dir = make_run(results, "a-00000000", tiny_run_config)
    write_manifest(results)
    summary = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**summary, "status": status}))
    assert build_cli(results) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lipflow: error: {run_dir / 'run.json'}: status is {status!r}, none of completed, diverged", err
    assert not (results / "lipflow.duckdb").exists()


def test_the_trainer_cannot_write_a_status_the_build_refuses():
    from lipflow.train.summary import RUN_KEY_FIELDS, RUN_SUMMARY_FIELDS, run_summary

    fields = {name: None for name in {**RUN_KEY_FIELDS, **RUN_SUMMARY_FIELDS}}
    assert run_summary(**{**fields, "status": "diverged"})["status"] == "diverged"
    with pytest.raises(ValueError, match="run.json status 'stopped' is none of completed, diverged"):
        run_summary(**{**fields, "status": "stopped"})


def test_the_catalog_of_objects_skips_a_catalog_function_this_duckdb_lacks(monkeypatch):
    """duckdb_triggers() came with DuckDB 2; under the DuckDB 1.x that pyproject allows (>=1.1) its
    query failed with a CatalogException, so every rebuild of an existing database stopped."""
    import duckdb

    from lipflow.results import database

    monkeypatch.setattr(database, "CATALOG_OBJECTS",
                        (*database.CATALOG_OBJECTS[:-1], ("trigger", "duckdb_no_such_catalog()", "trigger_name"),
                         database.CATALOG_OBJECTS[-1]))
    with duckdb.connect() as con:
        con.execute("CREATE TABLE mine (x INTEGER)")
        assert ("table", "main", "mine") in database.database_objects(con)


@pytest.mark.parametrize("device", ["cuda:0", None])
def test_load_run_names_the_device_argument_for_any_cuda_device_or_none(tmp_path, tiny_run_config, monkeypatch,
                                                                       device):
    """A CUDA device with an index (``cuda:0``) on a machine without CUDA, like ``cuda``, and a device that is
    not a name at all (None) are a ValueError naming `device`, not torch's AssertionError ("Torch not compiled
    with CUDA enabled") from moving the model or its multi-line TypeError."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    results = tmp_path / "results"
    loadable_run(results, "tiny-00000000", tiny_run_config)
    with pytest.raises(ValueError, match=r"^device: ") as caught:
        lipflow.load_run("tiny-00000000", results=results, device=device)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("run_id", [Path("tiny-00000000"), 5])
def test_load_run_names_run_id_when_it_is_no_string(tmp_path, tiny_run_config, run_id):
    """A run id given as a Path (or any non-string) is the ConfigError naming `run_id` that a path string
    gets, not re's "expected string or bytes-like object" TypeError."""
    from lipflow.errors import ConfigError

    results = tmp_path / "results"
    loadable_run(results, "tiny-00000000", tiny_run_config)
    with pytest.raises(ConfigError, match=r"^run_id: .* is not a run id"):
        lipflow.load_run(run_id, results=results, device="cpu")


def test_a_run_moves_to_another_device_with_its_device_field(tmp_path, tiny_run_config):
    """``run.to(device)`` moves the model and records the device, so ``torch.tensor(ids, device=run.device)``
    keeps meeting the model; a device that cannot be used is the one-line ValueError load_run gives, and the
    run stays where it was."""
    import torch

    results = tmp_path / "results"
    loadable_run(results, "tiny-00000000", tiny_run_config)
    run = lipflow.load_run("tiny-00000000", results=results, device="cpu")
    for refused in ["meta", "tpu"] + ([] if torch.cuda.is_available() else ["cuda"]):
        with pytest.raises(ValueError, match=rf"^device: '{refused}'"):
            run.to(refused)
    assert run.device == torch.device("cpu")
    target = "cuda" if torch.cuda.is_available() else "cpu"
    assert run.to(target) is run and run.device.type == target
    assert {p.device.type for p in run.model.parameters()} == {target}
    with torch.no_grad():
        assert run.model(torch.tensor([[1, 2, 3]], device=run.device)).device.type == target


def test_a_users_object_added_while_the_build_runs_is_not_dropped(built, capsys, monkeypatch):
    """The database is checked for a user's objects before the build and again just before the swap:
    a table a user made in it while a (long) build ran was dropped by the rename without a word."""
    import lipflow.results.database as database

    db = built / "lipflow.duckdb"
    check_database = database.check_database

    def add_notes_then_check(path, rows):  # the user's session, between the first check and the swap
        with duckdb.connect(str(db)) as con:
            con.execute("CREATE TABLE my_notes AS SELECT 'keep me' AS note")
        check_database(path, rows)

    monkeypatch.setattr(database, "check_database", add_notes_then_check)
    capsys.readouterr()
    assert build_cli(built) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds table 'my_notes', which lipflow does not build" in err, err
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT note FROM my_notes").fetchall() == [("keep me",)]
    assert not [p.name for p in built.iterdir() if ".tmp-" in p.name]  # the build's temp database is gone
