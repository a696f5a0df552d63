"""Properties of lipflow's worker launcher (``launch_workers``, ``exit_code``, ``free_port``) and of the
collectives the workers use (``average_gradients``, ``largest_on_any_rank``, ``init_from_env``) that the end-to-end
runs of tests/test_distributed*.py do not pin down: each test here fails for a plausible wrong version of
the code (found by mutation testing). The launcher tests start stand-in workers (a few lines of Python
that exit, sleep or handle SIGTERM as told), so each takes a second or two."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lipflow import distributed, launcher
from test_distributed_launch import alive

PREEMPTED = 143

# A stand-in worker: ``python -m fake_worker SPEC OUT``; SPEC is a JSON list, one entry per rank:
# sleep (s, before exiting), exit (its code), kill_self (a signal it sends itself instead of exiting),
# on_term ("exit": exit with term_code, default 143; "ignore": note it and sleep on). Each starts its sleep
# once every rank has set its SIGTERM handler and noted "ready" in its log.
FAKE_WORKER = textwrap.dedent("""
    import json, os, signal, sys, time

    rank = int(os.environ["RANK"])
    spec = json.loads(sys.argv[1])[rank]
    out = sys.argv[2]

    def note(what):
        with open(os.path.join(out, f"rank{rank}.log"), "a") as log:
            log.write(what + "\\n")

    def on_term(signum, frame):
        note("SIGTERM")
        if spec.get("on_term", "exit") == "exit":
            sys.exit(spec.get("term_code", 143))

    signal.signal(signal.SIGTERM, on_term)
    with open(os.path.join(out, f"env{rank}.json"), "w") as f:
        json.dump({"pid": os.getpid(), **{k: os.environ.get(k) for k in
                   ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")}}, f)
    note("ready")
    everyone = time.monotonic() + 60  # all ranks are ready (their SIGTERM handlers set) before any goes on
    while not all(os.path.exists(os.path.join(out, f"rank{r}.log")) for r in range(int(os.environ["WORLD_SIZE"]))):
        assert time.monotonic() < everyone
        time.sleep(0.01)
    deadline = time.monotonic() + spec.get("sleep", 0)
    while time.monotonic() < deadline:
        time.sleep(0.01)
    if "kill_self" in spec:
        os.kill(os.getpid(), spec["kill_self"])
        time.sleep(10)
    note("exit")
    sys.exit(spec.get("exit", 0))
""")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Runs ``launch_workers`` (in this process) over stand-in workers; returns (code, seconds, logs)."""
    (tmp_path / "fake_worker.py").write_text(FAKE_WORKER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    out = tmp_path / "out"
    out.mkdir()

    def launch(specs: list[dict]) -> tuple[int, float, list[list[str]]]:
        started = time.monotonic()
        try:
            code = distributed.launch_workers(len(specs), "fake_worker", [json.dumps(specs), str(out)], PREEMPTED)
        finally:
            for rank in range(len(specs)):  # a wrong launcher may leave one running
                stop_pid_of(out / f"env{rank}.json")
        return code, time.monotonic() - started, worker_logs(out, len(specs))

    launch.out = out
    return launch


def worker_logs(out: Path, nproc: int) -> list[list[str]]:
    return [(out / f"rank{rank}.log").read_text().split() if (out / f"rank{rank}.log").exists() else []
            for rank in range(nproc)]


def stop_pid_of(env_file: Path) -> None:
    if env_file.exists():
        pid = json.loads(env_file.read_text())["pid"]
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("job_threads, nproc, each", [("4", 2, "2"), ("2", 2, "1"), ("1", 3, "1"), ("6", 3, "2")])
def test_workers_share_the_jobs_threads(fake, monkeypatch, job_threads, nproc, each):
    """Snakemake gives a job OMP_NUM_THREADS = its ``threads`` (2 per process for a train job); each of the
    nproc workers runs its share, at least one, not all of them (nproc times the cores reserved)."""
    monkeypatch.setenv("OMP_NUM_THREADS", job_threads)
    code, _, _ = fake([{}] * nproc)
    assert code == 0
    assert [json.loads((fake.out / f"env{rank}.json").read_text())["OMP_NUM_THREADS"] for rank in range(nproc)] \
        == [each] * nproc


def test_exit_code_is_what_a_shell_reports():
    """A worker killed by signal N (Popen's returncode -N) counts as 128 + N, as the shell, Snakemake
    and SLURM report it; a process's own exit status is kept as is (0 stays success)."""
    assert [distributed.exit_code(c) for c in (0, 1, 2, 143, -signal.SIGKILL, -signal.SIGTERM)] == \
        [0, 1, 2, 143, 137, 143]


def test_each_worker_gets_its_rank_and_all_share_one_rendezvous(fake):
    """Every worker has the torchrun --standalone environment: RANK and LOCAL_RANK its own index
    (LOCAL_RANK picks its GPU), WORLD_SIZE nproc, and the same MASTER_ADDR:MASTER_PORT, so that they
    meet in one process group."""
    code, _, _ = fake([{}, {}, {}])
    envs = [json.loads((fake.out / f"env{rank}.json").read_text()) for rank in range(3)]
    assert code == 0
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in envs] == [("0", "0", "3"), ("1", "1", "3"),
                                                                            ("2", "2", "3")]
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == {("127.0.0.1", envs[0]["MASTER_PORT"])}
    assert int(envs[0]["MASTER_PORT"]) > 0


def test_a_worker_that_finishes_first_does_not_stop_the_others(fake):
    """Success is not a failure: a worker that exits 0 while another still works (rank 0 writes the
    run's files last, or a rank has less to do) does not get the others SIGTERMed, and the run is 0."""
    code, _, logs = fake([{"exit": 0}, {"sleep": 1.0, "exit": 0}])
    assert code == 0 and "SIGTERM" not in logs[1] and "exit" in logs[1], logs


def test_one_failure_fails_the_run_even_if_another_worker_finished(fake):
    """A run is 0 only when every worker exits 0: one that finished does not hide another's failure."""
    code, _, _ = fake([{"exit": 0}, {"sleep": 0.3, "exit": 1}])
    assert code == 1


def test_a_refused_input_is_exit_2_although_the_other_worker_was_then_stopped(fake):
    """A worker that refused an input (exit 2, its one line) makes the run exit 2, the code Snakemake
    and the user read as "fix the input", not the other worker's 143 from the SIGTERM it then got."""
    code, _, logs = fake([{"sleep": 30}, {"sleep": 0.2, "exit": 2}])
    assert code == 2 and "SIGTERM" in logs[0], logs


def test_a_refused_input_is_exit_2_even_after_another_worker_failed_first(fake):
    """Exit 2 wins over an earlier failure: one worker crashes (exit 1), and the other, stopped by the
    launcher, then refuses an input (exit 2, its line): the run exits 2, "fix the input", as the
    launcher's docstring says ("2 when one refused an input"), not the first failure's 1."""
    code, _, logs = fake([{"sleep": 0.2, "exit": 1}, {"sleep": 30, "term_code": 2}])
    assert code == 2 and "SIGTERM" in logs[1], logs


def test_a_worker_killed_by_a_signal_fails_the_run_with_128_plus_n(fake):
    """A worker the OOM killer SIGKILLs fails the run with 137 (not 143 from the survivor it stopped:
    a rerun must not be told it was merely preempted)."""
    code, _, logs = fake([{"sleep": 30}, {"sleep": 0.2, "kill_self": int(signal.SIGKILL)}])
    assert code == 128 + signal.SIGKILL and "SIGTERM" in logs[0], logs


def test_a_worker_killed_by_a_signal_is_named_in_one_line_at_the_end(fake, capsys):
    """A worker the OOM killer SIGKILLs prints nothing, and the survivor's error is gloo's "Connection closed
    by peer ... Check the logs of the remote worker" traceback: the launcher's last line names the worker
    and the signal. A refused input (exit 2) already printed its line: the launcher adds none."""
    code, _, _ = fake([{"sleep": 30}, {"sleep": 0.2, "kill_self": int(signal.SIGKILL)}])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 128 + signal.SIGKILL and "worker 1 of 2" in last and "SIGKILL" in last, last
    code, _, _ = fake([{"sleep": 30}, {"sleep": 0.2, "exit": 2}])
    assert code == 2 and capsys.readouterr().err == ""


def test_a_failure_beside_a_preempted_worker_is_not_reported_as_preempted(fake):
    """One worker exits 143 first and the other then fails (exit 1): the run failed and exits 1;
    exit 143 would tell Snakemake and the user that a rerun simply resumes."""
    code, _, logs = fake([{"sleep": 30, "term_code": 1}, {"sleep": 0.2, "exit": PREEMPTED}])
    assert code == 1 and "SIGTERM" in logs[0], logs


def test_all_preempted_is_143(fake):
    """Workers that all stopped for SIGTERM (exit 143, or finished) make the run exit 143."""
    code, _, _ = fake([{"sleep": 0.2, "exit": PREEMPTED}, {"sleep": 30}])
    assert code == PREEMPTED


def test_when_one_worker_fails_the_others_get_sigterm_at_once(fake):
    """The survivors of a failure get SIGTERM right away (their checkpoint path), not only SIGKILL
    ``KILL_AFTER_S`` (60 s) later."""
    code, seconds, logs = fake([{"sleep": 60}, {"sleep": 0.2, "exit": 3}])
    assert code == 3 and "SIGTERM" in logs[0] and seconds < 20, (seconds, logs)


def test_a_worker_that_ignores_sigterm_is_killed_after_kill_after_s(fake, monkeypatch):
    """A survivor that does not stop on SIGTERM (stuck in a collective, or its flag never read) is
    SIGKILLed ``KILL_AFTER_S`` later, so the launcher never waits forever."""
    monkeypatch.setattr(distributed, "KILL_AFTER_S", 0.5)
    code, seconds, logs = fake([{"sleep": 60, "on_term": "ignore"}, {"sleep": 0.2, "exit": 3}])
    assert code == 3 and logs[0] == ["ready", "SIGTERM"] and seconds < 20, (seconds, logs)


def test_the_launcher_puts_back_the_sigterm_handler_it_found(fake):
    """While it runs, the launcher's SIGTERM handler forwards the signal to its workers; afterwards the
    caller's handler is back (a later SIGTERM must not go to finished workers and be swallowed)."""
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        code, _, _ = fake([{}, {}])
        assert code == 0 and signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def launcher_process(tmp_path: Path, specs: list[dict], kill_after_s: float, driver_setup: str = "pass"):
    """Start ``launch_workers`` over stand-in workers in a process of its own (as ``python -m
    lipflow.train`` runs it; ``driver_setup`` is Python run there first), wait until every worker is
    ready and yield (the process, the output folder, the workers' pids); afterwards a wrong launcher's
    leftovers are killed."""
    (tmp_path / "fake_worker.py").write_text(FAKE_WORKER)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    driver = subprocess.Popen([sys.executable, "-c", f"import signal, sys; from lipflow import distributed; {driver_setup}; "
                               f"distributed.KILL_AFTER_S = {kill_after_s}; "
                               "sys.exit(distributed.launch_workers(2, 'fake_worker', sys.argv[1:], 143))",
                               json.dumps(specs), str(out)], env=env)
    try:
        deadline = time.monotonic() + 60
        while worker_logs(out, 2) != [["ready"], ["ready"]] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert worker_logs(out, 2) == [["ready"], ["ready"]]
        yield driver, out, [json.loads((out / f"env{rank}.json").read_text())["pid"] for rank in range(2)]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for rank in range(2):
            stop_pid_of(out / f"env{rank}.json")


def sigterm_to_a_launcher_process(tmp_path: Path, specs: list[dict], kill_after_s: float) -> tuple[int, list[int]]:
    """SIGTERM a launcher process (``launcher_process``) once every worker is ready, and return its exit
    code and the workers still alive when it returned."""
    with launcher_process(tmp_path, specs, kill_after_s) as (driver, out, pids):
        driver.send_signal(signal.SIGTERM)
        driver.wait(timeout=30)
        running = [pid for pid in pids if alive(pid)]
    assert worker_logs(out, 2) == [["ready", "SIGTERM"], ["ready", "SIGTERM"]]
    return driver.returncode, running


@pytest.mark.skipif(sys.platform != "linux", reason="/proc")
def test_sigterm_to_the_launcher_stops_every_worker_before_it_exits_143(tmp_path):
    """SIGTERM to the launcher (what Snakemake and SLURM send the job) reaches every worker (which
    checkpoint and exit 143), and the launcher waits for them: it exits 143 itself, not killed by the
    signal, and no worker outlives it (writing into the run's folder after the job ended)."""
    code, running = sigterm_to_a_launcher_process(tmp_path, [{"sleep": 30}, {"sleep": 30}], kill_after_s=60)
    assert code == PREEMPTED and running == [], (code, running)


@pytest.mark.skipif(sys.platform != "linux", reason="/proc")
def test_a_worker_that_ignores_a_passed_on_sigterm_is_killed_after_kill_after_s(tmp_path):
    """SIGTERM to the launcher reaches a worker that does not stop (stuck in a collective, its flag never
    read): ``KILL_AFTER_S`` later it gets SIGKILL, so the launcher (and the Snakemake or SLURM job
    waiting on it) does not hang; the run exits 137, not 143, since that worker saved no checkpoint."""
    code, running = sigterm_to_a_launcher_process(tmp_path, [{"sleep": 60, "on_term": "ignore"}, {"sleep": 60}],
                                                  kill_after_s=0.5)
    assert code == 128 + signal.SIGKILL and running == [], (code, running)


@pytest.mark.skipif(sys.platform != "linux", reason="/proc")
def test_workers_hold_the_run_folders_lock_after_their_launcher_is_sigkilled(tmp_path):
    """The train stage locks the run folder and hands the lock to its workers (``pass_fds``): a launcher
    SIGKILLed while its workers still finish their step and save its checkpoint left the folder free
    for a rerun to train beside them. It stays locked until the last worker exits."""
    from lipflow.train.build import exclusive_run_folder

    run = tmp_path / "run"
    take_lock = (f"from lipflow.train.build import exclusive_run_folder; "
                 f"held = exclusive_run_folder(__import__('pathlib').Path({str(run)!r}), 'run-00000000'); "
                 "lock = held.__enter__(); "
                 "launch = distributed.launch_workers; "
                 "distributed.launch_workers = lambda *a: launch(*a, pass_fds=(lock,))")
    with launcher_process(tmp_path, [{"sleep": 60, "on_term": "ignore"}] * 2, 60, take_lock) as (driver, out, pids):
        driver.kill()
        driver.wait()
        for pid in pids:  # each worker in turn: while any runs, the folder is locked
            with pytest.raises(FileExistsError, match="another process is training run run-00000000"):
                with exclusive_run_folder(run, "run-00000000"):
                    pass
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
    with exclusive_run_folder(run, "run-00000000") as lock:
        assert lock is not None


def test_free_port_never_names_a_port_in_use():
    """The rendezvous port is one nothing listens on: two launches on one machine (Snakemake runs
    jobs side by side) must not meet in one rendezvous, nor fail to bind it."""
    taken = []
    try:
        for _ in range(5):
            port = distributed.free_port()
            assert port not in [s.getsockname()[1] for s in taken]
            listener = socket.socket()
            listener.bind(("127.0.0.1", port))  # free: it binds
            listener.listen()
            taken.append(listener)
    finally:
        for s in taken:
            s.close()


def test_processes_in_env_is_none_without_a_launcher(monkeypatch):
    """Without WORLD_SIZE no launcher started this process (the stage then launches nproc workers or
    trains alone); with it, its value."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launcher.processes_in_env() is None
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert launcher.processes_in_env() == 3


def test_world_size_without_rank_is_one_line_naming_both(monkeypatch):
    """WORLD_SIZE left in the environment without RANK (no launcher sets one alone) was a KeyError that
    printed as `missing key 'RANK'`, as if a file lacked it (a plain KeyError is a bug's now, with its
    traceback): it is a one-line ValueError naming both variables and what to do."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match=r"^WORLD_SIZE is set \(2\) but RANK is not: unset WORLD_SIZE "):
        distributed.init_from_env(torch.device("cpu"))


def test_one_process_neither_averages_nor_agrees_through_a_process_group():
    """With one process (no process group exists) gradients are left as they are and a flag is its own
    value: no collective is attempted."""
    one = distributed.Topology()
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    distributed.average_gradients([p], one)
    assert torch.equal(p.grad, torch.tensor([1.0, 2.0, 3.0]))
    assert distributed.largest_on_any_rank(15, one) == 15 and distributed.largest_on_any_rank(0, one) == 0


def _collectives_on_rank(rank: int, world: int, init_file: str, result_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    topo = distributed.Topology(rank, world)
    base = torch.arange(1.0, 7.0)
    params = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4, dtype=torch.float64)),
              torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(2))]
    params[0].grad = base.view(2, 3) * (rank + 1)
    params[1].grad = torch.full((4,), 10.0 * (rank + 1), dtype=torch.float64)
    params[3].grad = torch.tensor([rank + 1.0, -(rank + 1.0)])  # params[2] has no gradient
    distributed.average_gradients(params, topo)
    # a stop flag on one rank, on none, on all; and two signals (SIGTERM 15 on rank 0, SIGINT 2 on the other)
    flags = [distributed.largest_on_any_rank(int(rank == world - 1), topo), distributed.largest_on_any_rank(0, topo),
             distributed.largest_on_any_rank(1, topo), distributed.largest_on_any_rank(15 if rank == 0 else 2, topo)]
    torch.save({"grads": [p.grad for p in params], "flags": flags}, f"{result_file}.{rank}")
    dist.destroy_process_group()


def test_gradients_are_averaged_over_ranks_and_every_rank_agrees_on_the_largest_value(tmp_path):
    """Two gloo ranks whose gradients are 1× and 2× a pattern end with 1.5× it on every rank, for each
    dtype (float32 and float64 are all-reduced apart) and every parameter (a parameter without a
    gradient keeps none): the mean, not the sum. ``largest_on_any_rank`` is every rank's largest value on
    every rank: a stop flag on one rank is set on all (a SIGTERM to one worker stops them all), and of two
    signals all name the same one."""
    import torch.multiprocessing as mp

    mp.spawn(_collectives_on_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "result")), nprocs=2)
    base = torch.arange(1.0, 7.0)
    for rank in range(2):
        result = torch.load(tmp_path / f"result.{rank}")
        grads = result["grads"]
        torch.testing.assert_close(grads[0], base.view(2, 3) * 1.5, rtol=0, atol=1e-6)
        assert grads[1].dtype == torch.float64
        torch.testing.assert_close(grads[1], torch.full((4,), 15.0, dtype=torch.float64), rtol=0, atol=1e-12)
        assert grads[2] is None
        torch.testing.assert_close(grads[3], torch.tensor([1.5, -1.5]), rtol=0, atol=1e-6)
        assert result["flags"] == [1, 0, 1, 15]


def test_on_cuda_flags_are_agreed_on_a_cpu_gloo_group(monkeypatch):
    """On GPUs the default group is NCCL, which cannot all-reduce a CPU tensor (and would wait for the
    GPU): ``init_from_env`` also makes a gloo group, and ``largest_on_any_rank`` agrees over it. (The process group
    calls are recorded, so this runs without GPUs.)"""
    import torch.distributed as dist

    calls = []
    control = object()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", str(device))))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "new_group", lambda **kw: calls.append(("new_group", kw)) or control)
    topo, device = distributed.init_from_env(torch.device("cuda"))
    assert str(device) == "cuda:1" and (topo.rank, topo.world, topo.local_rank) == (1, 2, 1)
    assert ("init", "nccl") in calls and ("new_group", {"backend": "gloo"}) in calls and topo.control is control

    reduced = []

    def all_reduce(t, op=None, group=None):
        reduced.append((t.device.type, op, group))
        t.fill_(1)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    assert distributed.largest_on_any_rank(0, topo) == 1
    assert reduced == [("cpu", dist.ReduceOp.MAX, control)]


def test_a_worker_whose_launcher_died_before_prctl_took_effect_stops_itself(monkeypatch):
    """``terminate_with_launcher`` asks for SIGTERM when the launcher exits; if the launcher exited
    before that request (the worker was reparented), the request will never fire, so the worker sends
    itself SIGTERM at once. The launcher is ``$LIPFLOW_LAUNCHER_PID`` where ``launch_workers`` set it,
    else the parent at the request (torchrun's workers)."""
    killed, requested = [], []

    class FakeLibc:
        def prctl(self, option, sig):
            requested.append((option, sig))

    monkeypatch.setattr(launcher.sys, "platform", "linux")
    monkeypatch.setattr(launcher.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    monkeypatch.setattr(launcher.ctypes, "CDLL", lambda *a, **kw: FakeLibc())
    monkeypatch.setattr(launcher.os, "getppid", lambda: 1)  # init, after the launcher died
    monkeypatch.setenv("LIPFLOW_LAUNCHER_PID", "4242")
    launcher.terminate_with_launcher()
    assert requested == [(launcher.PR_SET_PDEATHSIG, signal.SIGTERM)]
    assert killed == [(os.getpid(), signal.SIGTERM)]
    monkeypatch.setattr(launcher.os, "getppid", lambda: 4242)  # the launcher, alive
    launcher.terminate_with_launcher()
    monkeypatch.delenv("LIPFLOW_LAUNCHER_PID")
    parents = iter([4242, 1])  # torchrun at the request, then init: it died between the two reads
    monkeypatch.setattr(launcher.os, "getppid", lambda: next(parents))
    launcher.terminate_with_launcher()
    assert len(requested) == 3 and killed == [(os.getpid(), signal.SIGTERM)] * 2


def test_sigterm_stops_a_single_process_run_that_cannot_finish_first(char_shards, tiny_run_config, tmp_path):
    """SIGTERM to a one-process run (no launcher, no process group) stops it with a checkpoint and exit
    143. tests/test_reliability.py's SIGTERM test skips when the run exits 0, which is also what a run
    that ignores SIGTERM does; this run has 100000 steps, so only a stop ends it in time."""
    cfg = {**tiny_run_config, "steps": 100_000, "eval_every": 100_000, "checkpoint_every": 5}
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lipflow.train", "--run-id", "s-00000000", "--config-json",
                             json.dumps(cfg), "--data-dir", str(char_shards), "--out-dir", str(out), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("checkpoints/*.sha256")) and time.monotonic() < deadline:
            assert proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == PREEMPTED and "SIGTERM at step " in err, err[-2000:]
    step = int(err.split("SIGTERM at step ")[1].split(":")[0])
    assert (out / "checkpoints" / f"step-{step:09d}.safetensors").exists()


def test_sigterm_watch_only_sets_a_flag_and_puts_back_the_handler_it_found():
    """While a run's loop is in ``SigtermWatch``, SIGTERM sets a flag that ``requested`` reports (the
    loop then checkpoints); afterwards the handler in place before is back, so a SIGTERM after the loop
    (or to a process that trained in-process) is handled as its owner meant, not silently dropped."""
    from lipflow.train.stop import SigtermWatch

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with SigtermWatch(distributed.Topology()) as watch:
            assert watch.requested() is False
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 5
            while not watch.arrived and time.monotonic() < deadline:
                time.sleep(0.01)
            assert watch.requested() is True
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_signals_ignored_inside_the_watch_stay_ignored_after_it():
    """A run that completes calls ``ignore_stop_signals`` inside the watch; leaving the watch must not put
    the handlers found on entry back over it (then a SIGTERM while the process exits would end a finished
    run with 143), while the handlers the watch set itself are replaced as before."""
    from lipflow.train.stop import SigtermWatch, ignore_stop_signals

    def mine(signum, frame):
        pass

    previous = {sig: signal.signal(sig, mine) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with SigtermWatch(distributed.Topology()):
            ignore_stop_signals()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_rank_0_names_the_stop_signal_that_reached_only_another_rank(monkeypatch):
    """Rank 0 alone says why the run stopped; when only another rank got the signal it names it (it
    said "a stop signal to another process"), and a rank other than 0 says nothing."""
    from lipflow.train.stop import SigtermWatch

    monkeypatch.setattr(distributed, "largest_on_any_rank", lambda value, topo: max(value, signal.SIGTERM))
    for rank in (0, 1):
        with SigtermWatch(distributed.Topology(rank=rank, world=2)) as watch:
            assert watch.requested() is True
            stop = watch.stop(7)
        assert str(stop).startswith("SIGTERM at step 7: checkpoint saved") and "another process" in str(stop)
        assert stop.exit_code == 143 and stop.announce is (rank == 0)


def test_a_run_of_one_process_trains_in_the_stage_itself(char_shards, tiny_run_config, tmp_path, monkeypatch):
    """``nproc: 1`` without a launcher trains in the stage's own process: no worker is started (no
    second Python with its own copy of torch beside the one the memory request counts, no rendezvous
    port, no process group)."""
    from lipflow.train.__main__ import main

    def no_workers(*args, **kwargs):
        raise AssertionError(f"launch_workers{args} for a run of nproc 1")

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed, "launch_workers", no_workers)
    code = main(["--run-id", "one-00000000", "--config-json", json.dumps({**tiny_run_config, "steps": 2}),
                 "--data-dir", str(char_shards), "--out-dir", str(tmp_path / "one"), "--no-progress"])
    assert code == 0 and json.loads((tmp_path / "one" / "run.json").read_text())["processes"] == 1


def test_the_stage_starts_its_workers_with_its_own_arguments(char_shards, tiny_run_config, tmp_path, monkeypatch):
    """A run of nproc > 1 starts nproc workers of ``lipflow.train`` with the arguments the stage was
    given (to ``main(argv)`` as on the command line, not this process's sys.argv), and tells the
    launcher that 143 means preempted (so a crash beside a stopped worker is not reported as one); the
    workers are handed the open lock file of the run folder."""
    from lipflow.train.__main__ import main

    launched = []

    def launch(*args):
        launched.append(args[:4] + (os.path.realpath(f"/proc/self/fd/{args[4][0]}"),))
        return 0

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed, "launch_workers", launch)
    argv = ["--run-id", "two-00000000", "--config-json", json.dumps({**tiny_run_config, "nproc": 2}),
            "--data-dir", str(char_shards), "--out-dir", str(tmp_path / "two"), "--no-progress"]
    assert main(argv) == 0
    assert launched == [(2, "lipflow.train", argv, PREEMPTED, str((tmp_path / "two" / ".train.lock").resolve()))]


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_the_stop_watch_takes_sigterm_and_sigint_and_then_puts_back_both_handlers(stop_signal):
    """In the training loop SIGTERM and SIGINT (Ctrl-C) each only record their arrival; the stop exits
    128 + that signal (143, 130). When the loop ends, the handlers in place before are back for both
    signals: a Ctrl-C during the run's last writes, or in a notebook or program that trained in-process,
    is not recorded by a watch nobody reads any more and silently lost."""
    from lipflow.train.stop import SigtermWatch

    def mine(signum, frame):
        pass

    previous = {sig: signal.signal(sig, mine) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with SigtermWatch(distributed.Topology()) as watch:
            assert watch.requested() is False
            os.kill(os.getpid(), stop_signal)
            deadline = time.monotonic() + 5
            while not watch.requested() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert watch.requested() is True
            stop = watch.stop(7)
        assert stop.exit_code == 128 + stop_signal and f"{stop_signal.name} at step 7" in str(stop)
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is mine
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_a_second_stop_signal_stops_at_once_and_puts_back_the_handlers(stop_signal, monkeypatch):
    """The first signal waits for the step in flight; a copy arriving with it (the launcher passing a
    Ctrl-C on to workers that got it too) is the same stop, but a second one later (Ctrl-C again,
    during a step of a huge grad_accum that takes hours) raises SecondSignal at once, exit 128 + the
    signal, and the handlers in place before are back."""
    from lipflow.train import stop
    from lipflow.train.stop import SecondSignal, SigtermWatch

    monkeypatch.setattr(stop, "SECOND_SIGNAL_AFTER_S", 0.5)

    def mine(signum, frame):
        pass

    previous = {sig: signal.signal(sig, mine) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.raises(SecondSignal) as caught:
            with SigtermWatch(distributed.Topology()) as watch:
                os.kill(os.getpid(), stop_signal)
                deadline = time.monotonic() + 5
                while not watch.arrived and time.monotonic() < deadline:
                    time.sleep(0.01)
                os.kill(os.getpid(), stop_signal)  # a copy of the same stop: recorded once, no exception
                time.sleep(0.6)
                os.kill(os.getpid(), stop_signal)
                time.sleep(5)  # a long step: interrupted by the second signal
        assert caught.value.exit_code == 128 + stop_signal and f"a second {stop_signal.name}" in str(caught.value)
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is mine
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_a_run_whose_workers_failed_before_writing_leaves_no_folder(char_shards, tiny_run_config, tmp_path,
                                                                     monkeypatch):
    """The launcher's failure comes back as an exit code (not raised); a run that wrote nothing still
    leaves no run folder behind, as a failed one-process run does."""
    from lipflow.train.__main__ import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed, "launch_workers", lambda *args: 2)
    out = tmp_path / "two"
    argv = ["--run-id", "two-00000000", "--config-json", json.dumps({**tiny_run_config, "nproc": 2}),
            "--data-dir", str(char_shards), "--out-dir", str(out), "--no-progress"]
    assert main(argv) == 2 and not out.exists()
