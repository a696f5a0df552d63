"""Runs of ``nproc`` > 1 as the train rule starts them (``python -m lipflow.train``, which starts its own
workers): a resume is bit-exact at any process count, a bad input is one line and exit 2, SIGTERM stops
every worker after the step in flight, and a stage run by hand with another process count is refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_stage


def train_command(run_id: str, cfg: dict, data_dir: Path, out: Path) -> list[str]:
    """The train rule's command for one run."""
    return [sys.executable, "-m", "lipflow.train", "--run-id", run_id, "--config-json", json.dumps(cfg),
            "--data-dir", str(data_dir), "--out-dir", str(out), "--no-progress"]


def test_three_process_resume_is_bit_exact(char_shards, tiny_run_config, tmp_path):
    """A resumed run's weights equal an uninterrupted run's bit for bit, with 3 processes too: DDP rebuilt
    its gradient buckets after each process's first step, so the first step after a resume summed a
    3-rank ring in another order (weights off by up to 6e-8); the gradients are now averaged in one
    fixed layout. (With 2 ranks the sum a + b has one order, so only 3 or more could show it.)"""
    cfg = {**tiny_run_config, "nproc": 3, "steps": 6, "checkpoint_every": 3, "eval_every": 3}
    full = subprocess.run(train_command("r-00000000", cfg, char_shards, tmp_path / "full"), capture_output=True,
                          text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]
    # what a run killed after its step-3 checkpoint leaves behind
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    for name in ("step-000000003.safetensors", "step-000000003.safetensors.sha256"):
        shutil.copy(tmp_path / "full" / "checkpoints" / name, tmp_path / "resumed" / "checkpoints" / name)
    resumed = subprocess.run(train_command("r-00000000", cfg, char_shards, tmp_path / "resumed"),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step-000000003" in resumed.stderr
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert [name for name in a if not torch.equal(a[name], b[name])] == []
    assert json.loads((tmp_path / "full" / "run.json").read_text())["processes"] == 3


def test_a_bad_input_is_one_line_and_exit_2(tiny_run_config, tmp_path):
    """torchrun turned its workers' exit 2 into exit 1 and added a ChildFailedError traceback (~35
    lines), one `lipflow: error:` line per worker before it; the inputs are now checked once, before any
    worker starts."""
    done = subprocess.run(train_command("b-00000000", {**tiny_run_config, "nproc": 2}, tmp_path / "no-such-data",
                                        tmp_path / "out"), capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "no token shards" in lines[0], done.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_a_worker_that_fails_takes_the_others_down(char_shards, tiny_run_config, tmp_path):
    """A worker that dies (here: SIGKILL, as the kernel's OOM killer does) fails the run with its own
    code, and the other worker is stopped, not left waiting in a collective."""
    cfg = {**tiny_run_config, "steps": 100_000, "eval_every": 100_000, "checkpoint_every": 5, "nproc": 2}
    out = tmp_path / "run"
    launcher = subprocess.Popen(train_command("k-00000000", cfg, char_shards, out), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(out / "checkpoints" / "step-000000005.safetensors.sha256")
        workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2
        os.kill(int(workers[1]), signal.SIGKILL)
        launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 128 + signal.SIGKILL
    assert not (out / "run.json").exists()


def wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.exists(), f"{path} did not appear in {timeout} s"


@pytest.mark.skipif(sys.platform != "linux", reason="pgrep")
def test_sigterm_to_one_worker_checkpoints_after_the_step_in_flight(char_shards, tiny_run_config, tmp_path):
    """The workers agreed on a stop only every 10 steps (or at an eval or checkpoint step): SIGTERM just
    after the step-11 checkpoint stopped the run at step 20, time a cluster's kill grace may not leave. Now
    they agree after every step: the stop comes within a step or two, the launcher exits 143 (torchrun
    exited 1), and a rerun resumes from the stop."""
    cfg = {**tiny_run_config, "d_model": 64, "n_heads": 4, "context": 32, "batch_size": 8, "steps": 1000,
           "eval_every": 1000, "checkpoint_every": 11, "nproc": 2}
    out = tmp_path / "run"
    launcher = subprocess.Popen(train_command("t-00000000", cfg, char_shards, out), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(out / "checkpoints" / "step-000000011.safetensors.sha256")
        workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        os.kill(int(workers[-1]), signal.SIGTERM)  # one worker: a signal may reach one rank first
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 143, stderr[-2000:]
    stops = {int(line.split("SIGTERM at step ")[1].split(":")[0]) for line in stderr.splitlines()
             if "SIGTERM at step " in line}
    assert len(stops) == 1 and 11 < min(stops) <= 14, stderr[-2000:]  # both workers, one step
    assert (out / "checkpoints" / f"step-{min(stops):09d}.safetensors").exists()


def test_a_stage_run_with_another_process_count_than_nproc_is_refused(char_shards, tiny_run_config, tmp_path):
    """batch_size is per process and the run id hashes nproc: a worker of 2 processes (as torchrun
    --nproc_per_node=2 starts it) of a run whose config says nproc 1 trained half of each global batch
    under that id. It is refused in one line naming nproc, before anything is written."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    done = subprocess.run(train_command("m-00000000", tiny_run_config, char_shards, tmp_path / "out"),
                          capture_output=True, text=True, timeout=120, env=env)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "nproc" in lines[0], done.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_train_memory_and_cpu_requests_grow_with_nproc():
    """Each of nproc processes holds the model, its gradients, optimizer state and its own batch's
    activations: the default model with nproc 4 peaked at 1338 MB (summed PSS) against a request of
    1020 MB, the request for nproc 1. Memory and CPUs are now asked for per process."""
    from lipflow.plan import Plan
    from lipflow.plan_rules import RuleFunctions

    def requested(nproc: int) -> tuple[int, int]:
        plan = Plan.from_config({"runs": {"r": {"nproc": nproc, "device": "cpu"}}})
        (run,) = plan.runs
        rules, wildcards = RuleFunctions(plan), type("Wildcards", (), {"run": run})
        return rules.train_mem_mb(wildcards, 1), rules.train_cpus(wildcards)

    (mem_1, cpus_1), (mem_4, cpus_4) = requested(1), requested(4)
    assert mem_4 == 4 * mem_1 and cpus_4 == 4 * cpus_1


def test_the_tokens_column_counts_the_global_batch(monkeypatch):
    """`tokens` is the tokens the model has trained on: one step of 2 processes × 4 windows × 16 tokens is
    128 tokens (it said 64, one process's share, while tokens_per_s counted all 128)."""
    from lipflow import distributed
    from lipflow.train.telemetry import StepLog, StepResult

    monkeypatch.setattr(distributed, "mean_tensor_across_ranks", lambda t, topo: t)  # no process group here
    log = StepLog({"batch_size": 4, "grad_accum": 1, "context": 16}, distributed.Topology(rank=0, world=2))
    log.add(1, 1.0, StepResult(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(0)))
    (row,), bad_step = log.flush()
    assert row["tokens"] == 128 and round(row["tokens_per_s"] * row["step_time"]) == 128
