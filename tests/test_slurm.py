"""Workflows through `snakemake --profile profiles/slurm` on a real one-node SLURM cluster.

The cluster bring-up (tests/slurm/cluster.sh, installing Debian's Slurm 22.05 and munge if missing: 10-25 s of apt,
then about 1 s of bring-up), the sweep and its failure case run in a thread that conftest.py starts with the session
when these tests are selected: most of their minutes are waits between the plugin's status checks (2 s, then 10 s
longer after each check that finds no job finished), which the other tests fill. The tests here wait for that
thread and assert on what it recorded; the daemons are stopped by PID at the end of the session, also when a test
fails. Select or deselect with `-m slurm` / `-m "not slurm"`.
"""

import importlib.util
import os
import pickle
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

# Loaded by path, so it works under any pytest import mode; bench/slurm_overhead.py loads it the same way.
_spec = importlib.util.spec_from_file_location("lipflow_slurm_harness", Path(__file__).parent / "slurm" / "harness.py")
harness = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = harness  # dataclasses look their module up while the class is built
_spec.loader.exec_module(harness)
run_snakemake_on_slurm = harness.run_snakemake_on_slurm


REPO = Path(__file__).resolve().parent.parent

# Four runs that each ask SLURM for a GPU (the test cluster has 2 fake ones), their evaluations and the
# DuckDB build (a local rule: it runs in the Snakemake process, not as a SLURM job).
SWEEP_CONFIG = """
corpus: {name: pydoc, source: embedded}
tokenizer: {kind: char}
defaults: {d_model: 16, n_layers: 1, n_heads: 2, context: 16, batch_size: 4, steps: 6, eval_every: 3,
           eval_batches: 1, checkpoint_every: 0, device: cpu}
runs:
  r1: {seed: 1}
  r2: {seed: 2}
  r3: {seed: 3, model: lipschitz_gpt, optimizer: muon, lr: 0.05, weight_constraint: spectral_soft_cap}
  r4: {seed: 4, model: lipschitz_gpt, optimizer: scion, lr: 0.01}
evaluations: {enabled: [val, rank]}
resources: {gpu_per_run: 1}
"""
# Added for the failure case: one run that cannot train (2 training tokens < one window) and one that can.
FAILING_RUNS = """
  broken: {seed: 5, train_tokens: 2}
  r5: {seed: 6}
"""
ARGS: list[str] = []  # profiles/slurm groups both data steps, and each run's evaluations, into one job


def query(db: Path, sql: str) -> list[tuple]:
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


@dataclass
class SweepRuns:
    """What the background thread recorded: the sweep, then (when it succeeded) the failure case."""

    workdir: Path
    sweep: harness.SlurmRun
    database_before_failure: bytes | None  # the sweep's database, read before the failure case ran
    failure: harness.SlurmRun | None


def run_sweep_then_failure_case(workdir: Path, failure_case: bool, stop: threading.Event) -> SweepRuns:
    """The sweep of SWEEP_CONFIG; when it succeeds and ``failure_case`` is asked for (and the session has
    not asked to ``stop``), the same workdir again with FAILING_RUNS added."""
    config = workdir / "config.yaml"
    config.write_text(SWEEP_CONFIG)
    sweep = run_snakemake_on_slurm(workdir, REPO / "Snakefile", ARGS, timeout=900, stop=stop)
    if sweep.returncode != 0 or not failure_case or stop.is_set():
        return SweepRuns(workdir, sweep, None, None)
    before = (workdir / "results" / "lipflow.duckdb").read_bytes()
    config.write_text(SWEEP_CONFIG.replace("\nevaluations:", FAILING_RUNS.rstrip() + "\nevaluations:"))
    failure = run_snakemake_on_slurm(workdir, REPO / "Snakefile", ARGS, timeout=600, stop=stop)
    return SweepRuns(workdir, sweep, before, failure)


class BackgroundSweep:
    """Brings the test cluster up and runs run_sweep_then_failure_case in a thread; leaving the `with` block
    waits for the thread, then brings the cluster down unless it was already up before. Under pytest-xdist
    (``-n 2``) one worker runs it (see :func:`claim_sweep`) and leaves its outcome in ``publish_to`` for the
    other worker, which may be the one that runs these tests (:class:`SweepOfAnotherWorker`)."""

    def __init__(self, workdir: Path, failure_case: bool, publish_to: Path | None = None):
        self.workdir = workdir
        self.failure_case = failure_case  # only when test_failed_job_is_reported… is selected
        self.publish_to = publish_to
        self.stop = threading.Event()  # set when the session ends before a test read the runs: Snakemake is interrupted
        self.delivered = False
        self.brought_up = False
        self.cluster_output = ""
        self._thread = ThreadPoolExecutor(max_workers=1)

    def __enter__(self) -> "BackgroundSweep":
        self._runs = self._thread.submit(self._bring_up_and_run)
        return self

    def _bring_up_and_run(self) -> SweepRuns:
        try:
            harness.check_can_run_cluster()
            self.brought_up = not harness.cluster_is_up()  # brought down at the end, also after a failed bring-up
            self.cluster_output = harness.cluster("up")
            runs = run_sweep_then_failure_case(self.workdir, self.failure_case, self.stop)
        except Exception as err:
            publish(self.publish_to, err if isinstance(err, harness.SlurmUnavailable) else RuntimeError(
                f"the SLURM sweep failed in another pytest worker: {err!r}"), "")
            raise
        publish(self.publish_to, runs, self.cluster_output)
        return runs

    def runs(self) -> SweepRuns:
        """Wait for the thread; skip where this machine cannot run the cluster."""
        try:
            runs = self._runs.result()
        except harness.SlurmUnavailable as reason:
            pytest.skip(f"SLURM tests skipped: {reason}")
        self.delivered = True
        return runs

    def __exit__(self, *exc_info) -> None:
        self._thread.shutdown(wait=True)
        if self.brought_up:
            harness.cluster("down")


OUTCOME = "slurm_sweep.pickle"  # in the session's shared temporary folder: the sweep's runs, or why it failed


def claim_sweep(shared: Path) -> bool:
    """Whether this pytest-xdist worker is the first to claim the sweep (one cluster per machine)."""
    try:
        os.close(os.open(shared / "slurm_sweep.claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def publish(shared: Path | None, outcome: SweepRuns | Exception, cluster_output: str) -> None:
    if shared is not None:
        partial = shared / (OUTCOME + ".partial")
        partial.write_bytes(pickle.dumps((outcome, cluster_output)))
        partial.rename(shared / OUTCOME)


class SweepOfAnotherWorker:
    """The sweep another pytest-xdist worker runs: :meth:`runs` waits for its published outcome."""

    delivered = True  # nothing to stop here

    def __init__(self, shared: Path):
        self.shared = shared
        self.cluster_output = ""

    def runs(self) -> SweepRuns:
        deadline = time.monotonic() + 1800
        while not (self.shared / OUTCOME).exists():
            assert time.monotonic() < deadline, "the other pytest worker never published the SLURM sweep"
            time.sleep(1)
        outcome, self.cluster_output = pickle.loads((self.shared / OUTCOME).read_bytes())
        if isinstance(outcome, harness.SlurmUnavailable):
            pytest.skip(f"SLURM tests skipped: {outcome}")
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


@pytest.fixture(scope="module")
def sweep(slurm_sweep_in_background: BackgroundSweep) -> SweepRuns:
    runs = slurm_sweep_in_background.runs()
    print(slurm_sweep_in_background.cluster_output)
    return runs


def test_lipflow_sweep_runs_every_job_on_slurm(sweep):
    workdir, run = sweep.workdir, sweep.sweep
    assert run.returncode == 0, run.output[-6000:]
    by_rule: dict[str, list] = {}
    for job in run.jobs:
        assert job.state == "COMPLETED", job
        assert job.log.name == f"{job.job_id}.log" and job.log.is_file(), job  # job ids in the logs
        by_rule.setdefault(job.rule.split("_")[0], []).append(job)
    assert sorted((rule, len(jobs)) for rule, jobs in by_rule.items()) == [("data", 1), ("evaluation", 4), ("train", 4)]
    db = workdir / "results" / "lipflow.duckdb"
    rows = query(db, "select name, status, slurm_job_id, cuda_visible_devices from runs order by name")
    assert [r[:2] for r in rows] == [(f"r{i}", "completed") for i in range(1, 5)]
    train_jobs = {job.job_id: job for job in by_rule["train"]}
    for name, _, job_id, visible in rows:
        assert job_id in train_jobs, (name, job_id)  # the run trained inside the SLURM job squeue reports
        assert train_jobs[job_id].tres == "gres:gpu:1"
        assert visible in ("0", "1"), (name, visible)  # set by SLURM: the harness strips it beforehand
    evals = query(db, "select eval, count(distinct run_id) from evals group by eval order by eval")
    assert evals == [("rank", 4), ("val", 4)]
    assert query(db, "select count(distinct run_id), max(step) from train_metrics") == [(4, 6)]


def test_failed_job_is_reported_and_the_others_finish(sweep):
    workdir, first, run = sweep.workdir, sweep.sweep, sweep.failure
    assert first.returncode == 0, first.output[-3000:]
    db = workdir / "results" / "lipflow.duckdb"
    assert run.returncode != 0, run.output[-6000:]
    states = {(job.rule, job.wildcards.split("-")[0]): job.state for job in run.jobs}
    assert states.get(("train", "broken")) == "FAILED", (states, run.output[-3000:])
    assert states.get(("train", "r5")) == "COMPLETED", states
    assert "Error in rule train" in run.output and "broken-" in run.output
    assert len(list((workdir / "results" / "runs").glob("r5-*/evals.parquet"))) == 1  # r5's evaluations finished
    assert not list((workdir / "results" / "runs").glob("broken-*/model.safetensors"))
    assert db.read_bytes() == sweep.database_before_failure  # the earlier database is untouched
