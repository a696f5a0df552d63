"""What a training worker learns from the launcher that started it (``lipflow.distributed.launch_workers``
or torchrun), without importing torch: how many processes it runs among, that it must stop when
the launcher dies, and (``launch_workers`` only) whether another worker refused an input. The train
stage asks to stop with the launcher first, so that torch's seconds of import lie after the request,
not before it."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Callable

from lipflow.errors import USER_ERRORS

PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent exits
LAUNCHER_PID = "LIPFLOW_LAUNCHER_PID"  # launch_workers puts its own pid here in its workers' environment
# and here the open files it handed them (the run folder's lock, the refusals file), comma-separated
HANDED_FDS = "LIPFLOW_HANDED_FDS"
REFUSALS_FD = "LIPFLOW_REFUSALS_FD"  # and here the one of them all share: a worker that refuses an input writes there


def keep_handed_files_private() -> None:
    """Make the files the launcher handed this worker (``$LIPFLOW_HANDED_FDS``) non-inheritable again:
    the run folder's lock is held until the last holder exits, so a process this worker starts (with
    ``close_fds=False``, ``os.system``) must not take it along and outlive the run holding it."""
    for fd in filter(None, os.environ.get(HANDED_FDS, "").split(",")):
        os.set_inheritable(int(fd), False)


def processes_in_env() -> int | None:
    """The number of processes a launcher (``launch_workers`` or torchrun) started this one among,
    from the environment; None when no launcher started it."""
    return int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None


def terminate_with_launcher() -> None:
    """A worker whose launcher is killed must not train on into the run's folder (torchrun starts
    each worker in a session of its own, which a SIGKILL of the job's process group misses). On Linux
    the worker asks for SIGTERM when its parent exits: the preemption path (checkpoint, exit 143), or
    the default action before the train loop has begun. ``launch_workers`` passes its own pid
    (``$LIPFLOW_LAUNCHER_PID``), so a launcher killed before this request is seen too: the worker's
    parent is then no longer the launcher, and the worker sends itself SIGTERM. torchrun passes no pid,
    so its workers take the parent they have at the request: one orphaned before it (in the tenth of a
    second before the stage's first line) waits in ``init_process_group`` for the store that torchrun's
    agent held until the group's timeout, then fails, without training."""
    if sys.platform != "linux":
        return
    recorded = os.environ.get(LAUNCHER_PID)
    launcher = int(recorded) if recorded else os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != launcher:  # it exited before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_beside_other_workers(work: Callable[[], int]) -> int:
    """``work()`` in a worker of ``launch_workers``. A refused input (a user error, which ``run_guarded`` prints
    as one line, exit 2) is first written to the file the launcher shares among its workers
    (``$LIPFLOW_REFUSALS_FD``), while this worker's connections to the others are still open; any other
    failure once another worker wrote there follows from that refusal (a collective found its connection
    closed: gloo's "Connection closed by peer") and ends this worker quietly with exit 2, where it printed a
    traceback after the refusal's line (``LIPFLOW_DEBUG=1`` keeps it). The launcher cannot stop it first: the
    refusing worker's connections close before its exit is seen."""
    fd = os.environ.get(REFUSALS_FD)
    if fd is None:  # torchrun's worker, or one process
        return work()
    try:
        return work()
    except USER_ERRORS:
        os.write(int(fd), f"{os.environ.get('RANK')}\n".encode())
        raise
    except Exception:
        if os.fstat(int(fd)).st_size == 0 or os.environ.get("LIPFLOW_DEBUG"):
            raise
        return 2  # the refused input's code (run_guarded's)
