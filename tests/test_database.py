"""The database build: file names are never SQL, every run file is checked against its sidecar,
and a build that fails (disk full, a check of the new file) leaves the previous database as it was."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lipflow.errors
import lipflow.results
import lipflow.results.database
import lipflow.data.parquet
from lipflow.data.parquet import write_table_parquet
from lipflow.results import SUMMARY_COLUMNS, build

from conftest import run_stage


def make_run(results: Path, run_id: str, cfg: dict, steps: int = 5) -> Path:
    """A finished-looking run directory (no weights: the build does not read them)."""
    run_dir = results / "runs" / run_id
    run_dir.mkdir(parents=True)
    summary = {k: None for k in SUMMARY_COLUMNS}
    summary.update(run_id=run_id, status="completed", versions={}, start_time=1.0, end_time=2.0, steps_completed=steps)
    (run_dir / "run.json").write_text(json.dumps(summary))
    (run_dir / "config.json").write_text(json.dumps({"run_id": run_id, "vocab_size": 10, "config": cfg}))
    write_table_parquet(run_dir / "train_metrics.parquet",
                        pa.table({"run_id": [run_id] * steps, "step": list(range(steps)), "loss": [1.0] * steps}))
    write_table_parquet(run_dir / "evals.parquet", pa.table({"run_id": [run_id], "eval": ["val"], "metric": ["loss"],
                                                            "value": [1.5]}))
    return run_dir


@pytest.fixture
def results(tmp_path, tiny_run_config) -> Path:
    """results/ with two runs and a manifest."""
    root = tmp_path / "results"
    for run_id in ("a-00000000", "b-11111111"):
        make_run(root, run_id, tiny_run_config)
    manifest = {"format": "lipflow-token-shards/1", "dtype": "uint16", "vocab_size": 10, "tokenizer": {},
                "splits": {"train": {"shards": [{"file": "train/shard-00000.arrow", "num_tokens": 100,
                                                 "sha256": "0" * 64}]}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def build_here(results: Path, out: Path | None = None) -> Path:
    out = out or results / "lipflow.duckdb"
    build(out, results / "manifest.json", sorted((results / "runs").iterdir()), results=results)
    return out


def bench_file(path: Path, value: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"bench": ["b"], "metric": ["m"], "value": [value], "unit": ["s"], "machine": ["x"],
                             "device": ["cpu"], "date": ["d"], "git_commit": ["c"]}), path)


def test_file_names_are_never_sql_or_globs(results):
    """A quote in a file name neither breaks nor injects; glob characters are literal."""
    bench_file(results / "bench" / "bob's_laptop.parquet", 1.0)
    bench_file(results / "bench" / "x', 'y.parquet'); CREATE TABLE pwned AS SELECT 42; --.parquet", 2.0)
    bench_file(results / "bench" / "g[1].parquet", 3.0)
    bench_file(results / "bench" / "g1.parquet", 4.0)
    icl = results / "icl" / 'loss"; DROP TABLE runs; --.parquet'
    icl.parent.mkdir()
    write_table_parquet(icl, pa.table({"x": [1, 2]}))
    db = build_here(results)
    with duckdb.connect(str(db), read_only=True) as con:
        tables = {name for (name,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        assert sorted(v for (v,) in con.execute("SELECT value FROM bench").fetchall()) == [1.0, 2.0, 3.0, 4.0]
        assert con.execute("SELECT count(*) FROM runs").fetchone() == (2,)
        assert con.execute('SELECT count(*) FROM "icl_loss""; DROP TABLE runs; --"').fetchone() == (2,)
    assert "pwned" not in tables


@pytest.mark.parametrize("damage", ["flip", "no_sidecar"])
def test_damaged_metrics_stop_the_build_naming_the_file(results, damage):
    previous = build_here(results).read_bytes()
    metrics = results / "runs" / "b-11111111" / "train_metrics.parquet"
    if damage == "flip":
        data = bytearray(metrics.read_bytes())
        data[len(data) // 2] ^= 0x01
        metrics.write_bytes(bytes(data))
    else:
        Path(f"{metrics}.sha256").unlink()
    done = run_stage("lipflow.results", "build", "--out", str(results / "lipflow.duckdb"), "--manifest",
                     str(results / "manifest.json"), "--run-dirs", *map(str, sorted((results / "runs").iterdir())),
                     cwd=results.parent)
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1 and str(metrics) in done.stderr, done.stderr
    assert (results / "lipflow.duckdb").read_bytes() == previous
    assert sorted(p.name for p in results.glob(".lipflow.duckdb*")) == []


class _Connection:
    """A DuckDB connection whose final checkpoint does not complete, as on a full disk: close()
    returns without error and the data stays in the write-ahead log."""

    connect = duckdb.connect

    def __init__(self, path: str):
        self._con, self._path = _Connection.connect(path), path

    def __getattr__(self, name):
        return getattr(self._con, name)

    def close(self):
        self._con.close()
        Path(f"{self._path}.wal").write_bytes(b"unflushed")


def test_a_checkpoint_that_does_not_complete_keeps_the_previous_database(results, monkeypatch, capsys):
    db = build_here(results)
    previous = db.read_bytes()
    make_run(results, "c-22222222", json.loads((results / "runs" / "a-00000000" / "config.json").read_text())["config"])
    monkeypatch.setattr(duckdb, "connect", lambda path, **kw: _Connection(path) if not kw
                        else _Connection.connect(path, **kw))
    code = lipflow.results.main(["build", "--out", str(db), "--manifest", str(results / "manifest.json"),
                                 "--run-dirs", *map(str, sorted((results / "runs").iterdir()))])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"{db} left as it was" in err and ".wal remains" in err
    assert db.read_bytes() == previous
    assert list(results.glob(".lipflow.duckdb*")) == []


def test_a_table_that_lost_rows_is_not_published(results, monkeypatch):
    """The reopened temp database is checked against the rows that went in."""
    db = build_here(results)
    previous = db.read_bytes()
    real = lipflow.results.database._fill_database
    monkeypatch.setattr(lipflow.results.database, "_fill_database", lambda *a: {**real(*a), "train_metrics": 11})
    with pytest.raises(lipflow.errors.StageError, match="table train_metrics holds 10 rows, expected 11"):
        build_here(results)
    assert db.read_bytes() == previous


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_keeps_the_previous_database(results, tmp_path):
    """A real full disk (a 4 MiB tmpfs; needs root): the build fails with one line and the
    previous database stays readable with its rows."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "4m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        db = build_here(results, disk / "lipflow.duckdb")
        previous = db.read_bytes()
        (disk / "filler").write_bytes(b"\0" * (4 * 1024 * 1024 - db.stat().st_size - 300 * 1024))
        big = results / "runs" / "big-33333333"
        cfg = json.loads((results / "runs" / "a-00000000" / "config.json").read_text())["config"]
        make_run(results, "big-33333333", cfg, steps=50_000)
        done = run_stage("lipflow.results", "build", "--out", str(db), "--manifest", str(results / "manifest.json"),
                         "--run-dirs", *map(str, sorted((results / "runs").iterdir())), cwd=tmp_path)
        assert done.returncode != 0 and done.stderr.count("\n") == 1, done.stderr
        assert "left as it was" in done.stderr
        assert db.read_bytes() == previous
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "lipflow.duckdb"]
        with duckdb.connect(str(db), read_only=True) as con:
            assert con.execute("SELECT count(*) FROM runs").fetchone() == (2,)
        assert big.is_dir()
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_failed_database_rule_keeps_the_previous_database(tmp_path):
    """Under Snakemake, which deletes a job's outputs before it runs: the database is an update()
    output, so a rebuild that fails leaves the previous database in place and readable; its
    receipt is gone, so the next run rebuilds it (never "Nothing to be done" on a failed build)."""
    import sys

    repo = Path(__file__).resolve().parent.parent
    (tmp_path / "config.yaml").write_text("runs: {}\n")  # data steps and database only: no training

    def snakemake(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "-d", str(tmp_path),
                               "--configfile", str(tmp_path / "config.yaml"), "-c1", *args, "results/lipflow.duckdb",
                               "results/lipflow.duckdb.built"],
                              capture_output=True, text=True, timeout=300)

    assert snakemake().returncode == 0
    db = tmp_path / "results" / "lipflow.duckdb"
    previous = db.read_bytes()
    bad = tmp_path / "results" / "icl" / "loss_by_n.parquet"  # no sidecar: the build refuses it
    bad.parent.mkdir()
    pq.write_table(pa.table({"x": [1]}), bad)
    failed = snakemake("--forcerun", "database")
    assert failed.returncode != 0
    assert "loss_by_n.parquet has no checksum file" in (tmp_path / "results" / "logs" / "database.log").read_text()
    assert db.read_bytes() == previous
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM shards").fetchone()[0] > 0
    assert "Missing output files: results/lipflow.duckdb.built" in snakemake("-n").stdout
    bad.unlink()
    assert snakemake().returncode == 0
    receipt = json.loads((tmp_path / "results" / "lipflow.duckdb.built").read_text())
    assert receipt["rows"]["shards"] > 0 and receipt["sha256"] == hashlib.sha256(db.read_bytes()).hexdigest()


@pytest.mark.parametrize("study, table", [("image_mlp", "results/image_mlp/robustness.parquet"),
                                          ("icl", "results/icl/loss_by_n.parquet")])
def test_the_database_waits_for_the_study_tables_it_loads(tmp_path, study, table):
    """The build loads results/<study>/*.parquet when it exists: the database rule names the study's
    tables as inputs, so a dry run of the database plans the study's job (not left to job order)."""
    import sys

    repo = Path(__file__).resolve().parent.parent
    turn_on = {"image_mlp": "experiments: [robustness]\n", "icl": "icl: {enabled: true}\n"}[study]
    (tmp_path / "config.yaml").write_text("runs: {}\n" + turn_on)
    dry = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "-d", str(tmp_path),
                          "results/lipflow.duckdb.built", "--configfile", str(tmp_path / "config.yaml"), "-c1", "-n"],
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    database_inputs = dry.stdout[dry.stdout.index("rule database:"):].splitlines()[1]
    assert database_inputs.startswith("    input: ") and table in database_inputs.split(", ")


def test_a_run_without_evaluations_merges_to_an_empty_table_the_build_loads(results):
    """evaluations.enabled: [] leaves a run with no evaluation files: merge-evals writes an empty table
    with the evaluation columns (which a rerun may replace), and the database loads the run."""
    from lipflow.results.cli import EVALUATION_COLUMNS, is_evaluation_table, merge_evals

    out = results / "runs" / "a-00000000" / "evals.parquet"
    out.unlink()
    merge_evals(out, [])
    merge_evals(out, [])  # its own earlier output is replaced
    table = lipflow.data.parquet.read_table_parquet(out)
    assert table.num_rows == 0 and tuple(table.column_names) == EVALUATION_COLUMNS and is_evaluation_table(out)
    with duckdb.connect(str(build_here(results)), read_only=True) as con:
        assert con.execute("SELECT run_id, val_loss FROM runs ORDER BY run_id").fetchall() == [
            ("a-00000000", None), ("b-11111111", 1.5)]


def test_seal_writes_missing_sidecars_and_checks_present_ones(tmp_path):
    old = tmp_path / "train_metrics.parquet"
    pq.write_table(pa.table({"step": [0]}), old)  # as written before lipflow kept Parquet checksums
    assert run_stage("lipflow.results", "seal", str(old)).returncode == 0
    assert Path(f"{old}.sha256").stat().st_mtime_ns == old.stat().st_mtime_ns  # reruns no Snakemake job
    from lipflow.data.parquet import read_table_parquet

    assert read_table_parquet(old).num_rows == 1
    old.write_bytes(old.read_bytes()[:-4])
    done = run_stage("lipflow.results", "seal", str(old))
    assert done.returncode == 2 and "train_metrics.parquet is corrupt" in done.stderr


def test_build_reports_its_views_on_stdout_and_leaves_stderr_to_errors(results):
    done = run_stage("lipflow.results", "build", "--out", str(results / "lipflow.duckdb"), "--manifest",
                     str(results / "manifest.json"), "--run-dirs", *map(str, sorted((results / "runs").iterdir())))
    assert done.returncode == 0 and done.stderr == "", done.stderr
    views = [line for line in done.stdout.splitlines() if line.startswith("view ")]
    assert views and all(line.endswith(": built") or ": empty: " in line for line in views), done.stdout


@pytest.mark.parametrize("name", ["manifest.json", "runs/a-00000000/run.json", "runs/a-00000000/config.json"])
def test_a_truncated_json_file_is_named(results, name):
    build_here(results)
    path = results / name
    path.write_text(path.read_text()[:25])
    done = run_stage("lipflow.results", "build", "--out", str(results / "lipflow.duckdb"), "--manifest",
                     str(results / "manifest.json"), "--run-dirs", *map(str, sorted((results / "runs").iterdir())))
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert f"{path} is not valid JSON" in done.stderr, done.stderr
