"""A results tree made by an earlier lipflow stays up to date: `snakemake -n` has nothing to do.

``tests/data/saved_results/tiny_config_1b9edc6.tgz`` is the full output of ``snakemake -c2`` on
``tests/data/tiny_config.yaml`` (corpus, tokens, two trained runs, five evaluations each, the database
and Snakemake's own metadata) made at commit 1b9edc6, before the config/train/results restructuring.
A code change that alters a run id, a rule's params or an output path would make Snakemake rerun
(and overwrite) a user's finished work; this test fails then.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAVED = REPO / "tests" / "data" / "saved_results" / "tiny_config_1b9edc6.tgz"
pytestmark = pytest.mark.e2e


def dry_run(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "-c1", "-n", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture
def saved_tree(tmp_path) -> Path:
    with tarfile.open(SAVED) as archive:
        archive.extractall(tmp_path, filter="data")  # keeps the archived modification times
    return tmp_path


# Outputs added since the archive was made: drawn from the finished results, replacing nothing of them
# (the database's receipt is named by a digest of its inputs since 2026-12-07: the database alone is
# rebuilt once, from the saved runs).
ADDED_JOBS = {"training_curves", "database"}


def test_results_made_before_the_restructuring_need_nothing(saved_tree):
    """Nothing of the saved tree is rerun: the dry run has only the jobs of outputs added since
    (ADDED_JOBS, each for a missing output) and the `all` rule that asks for them."""
    done = dry_run(saved_tree)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = done.stdout.split("Job stats:")[1].split("total")[0].splitlines()[3:]
    assert {line.split()[0] for line in stats if line.strip()} == ADDED_JOBS | {"all"}, done.stdout[-3000:]
    reasons = [part for line in done.stdout.splitlines() if line.strip().startswith("reason:")
               for part in line.strip().removeprefix("reason: ").split("; ")]
    assert {reason.split(": ")[0] for reason in reasons} == {"Input files updated by another job",
                                                             "Missing output files"}, reasons
    missing = {path for reason in reasons if reason.startswith("Missing output files: ")
               for path in reason.split(": ")[1].split(", ")}
    [receipt] = [path for path in missing if re.fullmatch(r"results/lipflow\.duckdb\.[0-9a-f]{12}\.built", path)]
    assert missing == {"results/figures/training_curves.png", "results/figures/training_curves.svg",
                       "results/figures/training_curves.drawn", receipt}, reasons


def test_a_changed_knob_in_the_saved_tree_reruns_its_run(saved_tree):
    config = saved_tree / "config.yaml"
    config.write_text(config.read_text().replace("steps: 20", "steps: 21"))
    done = dry_run(saved_tree)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Nothing to be done" not in done.stdout + done.stderr
    assert "train" in done.stdout
