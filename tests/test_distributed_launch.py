"""Runs of ``nproc`` > 1 as the train rule starts them (``python -m lipflow.train``, which starts its own
workers): a resume is bit-exact at any process count, a bad input is one line and exit 2, SIGTERM stops
every worker after the step in flight, and a stage run by hand with another process count is refused."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file

TORCHRUN_ONE = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m")
ENDLESS = {"steps": 100_000, "eval_every": 100_000, "checkpoint_every": 5}  # a run that trains until stopped


def train_command(run_id: str, cfg: dict, data_dir: Path, out: Path, launcher: tuple[str, ...] = ("-m",)) -> list[str]:
    """The train rule's command for one run (or, with ``launcher``, torchrun's)."""
    return [sys.executable, *launcher, "lipflow.train", "--run-id", run_id, "--config-json", json.dumps(cfg),
            "--data-dir", str(data_dir), "--out-dir", str(out), "--no-progress"]


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                     if line.startswith("State:"))
    except (OSError, StopIteration):
        return False
    return "zombie" not in state


def children(pid: int) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]


def wait_until_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids still alive after waiting up to ``timeout`` s for them to exit."""
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [pid for pid in pids if alive(pid)]


def wait_for(path: Path, launcher: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until ``path`` exists (a checkpoint: the run is in its loop) while ``launcher`` runs."""
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        assert launcher.poll() is None, launcher.communicate()[1][-2000:]
        time.sleep(0.02)
    assert path.exists(), f"{path} did not appear in {timeout} s"


class Launch:
    """A launcher process and the workers it was seen with."""

    def __init__(self, process: subprocess.Popen):
        self.process, self.workers = process, []

    def find_workers(self, count: int) -> list[int]:
        self.workers = children(self.process.pid)
        assert len(self.workers) == count, self.workers
        return self.workers


@contextlib.contextmanager
def launched(command: list[str]) -> Iterator[Launch]:
    """``command`` started in a session of its own (stderr piped); on the way out whatever is left of it
    and of the workers it was seen with is SIGKILLed, so no test leaves a run training."""
    launch = Launch(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True))
    try:
        yield launch
    finally:
        for pid in launch.workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if launch.process.poll() is None:
            os.killpg(launch.process.pid, signal.SIGKILL)
            launch.process.communicate()


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


def test_an_input_one_worker_refuses_mid_run_is_its_one_line_without_the_others_traceback(char_shards,
                                                                                         tiny_run_config, tmp_path):
    """Rank 0 refuses to write its step-6 checkpoint beside a user's file in its sidecar's place (one line,
    exit 2) after the step-3 one: rank 1, waiting for it in a barrier, printed gloo's "Connection closed by
    peer" traceback (some 30 lines) after that line, as the refusing worker's connections close before the
    launcher sees it exit. It now stops quietly: the job's log is the refusal's line."""
    out = tmp_path / "run"
    sidecar = out / "checkpoints" / "step-000000006.safetensors.sha256"
    sidecar.parent.mkdir(parents=True)
    sidecar.write_text("my notes")
    done = subprocess.run(train_command("m-00000000", {**tiny_run_config, "nproc": 2}, char_shards, out),
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0] == (f"lipflow: error: checksum file {sidecar} exists and is not a sha256 checksum; refusing to "
                        "replace it (if it is a damaged earlier output, delete it)")
    assert (out / "checkpoints" / "step-000000003.safetensors.sha256").exists()  # refused mid-run


def test_a_folder_in_a_checkpoint_files_place_is_refused_at_start_up_in_one_line(char_shards, tiny_run_config,
                                                                                  tmp_path):
    """A folder named as a checkpoint's sidecar passed the start-up check: beside a checkpoint, each worker
    then failed reading it ("[Errno 21] Is a directory", once per worker); one for a later step, the run
    failed writing it, after training up to that step. The launcher refuses it before any worker starts."""
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "step-000000003.safetensors").write_text("no weights")
    (checkpoints / "step-000000003.safetensors.sha256").mkdir()
    done = subprocess.run(train_command("f-00000000", {**tiny_run_config, "nproc": 2}, char_shards, out),
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and lines == [
        f"lipflow: error: --out-dir {out}: {checkpoints}/step-000000003.safetensors.sha256 is a folder where "
        "training writes a file; refusing to train into it (move it away)"], done.stderr[-3000:]


def test_a_worker_stops_quietly_only_after_another_refused_an_input(tmp_path, monkeypatch):
    """run_beside_other_workers: a user error is written to the shared refusals file and raised (run_guarded
    prints it); a failure with nothing written there keeps its traceback; once another worker wrote there,
    a failure is exit 2 (its traceback kept with LIPFLOW_DEBUG=1); without the launcher's file, nothing changes."""
    from lipflow.launcher import REFUSALS_FD, run_beside_other_workers

    def fails(error: Exception):
        def work() -> int:
            raise error
        return work

    with open(tmp_path / "refusals", "w+b") as refusals:
        monkeypatch.setenv(REFUSALS_FD, str(refusals.fileno()))
        monkeypatch.setenv("RANK", "1")
        monkeypatch.delenv("LIPFLOW_DEBUG", raising=False)
        with pytest.raises(RuntimeError, match="Connection closed by peer"):
            run_beside_other_workers(fails(RuntimeError("Connection closed by peer")))
        assert run_beside_other_workers(lambda: 0) == 0
        with pytest.raises(OSError, match="disk full"):
            run_beside_other_workers(fails(OSError("disk full")))
        assert (tmp_path / "refusals").read_text() == "1\n"
        assert run_beside_other_workers(fails(RuntimeError("Connection closed by peer"))) == 2
        monkeypatch.setenv("LIPFLOW_DEBUG", "1")
        with pytest.raises(RuntimeError, match="Connection closed by peer"):
            run_beside_other_workers(fails(RuntimeError("Connection closed by peer")))
        monkeypatch.delenv(REFUSALS_FD)
        monkeypatch.delenv("LIPFLOW_DEBUG")
        with pytest.raises(RuntimeError, match="Connection closed by peer"):
            run_beside_other_workers(fails(RuntimeError("Connection closed by peer")))


def test_an_lr_the_soft_cap_refuses_is_one_line_before_any_worker(char_shards, tiny_run_config, tmp_path, capsys,
                                                                   monkeypatch):
    """Each worker built its learner and refused the lr itself: two identical `lipflow: error: lr: …` lines
    at nproc 2. The launcher now checks it once (on the meta device) and starts no worker."""
    from lipflow import distributed
    from lipflow.train.__main__ import main

    def no_workers(*args, **kwargs):
        raise AssertionError("workers started for a config the launcher should refuse")

    monkeypatch.setattr(distributed, "launch_workers", no_workers)
    cfg = {**tiny_run_config, "nproc": 2, "model": "lipschitz_gpt", "optimizer": "muon",
           "weight_constraint": "spectral_soft_cap", "lr": 1e29}
    code = main(train_command("c-00000000", cfg, char_shards, tmp_path / "out")[3:])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lipflow: error: lr: "), lines
    assert not (tmp_path / "out").exists()


linux_only = pytest.mark.skipif(sys.platform != "linux", reason="pgrep, /proc and the parent-death signal")


@linux_only
def test_another_runs_checkpoint_is_one_line_before_any_worker(char_shards, tiny_run_config, tmp_path, capsys,
                                                                monkeypatch):
    """Each worker found, on resuming, that the --out-dir's checkpoint is another run config's, and refused it:
    two identical `lipflow: error: … is another run's checkpoint` lines at nproc 2. The launcher now checks
    the newest checkpoint's header with its inputs and starts no worker."""
    from lipflow import distributed
    from lipflow.train.__main__ import main

    other = {**tiny_run_config, "steps": 3, "checkpoint_every": 3, "seed": 1}
    done = subprocess.run(train_command("c-00000000", other, char_shards, tmp_path / "other"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.copytree(tmp_path / "other" / "checkpoints", tmp_path / "out" / "checkpoints")

    def no_workers(*args, **kwargs):
        raise AssertionError("workers started for an --out-dir the launcher should refuse")

    monkeypatch.setattr(distributed, "launch_workers", no_workers)
    code = main(train_command("c-00000000", {**tiny_run_config, "nproc": 2}, char_shards, tmp_path / "out")[3:])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "another run's checkpoint" in lines[0], lines


def test_a_worker_that_fails_takes_the_others_down(char_shards, tiny_run_config, tmp_path):
    """A worker that dies (here: SIGKILL, as the kernel's OOM killer does) fails the run with its own
    code, and the other worker is stopped, not left waiting in a collective."""
    out = tmp_path / "run"
    with launched(train_command("k-00000000", {**tiny_run_config, **ENDLESS, "nproc": 2}, char_shards, out)) as launch:
        wait_for(out / "checkpoints" / "step-000000005.safetensors.sha256", launch.process)
        os.kill(launch.find_workers(2)[1], signal.SIGKILL)
        launch.process.communicate(timeout=120)
        assert wait_until_gone(launch.workers, 30) == []
    assert launch.process.returncode == 128 + signal.SIGKILL
    assert not (out / "run.json").exists()


@linux_only
def test_sigterm_to_one_worker_checkpoints_after_the_step_in_flight(char_shards, tiny_run_config, tmp_path):
    """The workers agreed on a stop only every 10 steps (or at an eval or checkpoint step): SIGTERM just
    after the step-21 checkpoint stopped the run at step 30, time a cluster's kill grace may not leave. Now
    they agree after every step: the stop comes within a few steps (steps of about 0.1 s here, so a busy
    machine's delay in sending the signal is a step or two), and the launcher exits 143 (torchrun exited 1)."""
    cfg = {**tiny_run_config, "d_model": 128, "n_heads": 4, "n_layers": 2, "context": 64, "batch_size": 16,
           "steps": 1000, "eval_every": 1000, "checkpoint_every": 21, "nproc": 2}
    out = tmp_path / "run"
    with launched(train_command("t-00000000", cfg, char_shards, out)) as launch:
        wait_for(out / "checkpoints" / "step-000000021.safetensors.sha256", launch.process)
        os.kill(launch.find_workers(2)[-1], signal.SIGTERM)  # one worker: a signal may reach one rank first
        _, stderr = launch.process.communicate(timeout=120)
    assert launch.process.returncode == 143, stderr[-2000:]
    stops = {int(line.split("SIGTERM at step ")[1].split(":")[0]) for line in stderr.splitlines()
             if "SIGTERM at step " in line}
    assert len(stops) == 1 and 21 < min(stops) <= 25, stderr[-2000:]  # both workers, one step
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


@linux_only
def test_a_torchrun_worker_of_one_process_stops_when_torchrun_is_killed(char_shards, tiny_run_config, tmp_path):
    """Under torchrun even one process joins a process group and asks for SIGTERM when its launcher
    dies (``init_from_env``): a SIGKILLed torchrun of --nproc_per_node=1 leaves no worker training on into
    the run's folder."""
    out = tmp_path / "run"
    with launched(train_command("one-00000000", {**tiny_run_config, **ENDLESS}, char_shards, out,
                                TORCHRUN_ONE)) as launch:
        wait_for(out / "checkpoints" / "step-000000005.safetensors.sha256", launch.process)
        launch.find_workers(1)
        os.kill(launch.process.pid, signal.SIGKILL)
        launch.process.wait()
        assert wait_until_gone(launch.workers, 60) == []
    assert not (out / "run.json").exists()


@linux_only
def test_workers_stop_when_their_launcher_is_killed_while_they_start(char_shards, tiny_run_config, tmp_path):
    """A launcher SIGKILLed while its workers start up (importing torch, loading the data: seconds) left
    them training into the run's folder forever: ``terminate_with_launcher`` read the parent pid when the
    worker reached ``init_from_env``, by when it had been reparented, so the parent-death signal never
    came. The launcher now passes its own pid to the workers, which see that their parent is no longer
    it (torchrun's workers still take the parent they start with). No worker left, no run.json."""
    out = tmp_path / "run"
    with launched(train_command("race-00000000", {**tiny_run_config, **ENDLESS, "nproc": 2}, char_shards,
                                out)) as launch:
        deadline = time.monotonic() + 60
        while len(children(launch.process.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        launch.find_workers(2)
        os.kill(launch.process.pid, signal.SIGKILL)  # before the workers reach init_from_env
        launch.process.wait()
        left = wait_until_gone(launch.workers, 30)
    assert left == [] and not (out / "run.json").exists(), sorted(p.name for p in out.glob("checkpoints/*"))


def maps_torch(pid: int) -> bool:
    """Whether process ``pid`` has begun importing torch (a libtorch library is mapped into it)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@linux_only
def test_a_torchrun_worker_stops_when_torchrun_is_killed_while_it_imports_torch(char_shards, tiny_run_config,
                                                                                tmp_path):
    """torchrun does not give its workers its pid, so a worker takes the parent it has when it asks for
    the parent-death signal. It asked in ``init_from_env``, after importing torch and checking its inputs
    (seconds): torchrun SIGKILLed meanwhile left it reparented, asking about init, and then waiting in
    ``init_process_group`` for the store that torchrun's agent held, until the group's timeout (30 min).
    The train stage now asks first, before it imports torch. No worker left, no run.json."""
    out = tmp_path / "run"
    with launched(train_command("tr-00000000", {**tiny_run_config, **ENDLESS}, char_shards, out,
                                TORCHRUN_ONE)) as launch:
        deadline = time.monotonic() + 60
        while not children(launch.process.pid) and time.monotonic() < deadline:
            time.sleep(0.005)
        (worker,) = launch.find_workers(1)
        while not maps_torch(worker) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert maps_torch(worker)
        os.kill(launch.process.pid, signal.SIGKILL)  # while the worker imports torch
        launch.process.wait()
        left = wait_until_gone([worker], 30)
    assert left == [] and not (out / "run.json").exists()


@linux_only
def test_sigint_to_the_launcher_does_not_return_before_its_workers(char_shards, tiny_run_config, tmp_path):
    """SIGINT to the launcher alone (``kill -INT``, ``timeout -s INT``) raised KeyboardInterrupt in its
    wait loop: it exited (130, a traceback) while both workers trained on and wrote checkpoints into the
    run's folder. Now the signal reaches the workers, which take it as SIGTERM (a KeyboardInterrupt in
    one rank's collective left the other waiting in it): both stop after the same step with a checkpoint,
    and the launcher returns 130 only after they exited."""
    out = tmp_path / "run"
    with launched(train_command("int-00000000", {**tiny_run_config, **ENDLESS, "nproc": 2}, char_shards,
                                out)) as launch:
        wait_for(out / "checkpoints" / "step-000000005.safetensors.sha256", launch.process)
        launch.find_workers(2)
        os.kill(launch.process.pid, signal.SIGINT)
        launch.process.wait(timeout=60)  # (communicate would also wait for the workers to close stderr)
        running_when_it_returned = [pid for pid in launch.workers if alive(pid)]
        stderr = launch.process.stderr.read()
    assert running_when_it_returned == [], f"the launcher exited {launch.process.returncode} with workers running"
    assert launch.process.returncode == 128 + signal.SIGINT and "Traceback" not in stderr, stderr[-2000:]
    stops = {int(line.split("SIGINT at step ")[1].split(":")[0]) for line in stderr.splitlines()
             if "SIGINT at step " in line}
    assert len(stops) == 1 and (out / "checkpoints" / f"step-{min(stops):09d}.safetensors").exists(), stderr[-2000:]
