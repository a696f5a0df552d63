"""End to end: `snakemake` on a tiny config in a temp dir, then the DuckDB result through the CLI."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import SNAKEMAKE_SINGLE_THREADED
from lipflow.plan_rules import ICL_TABLES as ICL_TABLE_NAMES

REPO = Path(__file__).resolve().parent.parent
# one xdist worker runs this module, so its pipeline fixture is built once (-n 2 --dist loadgroup)
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e")]


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "-c2", *SNAKEMAKE_SINGLE_THREADED, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def lipflow_cli(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lipflow.cli", *args], cwd=workdir,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("e2e")
    shutil.copy(REPO / "tests" / "data" / "tiny_config.yaml", workdir / "config.yaml")
    done = snakemake(workdir)
    assert done.returncode == 0, done.stderr[-4000:]
    return workdir


def query_csv(workdir: Path, sql: str) -> list[dict[str, str]]:
    out = lipflow_cli(workdir, "query", sql, "--format", "csv")
    assert out.returncode == 0, out.stderr
    return list(csv.DictReader(io.StringIO(out.stdout)))


def test_runs_table_shows_each_run_with_val_loss(pipeline):
    rows = query_csv(pipeline, "select run_id, name, status, model, optimizer, weight_constraint, seed, "
                               "val_loss, lipschitz_bound, config from runs order by name")
    assert [r["name"] for r in rows] == ["baseline", "lipschitz"]
    assert all(r["status"] == "completed" for r in rows)
    for r in rows:
        assert 0 < float(r["val_loss"]) < 10
        assert json.loads(r["config"])["steps"] == 20
    assert rows[0]["lipschitz_bound"] == ""  # LayerNorm GPT carries no certificate
    assert float(rows[1]["lipschitz_bound"]) > 0
    assert rows[1]["weight_constraint"] == "spectral_soft_cap"


def test_the_training_curves_figure_is_drawn_for_the_runs_block(pipeline):
    from lipflow.results.plotting import is_lipflow_figure

    assert all(is_lipflow_figure(pipeline / "results" / "figures" / f"training_curves.{fmt}") for fmt in ("png", "svg"))
    assert (pipeline / "results" / "logs" / "training_curves.log").read_text().split() == [
        "results/figures/training_curves.png", "results/figures/training_curves.svg"]


def test_a_rerun_of_the_merge_replaces_each_runs_merged_evaluations(pipeline):
    """What adding an evaluation does: the merge job reruns over its kept table (an update() output)
    after Snakemake deleted the table's sidecar; the run check of merge-evals read the table through
    that sidecar and failed every such rerun."""
    before = query_csv(pipeline, "select run_id, eval, count(*) as n from evals group by all order by all")
    done = snakemake(pipeline, "--forcerun", "merge_evaluations")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert query_csv(pipeline, "select run_id, eval, count(*) as n from evals group by all order by all") == before


def test_a_users_file_at_a_figure_path_survives_a_rerun_of_the_figure(pipeline, tmp_path):
    """The figures are update() outputs: Snakemake leaves a user's file at a figure's path to
    lipflow.plots, which refuses it in one line (the job fails, the file keeps its bytes, and with its
    receipt gone the job is planned again rather than its figures passing as current); once the
    file is moved away the figure is drawn again and a further run has nothing to do."""
    work = tmp_path / "work"
    shutil.copytree(pipeline, work, symlinks=True)
    receipt = work / "results" / "figures" / "training_curves.drawn"
    assert json.loads(receipt.read_text()) == {"drawn": ["results/figures/training_curves.png",
                                                         "results/figures/training_curves.svg"]}
    figure = work / "results" / "figures" / "training_curves.png"
    figure.write_bytes(b"\x89PNG my own figure")
    failed = snakemake(work, "--forcerun", "training_curves")
    assert failed.returncode != 0
    assert figure.read_bytes() == b"\x89PNG my own figure" and not receipt.exists()
    assert "is not a figure lipflow drew; refusing to replace it" in (work / "results/logs/training_curves.log").read_text()
    planned = snakemake(work, "-n")
    assert "training_curves" in planned.stdout and "Nothing to be done" not in planned.stdout + planned.stderr
    figure.unlink()
    assert snakemake(work).returncode == 0
    from lipflow.results.plotting import is_lipflow_figure

    assert is_lipflow_figure(figure)
    assert "Nothing to be done" in (lambda done: done.stdout + done.stderr)(snakemake(work, "-n"))


def test_a_database_of_another_run_set_is_rebuilt_without_snakemakes_records(pipeline, tmp_path):
    """The database's receipt is named by the run set it was built from: with Snakemake's own records
    (.snakemake/, which hold its params and input-set triggers) gone, as in a results/ shared by two
    checkouts, a config that drops a run still plans the database job (a fixed receipt name passed the
    database of both runs as up to date); the rebuild leaves one receipt, and a user's file named like one
    stays."""
    work = tmp_path / "work"
    shutil.copytree(pipeline, work, symlinks=True, ignore=shutil.ignore_patterns(".snakemake"))
    config = yaml.safe_load((work / "config.yaml").read_text())
    del config["runs"]["lipschitz"]
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    mine = work / "results" / "lipflow.duckdb.mine.built"
    mine.write_text('{"database": "lipflow.duckdb"}')
    planned = snakemake(work, "-n")
    assert "database" in planned.stdout and "Nothing to be done" not in planned.stdout + planned.stderr
    assert snakemake(work).returncode == 0
    receipts = sorted(path.name for path in (work / "results").glob("lipflow.duckdb.*.built"))
    assert len(receipts) == 2 and "lipflow.duckdb.mine.built" in receipts, receipts
    assert [row["name"] for row in query_csv(work, "select name from runs")] == ["baseline"]
    assert "Nothing to be done" in (lambda done: done.stdout + done.stderr)(snakemake(work, "-n"))


def test_tables_are_consistent(pipeline):
    steps = query_csv(pipeline, "select run_id, count(*) as n, max(step) as last from train_metrics group by run_id")
    assert len(steps) == 2 and all(r["n"] == "20" and r["last"] == "20" for r in steps)
    evals = query_csv(pipeline, "select distinct eval, metric from evals order by metric")
    assert {(r["eval"], r["metric"]) for r in evals} >= {("val", "loss"), ("val", "accuracy"), ("val", "perplexity")}
    shards = query_csv(pipeline, "select split, sum(tokens) as tokens from shards group by split order by split")
    assert [r["split"] for r in shards] == ["train", "val"]
    assert all(int(r["tokens"]) > 1000 for r in shards)


def test_rerun_is_a_noop_and_one_knob_reruns_one_run(pipeline):
    again = snakemake(pipeline, "-n")
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr
    (pipeline / "overlay.yaml").write_text("runs:\n  baseline:\n    lr: 0.001\n")
    changed = snakemake(pipeline, "-n", "--configfile", str(pipeline / "config.yaml"), str(pipeline / "overlay.yaml"))
    text = changed.stdout + changed.stderr
    assert changed.returncode == 0, text
    job_counts = {words[0]: words[1] for words in map(str.split, text.splitlines())
                  if len(words) == 2 and words[1].isdigit()}  # the "Job stats" table
    assert job_counts.get("train") == "1"
    assert "tokenize" not in job_counts and "corpus" not in job_counts
    assert job_counts.get("database") == "1"


def test_a_failed_evaluation_keeps_the_previous_results(pipeline, tmp_path):
    """Snakemake deletes a job's outputs before it runs; the evaluation files and the database are
    update() outputs, so an evaluation that fails (here: flipped bits in the weights) leaves the
    previous evaluation files and database in place, and its sidecar (the job's receipt) is gone,
    so the next run retries it instead of serving the old file as up to date."""
    work = tmp_path / "work"
    shutil.copytree(pipeline, work, symlinks=True)
    run = next((work / "results" / "runs").glob("baseline-*"))
    kept = [run / "evals" / "val.parquet", run / "evals.parquet", work / "results" / "lipflow.duckdb"]
    before = [path.read_bytes() for path in kept]
    weights = bytearray((run / "model.safetensors").read_bytes())
    weights[-3] ^= 0x01
    (run / "model.safetensors").write_bytes(bytes(weights))
    failed = snakemake(work)
    assert failed.returncode != 0
    assert "model.safetensors is corrupt" in (work / "results" / "logs" / "evaluate" / run.name / "val.log").read_text()
    assert [path.read_bytes() for path in kept] == before
    again = snakemake(work, "-n")
    assert f"Missing output files: results/runs/{run.name}/evals/val.parquet.sha256" in again.stdout, again.stdout


def test_bad_config_key_fails_before_any_job(pipeline):
    before = sorted(p.relative_to(pipeline) for p in (pipeline / "results").rglob("*"))
    bad = snakemake(pipeline, "--config", 'runs={"baseline": {"lrr": 0.1}}')
    assert bad.returncode != 0
    assert "unknown key 'runs.baseline.lrr'" in bad.stderr + bad.stdout
    assert sorted(p.relative_to(pipeline) for p in (pipeline / "results").rglob("*")) == before


def test_query_is_read_only_and_errors_are_one_line(pipeline):
    write = lipflow_cli(pipeline, "query", "delete from runs")
    assert write.returncode != 0
    assert "read-only" in write.stderr and len(write.stderr.strip().splitlines()) == 1
    typo = lipflow_cli(pipeline, "query", "select * from runz")
    assert typo.returncode != 0 and len(typo.stderr.strip().splitlines()) == 1
    assert len(query_csv(pipeline, "select * from runs")) == 2


def test_python_api_loads_run_and_connects(pipeline, monkeypatch):
    import lipflow

    monkeypatch.chdir(pipeline)
    run_id = lipflow.connect().execute("select run_id from runs where name = 'lipschitz'").fetchone()[0]
    run = lipflow.load_run(run_id, device="cpu")
    assert run.config["model"] == "lipschitz_gpt"
    assert len(run.metrics) == 20
    assert run.model.lipschitz_bound() == pytest.approx(run.summary["lipschitz_bound"], rel=1e-6)
    # the README's example, run as written on this run: it ends in the greedy next token
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    example = readme.split("### Python API (notebooks)\n\n```python\n", 1)[1].split("```", 1)[0]
    lines = example.replace('"lipschitz-0fb1b2e9"', repr(run_id)).splitlines()
    namespace: dict = {}
    exec("\n".join(lines[:-1]), namespace)
    next_token = eval(lines[-1].split("#")[0], namespace)
    ids = namespace["ids"]
    assert len(ids) == len("To be, or not to") and namespace["df"]["run_id"].tolist().count(run_id) == 1
    assert namespace["drawn"].shape == (1, len(ids) + 100) and namespace["drawn"][0, :len(ids)].tolist() == ids
    greedy = lipflow_cli(pipeline, "sample", run_id, "--prompt", "To be, or not to", "--tokens", "1",
                         "--temperature", "0", "--device", "cpu")
    assert greedy.returncode == 0 and greedy.stdout == "To be, or not to" + next_token + "\n", greedy.stderr
    sample = lipflow_cli(pipeline, "sample", run_id, "--prompt", "The", "--tokens", "20", "--device", "cpu")
    assert sample.returncode == 0 and sample.stdout.startswith("The")
    # a character the char tokenizer never saw would encode as [UNK] and vanish from the prompt
    unseen = lipflow_cli(pipeline, "sample", run_id, "--prompt", "The 日", "--tokens", "5", "--device", "cpu")
    assert unseen.returncode == 2 and unseen.stdout == ""
    assert unseen.stderr.strip().splitlines() == ["lipflow: error: --prompt: '日' is not in the run's vocabulary "
                                                  "(the tokenizer in results/data/pydoc/char never saw it in training)"]


def test_a_moved_and_renamed_results_tree_still_samples(pipeline, tmp_path):
    """``lipflow sample --results DIR`` finds the run's tokenizer inside DIR, whatever DIR is called."""
    run_id = query_csv(pipeline, "select run_id from runs where name = 'lipschitz'")[0]["run_id"]
    archive = tmp_path / "archive" / "exp1_results"
    archive.mkdir(parents=True)
    for part in ("runs", "data"):
        shutil.copytree(pipeline / "results" / part, archive / part)
    sample = lipflow_cli(tmp_path, "sample", run_id, "--results", str(archive), "--prompt", "The", "--tokens", "5",
                         "--device", "cpu")
    assert sample.returncode == 0 and sample.stdout.startswith("The"), sample.stderr
    # other token shards in the tree (here: the same manifest written differently) are never sampled with
    manifest = next((archive / "data").glob("*/*/manifest.json"))
    manifest.write_text(json.dumps(json.loads(manifest.read_text()), indent=1))
    other = lipflow_cli(tmp_path, "sample", run_id, "--results", str(archive), "--prompt", "The", "--device", "cpu")
    assert other.returncode == 2 and "was trained on other token shards than" in other.stderr, other.stderr


def test_a_database_without_runs_has_the_runs_columns_of_one_with_runs(pipeline, tmp_path):
    """An ICL-only sweep trains no runs: its database still has a `runs` table (no rows) with the
    columns a real run gives, so queries and the views work (they come out empty, with a reason)."""
    import duckdb

    from lipflow.results import build

    manifest = next((pipeline / "results" / "data").glob("*/*/manifest.json"))
    empty_db = tmp_path / "empty.duckdb"
    build(empty_db, manifest, [], results=tmp_path / "results")

    def columns(db: Path) -> list[tuple[str, str]]:
        with duckdb.connect(str(db), read_only=True) as con:
            return con.execute("select column_name, data_type from information_schema.columns "
                               "where table_name = 'runs' order by ordinal_position").fetchall()

    real, empty = columns(pipeline / "results" / "lipflow.duckdb"), columns(empty_db)
    assert [name for name, _ in empty] == [name for name, _ in real]
    # Where the real runs have a value the types agree (an all-NULL column has DuckDB's NULL type).
    with duckdb.connect(str(pipeline / "results" / "lipflow.duckdb"), read_only=True) as con:
        all_null = {name for name, _ in real
                    if con.execute(f'select count("{name}") from runs').fetchone()[0] == 0}
    assert [(n, t) for n, t in empty if n not in all_null] == [(n, t) for n, t in real if n not in all_null]
    with duckdb.connect(str(empty_db), read_only=True) as con:
        assert con.execute("select count(*) from runs").fetchone() == (0,)
        assert con.execute("select count(*) from pareto").fetchone() == (0,)


def test_the_icl_study_alone_tokenizes_no_corpus(tmp_path):
    """A config whose only experiment is the ICL study has no language-model runs: its plan builds the
    study and the database (its shards table empty, ``--manifest`` given nothing) and no corpus or token
    shards, which nothing of it reads (they were made for the database's shards table alone)."""
    (tmp_path / "config.yaml").write_text(json.dumps({"experiments": ["icl"], "icl": {"layers": [1], "n_grid": [4]}}))
    done = snakemake(tmp_path, "-n", "-p")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    jobs = {line.split()[0] for line in out.split("Job stats:")[1].split("total")[0].splitlines()[3:] if line.strip()}
    assert {"icl_train", "database"} <= jobs and not jobs & {"corpus", "tokenize"}, jobs
    assert "--manifest  --run-dirs  --study-tables results/icl/" in out


TINY_ICL = {"d": 2, "n": 5, "layers": [1], "n_grid": [5], "sigma": {"kind": "identity"}, "w_prior": "identity",
            "train_steps": 20, "batch_size": 64, "theory_samples": 1000, "regression_prompts": 1000}


def test_a_users_file_at_an_icl_figure_path_is_refused_not_replaced(tmp_path):
    """The ICL figures were plain outputs, so Snakemake deleted a user's file at one of their paths before
    the plot job drew over it without a word; now update() outputs, as the other figures: the job refuses
    the file in one line and keeps it, its receipt missing plans it again, and once the file is moved away
    it draws the figures and a further run has nothing to do."""
    from lipflow.results.plotting import is_lipflow_figure

    (tmp_path / "config.yaml").write_text(json.dumps({"experiments": ["icl"], "icl": TINY_ICL}))
    figure = tmp_path / "results" / "figures" / "icl_loss_vs_layers.png"
    figure.parent.mkdir(parents=True)
    figure.write_bytes(b"\x89PNG my own figure")
    failed = snakemake(tmp_path, "-p", "icl_all")
    assert failed.returncode != 0 and figure.read_bytes() == b"\x89PNG my own figure"
    log = (tmp_path / "results" / "logs" / "icl" / "plots.log").read_text().strip().splitlines()
    assert len(log) == 1 and "is not a figure lipflow drew; refusing to replace it" in log[0], log
    figure.unlink()
    assert snakemake(tmp_path, "-p", "icl_all").returncode == 0
    assert all(is_lipflow_figure(tmp_path / path) for path in ("results/figures/icl_loss_vs_layers.png",
                                                                "results/figures/icl_loss_vs_n.svg"))
    assert len(json.loads((tmp_path / "results" / "figures" / "icl_study.drawn").read_text())["drawn"]) == 4
    assert "Nothing to be done" in (lambda done: done.stdout + done.stderr)(snakemake(tmp_path, "-n", "icl_all"))


def snakemake_with_a_killed_job(workdir: Path, command: str, *args: str) -> subprocess.CompletedProcess:
    """`snakemake` whose job's python process running ``command`` (a part of its command line) is
    SIGKILLed as soon as it starts (not the job's shell, which would leave it running)."""
    import psutil

    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "-c1", *args]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as snake:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and snake.poll() is None:
            jobs = [child for child in psutil.Process(snake.pid).children(recursive=True) if command in command_line(child)]
            if jobs:
                jobs[0].kill()
                break
            time.sleep(0.05)
        out, _ = snake.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, snake.returncode, out, "")


def command_line(process) -> str:
    """A python process's command line; empty for another (the job's shell) or once it has exited."""
    import psutil

    try:
        return " ".join(process.cmdline()) if process.name().startswith("python") else ""
    except psutil.Error:
        return ""


def sealed_files(paths: list[Path]) -> dict[Path, bytes]:
    """Each table's and its sidecar's bytes, once each table is checked to match its sidecar."""
    from lipflow.atomic import read_verified, sidecar_path

    return {file: file.read_bytes() for path in paths if read_verified(path) for file in (path, sidecar_path(path))}


@pytest.mark.parametrize("study", ["icl", "image_mlp"])
def test_a_killed_rerun_of_a_studys_tables_keeps_the_previous_tables_and_reruns(tmp_path, study):
    """The studies' tables were plain outputs: Snakemake deleted them before a rerun, so a killed one
    left no table (only the digits-MLP table's orphan sidecar). Now update() tables and sidecars with a
    plain receipt, as the evaluations and the database: the previous tables stay, each matching its
    sidecar, the receipt is gone, and the next `snakemake` plans the job again."""
    if study == "icl":
        config, target, command, job = {"experiments": ["icl"], "icl": TINY_ICL}, "icl_all", "collect --config-json", "icl_collect"
        tables = [tmp_path / "results" / "icl" / f"{name}.parquet" for name in ICL_TABLE_NAMES]
        receipt = tmp_path / "results" / "icl" / "tables.written"
    else:
        config = {"image_mlp": {"width": 16, "n_layers": 2, "steps": 30, "batch_size": 32, "eval_every": 10,
                                "epsilons": [0.0, 0.5], "pgd_steps": 3}}
        target, command, job = "results/image_mlp/robustness.written", "lipflow.studies.image_mlp", "image_mlp_robustness"
        tables, receipt = [tmp_path / "results" / "image_mlp" / "robustness.parquet"], tmp_path / target
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    done = snakemake(tmp_path, "-p", target)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(receipt.read_text()) == {"written": [str(path.relative_to(tmp_path)) for path in tables]}
    before = sealed_files(tables)
    killed = snakemake_with_a_killed_job(tmp_path, command, "--forcerun", job, "-p", target)
    assert killed.returncode != 0, killed.stdout[-3000:]
    assert sealed_files(tables) == before and not receipt.exists()
    planned = snakemake(tmp_path, "-n", target)
    assert job in planned.stdout.split("Job stats:")[1].split("total")[0], planned.stdout[-3000:]


@pytest.mark.parametrize("gpu_per_run", [0, 1])
def test_dry_run_asks_for_the_gpus_and_cpus_of_data_parallel_runs(tmp_path, gpu_per_run):
    """Every run is `python -m lipflow.train` (one of nproc 2 starts its own workers); the GPU request is
    a constant unless a run needs more: a run with nproc 2 gets (with GPUs on) 2 GPUs and 4 CPUs, as
    its threads (the local scheduler reserves those cores), the other 1 GPU (or none) and 2 CPUs."""
    from lipflow.config import load_config_file

    config = load_config_file(REPO / "tests" / "data" / "tiny_config.yaml")
    config["runs"]["baseline"]["nproc"] = 2
    config["resources"] = {"gpu_per_run": gpu_per_run}
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                           "--configfile", str(tmp_path / "config.yaml"), "-c8", "-n", "-p", "--until", "train"],
                          capture_output=True, text=True, timeout=600)  # the rule's own threads (8 cores: uncapped)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    jobs = [block for block in out.split("rule train:")[1:]]
    assert len(jobs) == 2
    for block in jobs:
        wildcard = block.split("wildcards: run=")[1].split()[0]
        gpus = block.split("gpu=")[1].split(",")[0].split()[0] if "gpu=" in block else "0"
        cpus = block.split("cpus_per_task=")[1].split(",")[0].split()[0]
        threads = block.split("threads: ")[1].split()[0]
        assert "python -m lipflow.train" in block and "torchrun" not in block
        if wildcard.startswith("baseline-"):
            assert (gpus, cpus, threads) == ("2" if gpu_per_run else "0", "4", "4")
        else:
            assert (gpus, cpus, threads) == ("1" if gpu_per_run else "0", "2", "2")
