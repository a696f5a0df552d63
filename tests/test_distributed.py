"""Data-parallel training on CPU (gloo, 2 processes started by ``python -m lipflow.train`` itself) trains the
same model as one process on the same global batch; the workers never outlive their launcher (lipflow's or
torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_stage


def test_two_gloo_processes_match_one_process_with_the_global_batch(char_shards, tiny_run_config, tmp_path):
    cfg = {**tiny_run_config, "model": "lipschitz_gpt", "optimizer": "muon", "lr": 0.05,
           "weight_constraint": "spectral_soft_cap", "steps": 6, "eval_every": 3, "checkpoint_every": 3}
    single = {**cfg, "batch_size": 2 * cfg["batch_size"]}
    one = run_stage("lipflow.train", "--run-id", "one-00000000", "--config-json", json.dumps(single),
                    "--data-dir", str(char_shards), "--out-dir", str(tmp_path / "one"), "--no-progress")
    assert one.returncode == 0, one.stderr
    two = run_stage("lipflow.train", "--run-id", "two-00000000", "--config-json", json.dumps({**cfg, "nproc": 2}),
                    "--data-dir", str(char_shards), "--out-dir", str(tmp_path / "two"), "--no-progress")
    assert two.returncode == 0, two.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "run.json").read_text())
    assert summary["processes"] == 2 and summary["status"] == "completed"
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    moved = 0
    for name in a:
        assert torch.allclose(a[name], b[name], atol=2e-5, rtol=1e-4), name
        moved += int(not torch.equal(a[name], torch.zeros_like(a[name])))
    assert moved > 0


def _orthogonalize_on_rank(rank: int, world: int, init_file: str, result_file: str) -> None:
    import torch.distributed as dist

    from lipflow.optimizers import muon as optimizers

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    stack = torch.randn(5, 12, 8, generator=torch.Generator().manual_seed(0))
    computed = []
    plain = optimizers.newton_schulz

    def counting(g, steps, *args):
        computed.append(g.shape[0])
        return plain(g, steps, *args)

    optimizers.newton_schulz = counting
    out = optimizers._orthogonalize(stack, 5)
    torch.save({"out": out, "computed": computed}, f"{result_file}.{rank}")
    dist.destroy_process_group()


def test_distributed_muon_splits_newton_schulz_across_ranks(tmp_path):
    """Two gloo ranks each orthogonalize 3 of 5 matrices (one a zero pad); the all-gathered result
    equals one process doing all 5."""
    import torch.multiprocessing as mp

    from lipflow.optimizers import newton_schulz

    mp.spawn(_orthogonalize_on_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "result")), nprocs=2)
    expected = newton_schulz(torch.randn(5, 12, 8, generator=torch.Generator().manual_seed(0)), 5)
    for rank in range(2):
        result = torch.load(tmp_path / f"result.{rank}")
        assert result["computed"] == [3]
        torch.testing.assert_close(result["out"], expected, atol=1e-6, rtol=0)


def rank_of(pid: int) -> str | None:
    """The RANK in process ``pid``'s environment (a worker's), None for a process without one."""
    from pathlib import Path

    environ = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item)
    return environ[b"RANK"].decode() if b"RANK" in environ else None


def holds_run_lock(pid: int, out) -> bool:
    """Whether process ``pid`` has the run folder's lock file open, and only for itself: close-on-exec
    (``O_CLOEXEC`` in /proc's fdinfo), so no process it starts takes the lock along (Linux /proc)."""
    from pathlib import Path

    from lipflow.train.build import RUN_LOCK

    lock = [fd for fd in os.listdir(f"/proc/{pid}/fd") if Path(f"/proc/{pid}/fd/{fd}").resolve() == (out / RUN_LOCK).resolve()]
    flags = [int(next(line.split()[1] for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines()
                      if line.startswith("flags:")), 8) for fd in lock]
    return len(lock) == 1 and all(flag & os.O_CLOEXEC for flag in flags)


def processes_running(marker: str) -> list[int]:
    """Pids of this machine's live processes whose command line contains ``marker`` (Linux /proc)."""
    import os
    from pathlib import Path

    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next(line for line in (entry / "status").read_text().splitlines() if line.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if marker in cmdline and "zombie" not in state and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    return pids


LAUNCHERS = {"lipflow": ["-m", "lipflow.train"],
             "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lipflow.train"]}


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's prctl")
@pytest.mark.parametrize("launcher_name", sorted(LAUNCHERS))
def test_workers_stop_when_their_launcher_is_killed(char_shards, tiny_run_config, tmp_path, launcher_name):
    """torchrun puts each worker in a session of its own: a SIGKILL of the launcher (or of the job's
    process group) left the workers training into the run's folder. Now they get SIGTERM and stop (the
    preemption path), under lipflow's launcher too: no worker left, no run.json. And while they finish
    their step and save its checkpoint the run folder stays locked (a rerun then would train beside
    them): lipflow's workers inherit their launcher's lock, and torchrun's rank 0, which writes the
    run's files, holds its own."""
    import os
    import signal
    import time

    out = tmp_path / "killed"
    cfg = {**tiny_run_config, "steps": 100_000, "eval_every": 100_000, "checkpoint_every": 20, "nproc": 2}
    launcher = subprocess.Popen([sys.executable, *LAUNCHERS[launcher_name], "--run-id", "killed-00000000",
                                 "--config-json", json.dumps(cfg), "--data-dir", str(char_shards), "--out-dir",
                                 str(out), "--no-progress"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("checkpoints/*.safetensors")) and time.monotonic() < deadline:  # in the training loop
        time.sleep(0.5)
    assert len(processes_running(str(out))) >= 3  # the launcher and 2 workers
    ranks = {pid: rank_of(pid) for pid in processes_running(str(out))}
    writers = [pid for pid, rank in ranks.items() if rank == "0" or (rank and launcher_name == "lipflow")]
    assert len(writers) == (2 if launcher_name == "lipflow" else 1), ranks
    assert all(holds_run_lock(pid, out) for pid in writers), ranks  # inherited (lipflow), or rank 0's own
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 120
    while processes_running(str(out)) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = processes_running(str(out))
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [] and not (out / "run.json").exists()
