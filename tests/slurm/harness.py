"""Run Snakemake against the local test cluster (tests/slurm/cluster.sh) and read back what SLURM did.

Used by tests/test_slurm.py and bench/slurm_overhead.py. Without slurmdbd there is no `sacct`; the jobs of
a run are found through the plugin's submission lines ("... submitted with SLURM jobid N (log: PATH)") and
described by `squeue --states=all` (finished jobs stay visible for MinJobAge=3600 s).
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "tests" / "slurm" / "cluster.sh"
USER_PROFILE = REPO / "profiles" / "slurm"
TEST_PROFILE = REPO / "tests" / "slurm" / "profile"

_SUBMISSION = re.compile(r"submitted with SLURM jobid (\S+) \(log: (.+?)\)\.?$", re.MULTILINE)
# The fields read from squeue; the comment is the plugin's "rule_<rule>[_wildcards_<values>]".
_SQUEUE_FIELDS = ("JobID", "Comment", "State", "Partition", "NumCPUs", "MinMemory", "TimeLimit", "tres-per-job",
                  "SubmitTime", "StartTime", "EndTime")


class SlurmUnavailable(Exception):
    """This machine cannot run the test cluster at all (not root, or neither SLURM nor apt-get)."""


def check_can_run_cluster() -> None:
    """Raise SlurmUnavailable with the reason where cluster.sh cannot work; return where it can."""
    if not sys.platform.startswith("linux"):
        raise SlurmUnavailable(f"the SLURM test cluster needs Linux, not {sys.platform}")
    if os.geteuid() != 0:
        raise SlurmUnavailable("the SLURM test cluster needs root (it starts munged, slurmctld and slurmd)")
    installed = all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not installed and not shutil.which("apt-get"):
        raise SlurmUnavailable("SLURM is not installed and there is no apt-get to install it")


def cluster(command: str) -> str:
    """Run `cluster.sh up|down`; return its output, raise RuntimeError with the output on failure."""
    proc = subprocess.run(["bash", str(CLUSTER_SCRIPT), command], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"tests/slurm/cluster.sh {command} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def cluster_is_up() -> bool:
    return subprocess.run(["bash", str(CLUSTER_SCRIPT), "status"]).returncode == 0


@dataclass
class SlurmJob:
    """One SLURM job of a Snakemake run, as squeue describes it."""

    job_id: str
    rule: str  # for a group job, the plugin's name for the group: "<group>_<rule>..."
    wildcards: str  # the plugin's wildcard string: values joined by "_"; "" for rules without wildcards
    state: str
    partition: str
    cpus: int
    memory: str  # as squeue prints it, e.g. "2000M"
    time_limit: str  # as squeue prints it, e.g. "5:00" or "1:00:00"
    tres: str  # e.g. "gres:gpu:1", "gres:gpu:testgpu:1", "N/A"
    submitted: datetime.datetime | None
    started: datetime.datetime | None
    ended: datetime.datetime | None
    log: Path

    @property
    def queue_seconds(self) -> float:
        """Submission to start, in whole seconds (SLURM's resolution)."""
        return (self.started - self.submitted).total_seconds()

    @property
    def run_seconds(self) -> float:
        return (self.ended - self.started).total_seconds()

    @property
    def label(self) -> str:
        """"<rule>_<wildcards>", or the rule name for a rule without wildcards (e.g. "train_4", "aggregate")."""
        return f"{self.rule}_{self.wildcards}" if self.wildcards else self.rule


@dataclass
class SlurmRun:
    returncode: int
    output: str  # Snakemake's stdout and stderr, interleaved
    jobs: list[SlurmJob]
    seconds: float


def _time(value: str) -> datetime.datetime | None:
    return None if value in ("N/A", "Unknown", "None") else datetime.datetime.fromisoformat(value)


def _describe_jobs(submissions: list[tuple[str, Path]]) -> list[SlurmJob]:
    if not submissions:
        return []
    ids = ",".join(job_id for job_id, _ in submissions)
    fields = ",".join(f"{field}:|" for field in _SQUEUE_FIELDS)  # ":|" = no width limit, "|" after the value
    listing = subprocess.run(["squeue", "--states=all", "--noheader", "--jobs", ids, "--Format", fields],
                             capture_output=True, text=True, check=True).stdout
    rows = {row[0]: row for row in (line.split("|")[:len(_SQUEUE_FIELDS)] for line in listing.splitlines()) if row[0]}
    jobs = []
    for job_id, log in submissions:
        if job_id not in rows:
            raise AssertionError(f"SLURM job {job_id} is unknown to squeue --states=all:\n{listing}")
        _, comment, state, partition, cpus, memory, time_limit, tres, submitted, started, ended = rows[job_id]
        rule, _, wildcards = comment.removeprefix("rule_").partition("_wildcards_")
        jobs.append(SlurmJob(job_id, rule, wildcards, state, partition, int(cpus), memory, time_limit, tres,
                             _time(submitted), _time(started), _time(ended), log))
    return jobs


def run_snakemake_on_slurm(workdir: Path, snakefile: Path, extra_args: Sequence[str] = (),
                           timeout: float = 240, stop: threading.Event | None = None) -> SlurmRun:
    """Run `snakemake --profile profiles/slurm --profile tests/slurm/profile` in `workdir`.

    The test profile only adds what the local cluster needs (fast status checks, kept logs, no retries).
    CUDA_VISIBLE_DEVICES is removed from the environment, so any value a job sees was set by SLURM.
    On timeout, or as soon as ``stop`` is set (the test session ends early), Snakemake gets SIGINT (SIGTERM
    does not stop it while it waits for jobs), then is killed.
    """
    env = {key: value for key, value in os.environ.items()
           if key != "CUDA_VISIBLE_DEVICES" and not key.startswith(("SLURM_", "SBATCH_", "SNAKEMAKE_PROFILE"))}
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--directory", str(workdir),
               "--profile", str(USER_PROFILE), "--profile", str(TEST_PROFILE), *map(str, extra_args)]
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = start + timeout
    while True:
        try:  # in slices, so that a stop request is seen within a second (retrying loses no output)
            output, _ = proc.communicate(timeout=1.0)
            break
        except subprocess.TimeoutExpired:
            stopped = stop is not None and stop.is_set()
            if not stopped and time.perf_counter() < deadline:
                continue
        proc.send_signal(signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        reason = "was stopped: the test session ended early" if stopped else f"did not finish within {timeout} s"
        raise AssertionError(f"snakemake {reason}:\n{output[-6000:]}") from None
    seconds = time.perf_counter() - start
    submissions = [(job_id, workdir / log) for job_id, log in _SUBMISSION.findall(output)]
    return SlurmRun(proc.returncode, output, _describe_jobs(submissions), seconds)
