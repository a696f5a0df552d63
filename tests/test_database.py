"""The database build: file names are never SQL, every run file is checked against its sidecar,
and a build that fails (disk full, a check of the new file) leaves the previous database as it was."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lipflow.errors
import lipflow.results
import lipflow.results.cli
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
                        pa.table({"run_id": [run_id] * steps, "step": list(range(1, steps + 1)), "loss": [1.0] * steps}))
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


def test_the_pareto_view_shows_sigma_max_only_for_a_constraint_that_reads_it(tmp_path, tiny_run_config):
    """A lipschitz_tradeoff run whose weight constraint ignores sigma_max (none, weight_decay,
    spectral_weight_decay: they project onto no bound) showed the schema default 1.0 in the pareto view
    as if the run had been capped at 1.0; it is NULL there now, and the runs table keeps the config's value."""
    from lipflow.config.schema import SCHEMA_PATH, load_schema

    constraints = load_schema(SCHEMA_PATH)["$defs"]["run"]["properties"]["weight_constraint"]["enum"]
    root = tmp_path / "results"
    for i, constraint in enumerate(constraints):
        run_dir = make_run(root, f"tradeoff.{constraint}-0000000{i}",
                           {**tiny_run_config, "experiment": "lipschitz_tradeoff", "weight_constraint": constraint,
                            "sigma_max": 2.5})
        summary = json.loads((run_dir / "run.json").read_text())
        (run_dir / "run.json").write_text(json.dumps({**summary, "lipschitz_bound": 3.0 + i}))
    (root / "manifest.json").write_text(json.dumps({"format": "lipflow-token-shards/1", "dtype": "uint16",
                                                    "vocab_size": 10, "tokenizer": {}, "splits": {}}))
    with duckdb.connect(str(build_here(root)), read_only=True) as con:
        shown = dict(con.execute("SELECT weight_constraint, sigma_max FROM pareto").fetchall())
        assert con.execute("SELECT DISTINCT sigma_max FROM runs").fetchall() == [(2.5,)]
    assert shown == {"none": None, "weight_decay": None, "spectral_weight_decay": None, "spectral_normalize": 2.5,
                     "spectral_hammer": 2.5, "spectral_soft_cap": 2.5, "spectral_hard_cap": 2.5, "stiefel": 2.5}


def bench_file(path: Path, value: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"bench": ["b"], "metric": ["m"], "value": [value], "unit": ["s"], "machine": ["x"],
                             "device": ["cpu"], "date": ["d"], "git_commit": ["c"]}), path)


def test_file_names_are_never_sql_or_globs(results):
    """A quote in a file name neither breaks nor injects; glob characters are literal; a study table
    is loaded under its own name only (a file of another name is refused, naming it)."""
    bench_file(results / "bench" / "bob's_laptop.parquet", 1.0)
    bench_file(results / "bench" / "x', 'y.parquet'); CREATE TABLE pwned AS SELECT 42; --.parquet", 2.0)
    bench_file(results / "bench" / "g[1].parquet", 3.0)
    bench_file(results / "bench" / "g1.parquet", 4.0)
    icl = results / "icl" / 'loss"; DROP TABLE runs; --.parquet'
    icl.parent.mkdir()
    write_table_parquet(icl, pa.table({"x": [1, 2]}))
    with pytest.raises(ValueError, match="is no study table of lipflow's") as refused:
        build(results / "lipflow.duckdb", results / "manifest.json", sorted((results / "runs").iterdir()), [icl],
              results=results)
    assert str(icl) in str(refused.value)
    db = build_here(results)
    with duckdb.connect(str(db), read_only=True) as con:
        tables = {name for (name,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        assert sorted(v for (v,) in con.execute("SELECT value FROM bench").fetchall()) == [1.0, 2.0, 3.0, 4.0]
        assert con.execute("SELECT count(*) FROM runs").fetchone() == (2,)
    assert "pwned" not in tables and not any(name.startswith("icl_") for name in tables)



def test_the_files_tools_leave_in_the_bench_folder_are_no_bench_rows(results):
    """macOS writes an AppleDouble ._<name>.parquet beside each file it copies to a USB or network drive;
    the build read it as a bench table and failed ('not a readable Parquet file'), so a copied results tree
    had no database until the user found and deleted them. Such files are clutter (lipflow.atomic)."""
    bench_file(results / "bench" / "gpu.parquet", 1.0)
    (results / "bench" / "._gpu.parquet").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    with duckdb.connect(str(build_here(results)), read_only=True) as con:
        assert con.execute("SELECT value FROM bench").fetchall() == [(1.0,)]


def test_a_build_without_runs_needs_no_manifest_and_one_with_runs_does(results, tmp_path, capsys):
    """The database rule passes an empty ``--manifest`` when the config has no runs (the ICL study alone,
    which tokenizes no corpus): the build has a shards table with its columns and no rows, as the one of a
    manifest it reads; with ``--run-dirs`` it is one line naming --manifest and nothing is written."""
    alone = tmp_path / "alone.duckdb"
    assert lipflow.results.main(["build", "--out", str(alone), "--manifest", "--run-dirs"]) == 0
    full = build_here(results)
    columns = "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'shards'"
    with duckdb.connect(str(alone), read_only=True) as con, duckdb.connect(str(full), read_only=True) as ref:
        assert con.execute(columns).fetchall() == ref.execute(columns).fetchall() != []
        assert con.execute("SELECT count(*) FROM shards").fetchone() == (0,)
        assert con.execute("SELECT count(*) FROM runs").fetchone() == (0,)
    capsys.readouterr()
    refused = tmp_path / "refused.duckdb"
    code = lipflow.results.main(["build", "--out", str(refused), "--manifest", "--run-dirs",
                                 *map(str, sorted((results / "runs").iterdir()))])
    err = capsys.readouterr().err
    assert code == 2 and err == ("lipflow: error: --manifest: needed with --run-dirs (each run is checked against "
                                 "the token shards it was trained on)\n")
    assert not refused.exists() and list(tmp_path.glob(".refused.duckdb*")) == []


def test_the_build_reads_the_bench_rows_of_its_own_results_tree(results, tmp_path):
    """``python -m lipflow.results build --out TREE/lipflow.duckdb`` run from another folder (a moved or
    renamed results tree) loads TREE/bench/*.parquet, never the working directory's results/bench."""
    moved = results.rename(tmp_path / "exp1_results")
    bench_file(moved / "bench" / "mine.parquet", 1.0)
    elsewhere = tmp_path / "project"
    bench_file(elsewhere / "results" / "bench" / "theirs.parquet", 2.0)
    done = run_stage("lipflow.results", "build", "--out", str(moved / "lipflow.duckdb"), "--manifest",
                     str(moved / "manifest.json"), "--run-dirs", *map(str, sorted((moved / "runs").iterdir())),
                     cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    with duckdb.connect(str(moved / "lipflow.duckdb"), read_only=True) as con:
        assert con.execute("SELECT value FROM bench").fetchall() == [(1.0,)]

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


def test_a_rebuild_removes_the_old_databases_write_ahead_log(results):
    """A session that changed the database and never checkpointed it (killed; the duckdb CLI) leaves
    lipflow.duckdb.wal: a rebuild left it beside the new file, which DuckDB then could not open
    ("WAL does not match database file"), the build having reported success."""
    db = build_here(results)
    con = duckdb.connect(str(db))
    con.execute("PRAGMA disable_checkpoint_on_shutdown")
    con.execute("UPDATE runs SET status = 'checked by me'")
    con.close()
    assert Path(f"{db}.wal").exists()
    build_here(results)
    assert not Path(f"{db}.wal").exists()
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*), min(status) FROM runs").fetchone() == (2, "completed")


@pytest.mark.parametrize("suffix", lipflow.results.database.DUCKDB_SIDECARS)
def test_the_receipt_cannot_be_a_file_duckdb_keeps_beside_the_database(results, capsys, suffix):
    """--receipt <out>.wal (DuckDB's write-ahead log, which it would replay onto the new database),
    one of the two files it checkpoints through, or <out>.tmp (its spill folder) is refused up front
    in one line, and nothing is written."""
    out = results / "lipflow.duckdb"
    argv = ["build", "--out", str(out), "--manifest", str(results / "manifest.json"),
            "--run-dirs", *map(str, sorted((results / "runs").iterdir())), "--receipt", f"{out}{suffix}"]
    assert lipflow.results.cli.main(argv) == 2
    error = f"lipflow: error: --receipt {out}{suffix} is also --out's DuckDB {suffix} file\n"
    assert capsys.readouterr().err == error
    assert sorted(p.name for p in results.iterdir()) == ["manifest.json", "runs"]


def test_a_build_removes_its_old_receipts_and_no_copy_or_link_of_one(results, tmp_path):
    """The build removes its database's other receipts (``<db>.<12 hex digits>.built``, as the database rule
    names them) and nothing else: a user's backup of one (``….built.bak``, an editor's ``….built~``) or a link
    named like one holds a receipt's JSON too, and was deleted as a receipt."""
    runs = sorted((results / "runs").iterdir())
    out = results / "lipflow.duckdb"
    old = results / "lipflow.duckdb.0123456789ab.built"
    build(out, results / "manifest.json", runs, results=results, receipt=old)
    kept = [results / f"{old.name}.bak", results / f"{old.name}~", results / "lipflow.duckdb.mine.built"]
    for path in kept:
        shutil.copy(old, path)
    elsewhere = tmp_path / "archive.built"
    shutil.copy(old, elsewhere)
    link = results / "lipflow.duckdb.ba9876543210.built"
    link.symlink_to(elsewhere)
    legacy = results / "lipflow.duckdb.built"  # the rule's fixed name before 2026-12-07: a receipt too
    shutil.copy(old, legacy)
    new = results / "lipflow.duckdb.fedcba987654.built"
    build(out, results / "manifest.json", runs, results=results, receipt=new)
    assert not old.exists() and not legacy.exists() and new.is_file()
    assert all(path.read_bytes() == elsewhere.read_bytes() for path in kept)
    assert link.is_symlink() and elsewhere.is_file()


def test_a_build_is_not_held_by_a_fifo_named_like_a_receipt(tmp_path):
    """Only plain files are receipts: a named pipe (or other special file) named like one was opened to read its
    JSON, and the build waited for a writer forever; it is kept and the build goes on."""
    import stat
    import sys

    out, fifo = tmp_path / "lipflow.duckdb", tmp_path / "lipflow.duckdb.0123456789ab.built"
    os.mkfifo(fifo)
    code = ("import sys; from pathlib import Path; from lipflow.results.database import remove_other_receipts; "
            "remove_other_receipts(Path(sys.argv[1]), Path(sys.argv[2]))")
    subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "lipflow.duckdb.aaaaaaaaaaaa.built")],
                   check=True, timeout=20)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_receipt_another_checkout_wrote_during_the_build_does_not_stay_beside_its_database(results, monkeypatch):
    """Two checkouts sharing results/ build the database at once: the other's receipt, written while this build
    ran, stood beside this build's database when it was published after the other's (the old receipts were
    removed before the build only), so the other checkout took a database of this run set as its own and said
    "Nothing to be done". The build removes the others again once its database is in place."""
    runs = sorted((results / "runs").iterdir())
    out, mine = results / "lipflow.duckdb", results / "lipflow.duckdb.aaaaaaaaaaaa.built"
    other = results / "lipflow.duckdb.bbbbbbbbbbbb.built"
    check = lipflow.results.database.check_database

    def other_checkout_finishes(*args):  # its build published its database and wrote its receipt meanwhile
        other.write_text(json.dumps({"database": out.name, "sha256": "0" * 64, "rows": {}}))
        return check(*args)

    monkeypatch.setattr(lipflow.results.database, "check_database", other_checkout_finishes)
    build(out, results / "manifest.json", runs, results=results, receipt=mine)
    assert mine.is_file() and not other.exists()


def test_two_builds_of_one_database_publish_one_at_a_time(results, tmp_path):
    """Removing the other receipts again after publishing narrowed the race of two checkouts sharing results/
    but left a window: the other build's receipt, written between this build's publication and its removal
    of the others... or after it, stood beside this build's database. Builds hold a lock on the folder while
    they publish, remove and write: a build waits for one in progress (here a stand-in holding the lock that
    writes its receipt just before it lets go), then removes that receipt."""
    import subprocess
    import sys
    import time

    runs = sorted((results / "runs").iterdir())
    out, mine = results / "lipflow.duckdb", results / "lipflow.duckdb.aaaaaaaaaaaa.built"
    other, holding = results / "lipflow.duckdb.bbbbbbbbbbbb.built", tmp_path / "holding"
    receipt = json.dumps({"database": out.name, "sha256": "0" * 64, "rows": {}})
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, pathlib, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "pathlib.Path(sys.argv[2]).write_text('')\n"
        "time.sleep(3)\n"  # longer than this build takes: unlocked, it was done before the receipt below
        "pathlib.Path(sys.argv[3]).write_text(sys.argv[4])\n"), str(results), str(holding), str(other), receipt])
    try:
        deadline = time.monotonic() + 60
        while not holding.exists() and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert holding.exists()
        build(out, results / "manifest.json", runs, results=results, receipt=mine)
    finally:
        assert holder.wait(timeout=60) == 0
    assert mine.is_file() and not other.exists()


def test_a_failed_database_rule_keeps_the_previous_database(tmp_path):
    """Under Snakemake, which deletes a job's outputs before it runs: the database is an update()
    output, so a rebuild that fails leaves the previous database in place and readable; its
    receipt is gone, so the next run rebuilds it (never "Nothing to be done" on a failed build)."""
    import sys

    repo = Path(__file__).resolve().parent.parent
    (tmp_path / "config.yaml").write_text("runs: {}\n")  # the database only: no training, no tokens
    bench_file(tmp_path / "results" / "bench" / "mine.parquet", 1.0)  # a row that the builds keep

    def snakemake(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "-d", str(tmp_path),
                               "--configfile", str(tmp_path / "config.yaml"), "-c1", *args, "database"],
                              capture_output=True, text=True, timeout=300)

    assert snakemake().returncode == 0
    db = tmp_path / "results" / "lipflow.duckdb"
    previous = db.read_bytes()
    bad = tmp_path / "results" / "bench" / "broken.parquet"  # not Parquet: the build refuses it
    bad.write_bytes(b"not parquet")
    failed = snakemake("--forcerun", "database")
    assert failed.returncode != 0
    assert "broken.parquet is not a readable Parquet file" in (tmp_path / "results" / "logs" / "database.log").read_text()
    assert db.read_bytes() == previous
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT value FROM bench").fetchall() == [(1.0,)]
    assert re.search(r"Missing output files: results/lipflow\.duckdb\.[0-9a-f]{12}\.built", snakemake("-n").stdout)
    bad.unlink()
    assert snakemake().returncode == 0
    [receipt] = [json.loads(path.read_text()) for path in (tmp_path / "results").glob("lipflow.duckdb.*.built")]
    assert receipt["rows"]["bench"] == 1 and receipt["sha256"] == hashlib.sha256(db.read_bytes()).hexdigest()


def test_a_change_of_the_code_that_lays_out_the_database_rebuilds_it(tmp_path):
    """The database's receipt was named by its inputs only: a lipflow whose views or tables changed (an
    upgrade, an edited view) passed the old database, and the tables and figures drawn from it, as up to
    date. Its digest covers the source of lipflow.results, lipflow.experiments and the run summary fields:
    an edit there, or to a view's caption (its comment in the database), rebuilds the database (and removes the
    old receipt); an edit elsewhere does not."""
    import shutil
    import sys

    repo = Path(__file__).resolve().parent.parent
    copy = tmp_path / "lipflow-copy"
    copy.mkdir()
    for part in ("Snakefile", "workflow", "lipflow", "envs", "config.yaml", "pyproject.toml"):
        (shutil.copytree if (repo / part).is_dir() else shutil.copy)(repo / part, copy / part)
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.yaml").write_text("runs: {}\n")  # the database only: no training, no tokens
    environment = {**os.environ, "PYTHONPATH": str(copy)}

    def snakemake(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(copy / "Snakefile"), "-d", str(work),
                               "--configfile", str(work / "config.yaml"), "-c1", *args, "database"],
                              capture_output=True, text=True, timeout=300, env=environment, cwd=work)  # not the repo

    def receipts() -> list[str]:
        return sorted(path.name for path in (work / "results").glob("lipflow.duckdb.*.built"))

    assert snakemake().returncode == 0
    [first] = receipts()
    assert "Nothing to be done" in snakemake("-n").stdout
    with (copy / "lipflow" / "model" / "__init__.py").open("a") as model:  # not the database's code
        model.write("# an edit\n")
    assert "Nothing to be done" in snakemake("-n").stdout
    for edited in ("lipflow/experiments/lr_transfer.py", "lipflow/results/views.py", "lipflow/train/summary.py",
                   "workflow/report/table_lr_transfer.rst"):  # a caption: the view's comment in the database
        with (copy / edited).open("a") as view:
            view.write("# an edit\n")
        planned = snakemake("-n").stdout
        assert re.search(r"Missing output files: results/lipflow\.duckdb\.[0-9a-f]{12}\.built", planned), (edited, planned)
        assert snakemake().returncode == 0
        [now] = receipts()  # the old receipt is gone, not left to pass if the old code came back
        assert now != first
        first = now


@pytest.mark.parametrize("study, table", [("image_mlp", "results/image_mlp/robustness.parquet"),
                                          ("icl", "results/icl/loss_by_n.parquet")])
def test_the_database_waits_for_the_study_tables_it_loads(tmp_path, study, table):
    """The build loads the tables of the studies the config has on: the database rule names them as
    inputs (and on the build's command line), so a dry run of the database plans the study's job (not
    left to job order)."""
    import sys

    repo = Path(__file__).resolve().parent.parent
    turn_on = {"image_mlp": "experiments: [robustness]\n", "icl": "icl: {enabled: true}\n"}[study]
    (tmp_path / "config.yaml").write_text("runs: {}\n" + turn_on)
    dry = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "-d", str(tmp_path),
                          "database", "--configfile", str(tmp_path / "config.yaml"), "-c1", "-n"],
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
    merge_evals(out, [], "a-00000000")
    merge_evals(out, [], "a-00000000")  # its own earlier output is replaced
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


def test_seal_of_a_glob_skips_the_checksum_files_it_names(tmp_path):
    """`seal results/figures/*` names each figure's sidecar too: seal gave every sidecar a sidecar of its own
    (x.png.sha256.sha256). A checksum file is skipped, saying so; a file merely named *.sha256 that holds no
    checksum is sealed as any file."""
    figure, other = tmp_path / "x.png", tmp_path / "notes.sha256"
    figure.write_bytes(b"png")
    other.write_text("my notes, not a checksum\n")
    assert run_stage("lipflow.results", "seal", str(figure)).returncode == 0
    done = run_stage("lipflow.results", "seal", *sorted(str(p) for p in tmp_path.iterdir()))
    assert done.returncode == 0, done.stderr
    assert f"{figure}.sha256: a checksum file, skipped" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.sha256", "notes.sha256.sha256", "x.png",
                                                          "x.png.sha256"]


@pytest.mark.parametrize("there", ["dangling link", "link", "folder", "named pipe", "sha256sum line"])
def test_seal_refuses_a_sidecar_place_holding_no_checksum_and_keeps_it(tmp_path, there):
    """seal replaced a link in a sidecar's place (a dangling one, or one to a two-digest sidecar, which it cut)
    with a file, and called the file corrupt where a folder, a named pipe or a sha256sum line stood there; a
    link or another thing that is no checksum is refused naming the sidecar and kept, as every write of one."""
    table = tmp_path / "evals.parquet"
    table.write_bytes(b"table")
    sidecar = Path(f"{table}.sha256")
    digest = hashlib.sha256(b"table").hexdigest()
    if there == "dangling link":
        sidecar.symlink_to(tmp_path / "nowhere")
    elif there == "link":
        (tmp_path / "elsewhere").write_text(f"{digest}\n{'0' * 64}\n")
        sidecar.symlink_to(tmp_path / "elsewhere")
    elif there == "folder":
        sidecar.mkdir()
    elif there == "named pipe":
        os.mkfifo(sidecar)
    else:
        sidecar.write_text(f"{digest}  evals.parquet\n")
    done = run_stage("lipflow.results", "seal", str(table))
    assert done.returncode == 2 and f"{sidecar} exists and is not a sha256 checksum" in done.stderr, done.stderr
    assert "corrupt" not in done.stderr and sidecar.is_symlink() == there.endswith("link")
    assert there != "link" or (tmp_path / "elsewhere").read_text().count("\n") == 2


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


def refused_build(results: Path, capsys, damage, run_dirs: list[Path] | None = None) -> str:
    """Build, apply ``damage``, then build again through the CLI (its bench rows: results/bench, beside
    the database): exit code 2 with one line on stderr, the first database unchanged and no temp file
    left. Returns the line."""
    db = build_here(results)
    previous = db.read_bytes()
    damage()
    capsys.readouterr()
    code = lipflow.results.main(["build", "--out", str(db), "--manifest", str(results / "manifest.json"), "--run-dirs",
                                 *map(str, run_dirs or sorted((results / "runs").iterdir()))])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert db.read_bytes() == previous
    assert list(results.glob(".lipflow.duckdb*")) == []
    return err


DELETE = object()  # edit_json's value that removes the key


def edit_json(path: Path, key: str, value, block: str | None = None) -> None:
    """Set ``key`` (of the object ``block`` when given) in a JSON file to ``value``; ``DELETE`` removes it."""
    contents = json.loads(path.read_text())
    target = contents[block] if block else contents
    if value is DELETE:
        del target[key]
    else:
        target[key] = value
    path.write_text(json.dumps(contents))


@pytest.mark.parametrize("name, key, value, message", [
    ("run.json", "start_time", "yesterday", "start_time is 'yesterday', not a number"),
    ("run.json", "lipschitz_bound", "big", "lipschitz_bound is 'big', not a number"),
    ("run.json", "run_id", 5, "run_id is 5, not text"),
    ("run.json", "status", ["x"], "status is ['x'], not text"),
    ("run.json", "status", None, "status is None, not text"),
    ("run.json", "n_params", 1.5, "n_params is 1.5, not a whole number"),
    ("run.json", "n_params", 2**70, f"n_params is {2**70}, beyond a 64-bit integer"),
    ("run.json", "resumed", "no", "resumed is 'no', not true or false"),
    ("run.json", "processes", True, "processes is True, not a whole number"),
    ("run.json", "versions", "torch 2", "versions is 'torch 2', not an object"),
    ("run.json", "end_time", DELETE, "missing key 'end_time'"),
    ("config.json", "config", DELETE, "missing key 'config'"),
    ("config.json", "run_id", DELETE, "missing key 'run_id'"),
])
def test_a_run_file_value_of_another_type_is_named(results, capsys, monkeypatch, name, key, value, message):
    """Each run.json value must be of its column type in lipflow.train.summary; a key the trainer
    always writes must be there."""
    monkeypatch.chdir(results.parent)
    path = results / "runs" / "a-00000000" / name
    assert f"lipflow: error: {path}: {message}\n" == refused_build(results, capsys, lambda: edit_json(path, key, value))


@pytest.mark.parametrize("key, value, message", [
    ("d_model", "big", "config.d_model: 'big' is not of type 'integer'"),
    ("lr", [1], "config.lr: [1] is not of type 'number'"),
    ("depth_mup", 1, "config.depth_mup: 1 is not of type 'boolean'"),
    ("weight_decay", 2**70, f"config.weight_decay is {2**70}, beyond a 64-bit integer"),
])
def test_a_config_value_of_another_type_is_named(results, capsys, monkeypatch, key, value, message):
    """config.json's run config is checked against the config schema's types, as the train stage
    checked it."""
    monkeypatch.chdir(results.parent)
    path = results / "runs" / "a-00000000" / "config.json"
    damage = lambda: edit_json(path, key, value, block="config")  # noqa: E731
    assert f"lipflow: error: {path}: {message}\n" == refused_build(results, capsys, damage)


@pytest.mark.parametrize("key, seconds", [("start_time", 1e20), ("end_time", -1e12)])
def test_a_time_beyond_the_calendar_is_named(results, capsys, monkeypatch, key, seconds):
    monkeypatch.chdir(results.parent)
    path = results / "runs" / "a-00000000" / "run.json"
    err = refused_build(results, capsys, lambda: edit_json(path, key, seconds))
    assert err == f"lipflow: error: {path}: {key} is {seconds!r}, not a time (Unix seconds within the years 1-9999)\n"


@pytest.mark.parametrize("names", [("run.json",), ("config.json",), ("run.json", "config.json")])
def test_a_run_directory_holds_the_run_it_is_named_after(results, capsys, monkeypatch, names):
    """run.json and config.json naming another run (whose directory is there too): refused, never two
    rows of one run."""
    monkeypatch.chdir(results.parent)
    run_dir = results / "runs" / "a-00000000"
    err = refused_build(results, capsys, lambda: [edit_json(run_dir / name, "run_id", "b-11111111") for name in names])
    assert err == (f"lipflow: error: {run_dir / names[0]}: run_id is 'b-11111111', but its run directory is "
                   "'a-00000000' (a run directory holds the run it is named after)\n")


def test_one_run_in_two_directories_is_refused(results, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(results.parent)
    copy = tmp_path / "backup" / "a-00000000"
    run_dirs = [*sorted((results / "runs").iterdir()), copy]
    err = refused_build(results, capsys, lambda: shutil.copytree(results / "runs" / "a-00000000", copy), run_dirs)
    assert err == f"lipflow: error: --run-dirs: {run_dirs[0]} and {copy} both hold run 'a-00000000'\n"


@pytest.mark.parametrize("name", ["train_metrics.parquet", "evals.parquet"])
def test_a_run_file_holding_another_runs_rows_is_refused(results, capsys, monkeypatch, name):
    """A run directory's metrics and evaluations are its run's (an evaluation of another run copied in
    would give that run's loss to this one)."""
    monkeypatch.chdir(results.parent)
    path = results / "runs" / "a-00000000" / name
    table = pq.read_table(path)
    retagged = table.set_column(0, "run_id", pa.array(["b-11111111"] * table.num_rows))
    err = refused_build(results, capsys, lambda: write_table_parquet(path, retagged))
    assert err == f"lipflow: error: {path} holds rows of run 'b-11111111', not of its directory's run 'a-00000000'\n"


def test_bench_files_whose_columns_clash_are_named(results, capsys, monkeypatch):
    monkeypatch.chdir(results.parent)
    bench = results / "bench"

    def damage():
        bench_file(bench / "a.parquet", 1.0)
        pq.write_table(pa.table({"bench": ["b"], "metric": ["m"], "value": ["fast"]}), bench / "b.parquet")

    assert refused_build(results, capsys, damage) == (
        f"lipflow: error: the bench table's files cannot be merged: {bench}/a.parquet and {bench}/b.parquet "
        "differ (Unable to merge: Field value has incompatible types: double vs string)\n")


@pytest.mark.parametrize("make, message", [
    (lambda path: pq.write_table(pa.table({}), path),
     "{path} cannot be loaded into the database (Invalid Input Error: Provided table/dataframe must have at least "
     "one column)"),
    (lambda path: pq.write_table(pa.table({"value": pa.array([1.5], pa.float16())}), path),
     "{path} cannot be loaded into the database (Not implemented Error: Unsupported Internal Arrow Type"),
    (lambda path: path.mkdir(), "results/lipflow.duckdb left as it was: [Errno 21] Is a directory: '{path}'"),
], ids=["no_columns", "float16", "folder"])
def test_a_bench_file_the_database_cannot_hold_is_named(results, capsys, monkeypatch, make, message):
    monkeypatch.chdir(results.parent)
    path = results / "bench" / "d.parquet"  # the bench folder beside --out

    def damage():
        bench_file(results / "bench" / "a.parquet", 1.0)
        make(path)

    assert message.format(path=path) in refused_build(results, capsys, damage)


def test_an_evaluation_refuses_a_run_json_of_another_run(results, capsys):
    """Evaluated in a directory named like a run id, a run.json naming another run is refused before
    any row is filed under that run."""
    from lipflow.evaluation.__main__ import main

    run_dir = results / "runs" / "a-00000000"
    edit_json(run_dir / "run.json", "run_id", "b-11111111")
    out = run_dir / "evals" / "val.parquet"
    out.parent.mkdir()  # as Snakemake makes an output's folder
    code = main(["--evaluation", "val", "--run-dir", str(run_dir), "--data-dir", str(results), "--out", str(out),
                 "--device", "cpu"])
    assert code == 2 and capsys.readouterr().err == (
        f"lipflow: error: {run_dir / 'run.json'}: run_id is 'b-11111111', but its run directory is 'a-00000000' "
        "(a run directory holds the run it is named after)\n")
    assert list(out.parent.iterdir()) == []


def test_an_evaluation_refuses_a_file_in_its_sidecars_place_before_it_evaluates(results, capsys, monkeypatch):
    """A user's file in the place of --out's .sha256 was refused only when the table was written, after the
    evaluation's minutes; it is refused up front, naming it, and kept."""
    import lipflow.evaluation.__main__ as evaluation_main

    def evaluated(*args, **kwargs):
        raise AssertionError("evaluated before the refusal")

    monkeypatch.setattr(evaluation_main, "build_context", evaluated)
    run_dir = results / "runs" / "a-00000000"
    out = run_dir / "evals" / "val.parquet"
    out.parent.mkdir()
    Path(f"{out}.sha256").write_text("my notes\n")
    code = evaluation_main.main(["--evaluation", "val", "--run-dir", str(run_dir), "--data-dir", str(results),
                                 "--out", str(out), "--device", "cpu"])
    assert code == 2 and f"checksum file {out}.sha256 exists and is not a sha256 checksum" in capsys.readouterr().err
    assert Path(f"{out}.sha256").read_text() == "my notes\n" and not out.exists()


def test_runs_name_is_the_run_id_without_only_its_hash_and_val_perplexity_is_filled(tmp_path, tiny_run_config):
    """runs.name is the run id less its last '-hash' part (a hyphenated name keeps its hyphens), and
    runs.val_loss/val_accuracy/val_perplexity come from the run's val evaluation rows."""
    root = tmp_path / "results"
    run_dir = make_run(root, "lr-sweep-1a2b3c4d", tiny_run_config)
    write_table_parquet(run_dir / "evals.parquet",
                        pa.table({"run_id": ["lr-sweep-1a2b3c4d"] * 4, "eval": ["val", "val", "val", "train"],
                                  "metric": ["loss", "accuracy", "perplexity", "perplexity"],
                                  "value": [1.5, 0.25, 4.5, 9.0]}))
    manifest = {"format": "lipflow-token-shards/1", "dtype": "uint16", "vocab_size": 10, "tokenizer": {},
                "splits": {"train": {"shards": [{"file": "train/shard-00000.arrow", "num_tokens": 100,
                                                 "sha256": "0" * 64}]}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    out = build_here(root)
    with duckdb.connect(str(out), read_only=True) as con:
        row = con.execute("SELECT name, val_loss, val_accuracy, val_perplexity FROM runs").fetchall()
    assert row == [("lr-sweep", 1.5, 0.25, 4.5)]


def test_device_is_the_only_run_json_field_that_shares_a_config_keys_column():
    """A ``runs`` row holds every config key and every run.json field as columns: where the two share a
    name, run.json's value takes the column (the config's stays in ``config``). That is ``device`` only
    (used vs setting, as the README says); a new collision would hide a config value without a word."""
    from lipflow.config import run_defaults
    from lipflow.train.summary import RUN_KEY_FIELDS, RUN_SUMMARY_FIELDS

    assert (set(RUN_KEY_FIELDS) | set(RUN_SUMMARY_FIELDS)) & set(run_defaults()) == {"device"}


def test_the_runs_columns_keep_their_types_when_no_run_sets_them(results):
    """The runs table took each column's type from its values, so a column every run left null (experiment,
    masses, train_tokens, diverged_step, slurm_job_id…) was DuckDB's NULL type and the schema depended on the
    data; every column now has its declared type, the one a database without runs gets."""
    full = build_here(results)
    alone = results.parent / "alone.duckdb"
    build(alone, None, [], results=results)
    with duckdb.connect(str(full), read_only=True) as con, duckdb.connect(str(alone), read_only=True) as empty:
        types = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE runs)").fetchall())
        assert con.execute("SELECT count(*) FROM runs WHERE experiment IS NULL AND masses IS NULL AND train_tokens "
                           "IS NULL AND slurm_job_id IS NULL AND diverged_step IS NULL").fetchone() == (2,)
        assert [name for name, kind in types.items() if "NULL" in kind] == []  # DuckDB spells it "NULL"
        assert empty.execute("DESCRIBE runs").fetchall() == con.execute("DESCRIBE runs").fetchall()
    assert {name: types[name] for name in ("experiment", "masses", "train_tokens", "slurm_job_id",
                                           "cuda_visible_devices", "diverged_step", "diverged_reason")} == {
        "experiment": "VARCHAR", "masses": "VARCHAR", "train_tokens": "BIGINT", "slurm_job_id": "VARCHAR",
        "cuda_visible_devices": "VARCHAR", "diverged_step": "BIGINT", "diverged_reason": "VARCHAR"}


def test_an_integer_an_old_config_holds_for_a_number_key_is_its_float(tmp_path, tiny_run_config):
    """A config.json of before 2026-12-06 may hold an integer for a number key; one a double does not hold
    exactly (2^53 + 1) failed the build in Arrow's traceback once the column was typed DOUBLE."""
    root = tmp_path / "results"
    make_run(root, "a-00000000", {**tiny_run_config, "max_bound": 2**53 + 1})
    (root / "manifest.json").write_text(json.dumps({"format": "lipflow-token-shards/1", "dtype": "uint16",
                                                    "vocab_size": 10, "tokenizer": {}, "splits": {}}))
    with duckdb.connect(str(build_here(root)), read_only=True) as con:
        assert con.execute("SELECT max_bound, typeof(max_bound) FROM runs").fetchall() == [(2.0**53, "DOUBLE")]


def test_the_code_digest_reads_source_files_only(tmp_path, monkeypatch):
    """An editor's lock file beside a view being edited (Emacs links `.#views.py` to a target that does not
    exist) made the digest, and so every snakemake command's parse, fail with FileNotFoundError; hidden files
    and links are not source and leave the digest as it is; an edit of a source file changes it."""
    import lipflow.plan_rules as plan_rules

    package, report = tmp_path / "lipflow", tmp_path / "report"
    (package / "results").mkdir(parents=True)
    report.mkdir()
    (package / "results" / "views.py").write_text("VIEWS = {}\n")
    (report / "table.rst").write_text("a caption\n")
    monkeypatch.setattr(plan_rules, "PACKAGE", package)
    monkeypatch.setattr(plan_rules, "DATABASE_CODE", (package / "results",))
    monkeypatch.setattr(plan_rules, "REPORT_DIR", report)

    def digest() -> str:
        plan_rules.database_code_digest.cache_clear()
        return plan_rules.database_code_digest()

    try:
        before = digest()
        (package / "results" / ".#views.py").symlink_to("user@host.1234:1")  # dangling, as Emacs leaves it
        (package / "results" / "link.py").symlink_to(package / "results" / "views.py")
        (report / ".#table.rst").symlink_to("user@host.1234:1")
        (package / "results" / ".ipynb_checkpoints").mkdir()  # Jupyter's copies: no source either
        (package / "results" / ".ipynb_checkpoints" / "views-checkpoint.py").write_text("VIEWS = {'old': 1}\n")
        assert digest() == before
        (package / "results" / "views.py").write_text("VIEWS = {'v': 1}\n")
        assert digest() != before
    finally:
        plan_rules.database_code_digest.cache_clear()


def test_the_code_digest_takes_a_source_file_whose_name_is_not_utf8(tmp_path, monkeypatch):
    """A file whose name is not UTF-8 (``café.py`` unpacked from a Latin-1 archive: b'caf\\xe9.py') failed the
    digest, and so every snakemake command's parse, with UnicodeEncodeError; its name is hashed as its bytes."""
    import os

    import lipflow.plan_rules as plan_rules

    package, report = tmp_path / "lipflow", tmp_path / "report"
    (package / "results").mkdir(parents=True)
    report.mkdir()
    (package / "results" / "views.py").write_text("VIEWS = {}\n")
    monkeypatch.setattr(plan_rules, "PACKAGE", package)
    monkeypatch.setattr(plan_rules, "DATABASE_CODE", (package / "results",))
    monkeypatch.setattr(plan_rules, "REPORT_DIR", report)
    try:
        plan_rules.database_code_digest.cache_clear()
        before = plan_rules.database_code_digest()
        with open(os.path.join(os.fsencode(package / "results"), b"caf\xe9.py"), "wb") as f:
            f.write(b"# notes\n")
        plan_rules.database_code_digest.cache_clear()
        assert plan_rules.database_code_digest() != before
    finally:
        plan_rules.database_code_digest.cache_clear()
