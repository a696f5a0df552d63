"""Data-parallel training on one machine: ``launch_workers`` starts ``nproc`` processes (the
environment ``torchrun --standalone`` gives its workers, which may start them instead), and they
average their gradients (NCCL on GPU, gloo on CPU).

Every rank draws the same global batch from the same seeded generator and keeps its own slice,
so the data-loader state is identical on all ranks and rank 0's checkpoint resumes them all.
Gradients are averaged in one fixed layout (``average_gradients``), so a resumed run sums them in
the order an uninterrupted one does. Decisions that end the loop (divergence, SIGTERM) are
all-reduced so every rank stops together.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist

from lipflow.launcher import HANDED_FDS, LAUNCHER_PID, REFUSALS_FD, processes_in_env


@dataclass(frozen=True)
class Topology:
    """This process's place in the group; ``control`` is the CPU (gloo) group that agrees on flags
    without waiting for the GPU (None: the default group, already gloo on CPU)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    control: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: torch.device) -> tuple[Topology, torch.device]:
    """Join the process group the launcher describes in the environment (a no-op without one;
    under torchrun also for one process, so ``nproc: 1`` runs the NCCL/gloo code paths). The train
    stage has already asked to stop with the launcher (``lipflow.launcher.terminate_with_launcher``)."""
    world = processes_in_env()
    if world is None:
        return Topology(), device
    if "RANK" not in os.environ:  # a launcher sets both: WORLD_SIZE alone is left from elsewhere
        raise ValueError(f"WORLD_SIZE is set ({world}) but RANK is not: unset WORLD_SIZE (python -m lipflow.train "
                         "starts its nproc workers itself), or start the workers with torchrun")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    control = dist.new_group(backend="gloo") if device.type == "cuda" else None
    return Topology(rank, world, local_rank, control), device


def mean_tensor_across_ranks(t: torch.Tensor, topo: Topology) -> torch.Tensor:
    """The mean of ``t`` over ranks (one all-reduce, no host sync); ``t`` itself for one process."""
    if topo.world == 1:
        return t
    t = t.double()
    dist.all_reduce(t)
    return t / topo.world


def largest_on_any_rank(value: int, topo: Topology) -> int:
    """The largest ``value`` over ranks: a CPU all-reduce over the control group, which waits for the
    other ranks' processes but not for any GPU."""
    if topo.world == 1:
        return value
    t = torch.tensor([value])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=topo.control)
    return int(t.item())


def average_gradients(parameters: Iterable[torch.nn.Parameter], topo: Topology) -> None:
    """Replace every gradient by its mean over ranks: one all-reduce per dtype of all gradients
    flattened in parameter order. The layout never changes, so the ranks' gradients are summed in
    the same order at every step (DDP rebuilds its buckets after a process's first step, so the
    first step after a resume summed a 3-rank ring in another order than an uninterrupted run)."""
    if topo.world == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
    for p in parameters:
        if p.grad is not None:
            by_dtype[p.grad.dtype].append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= topo.world
        for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(mean.view_as(g))


def barrier(topo: Topology) -> None:
    if topo.world > 1:
        dist.barrier()


def shutdown(topo: Topology) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def share_of_work(count: int) -> tuple[int, int, int]:
    """(world size, this rank, items per rank) for splitting ``count`` items evenly (padded) over
    the process group; (1, 0, count) outside one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 1, 0, count
    world = dist.get_world_size()
    return world, dist.get_rank(), -(-count // world)


def all_gather_stack(mine: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's equally shaped ``mine``, concatenated along dim 0 in rank order."""
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine.contiguous())
    return torch.cat(parts)


KILL_AFTER_S = 60.0  # after a worker failed or a stop signal was passed on: how long workers get before SIGKILL


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the rendezvous of the workers)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def threads_per_worker(nproc: int) -> int:
    """Each of ``nproc`` workers' share (at least 1) of the launcher's CPU threads: its OMP_NUM_THREADS,
    which Snakemake sets to the job's ``threads`` (2 per process), else the machine's CPUs. Passed on
    whole, every worker ran that many threads, nproc times what the job reserved (torchrun gives each 1)."""
    try:
        total = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:  # unset, or OpenMP's nested-list form ("4,2")
        total = os.cpu_count() or 1
    return max(1, total // nproc)


def launch_workers(nproc: int, module: str, argv: list[str], preempted_code: int,
                   pass_fds: tuple[int, ...] = ()) -> int:
    """Run ``python -m module argv`` as ``nproc`` workers on this machine, each with the environment
    ``torchrun --standalone`` gives (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), its
    :func:`threads_per_worker` (OMP_NUM_THREADS, MKL_NUM_THREADS) and the open files ``pass_fds`` (the
    run folder's lock, held until the last worker exits), and return one exit code: 0 when all
    finished; 2 when one refused an input (it printed its line); ``preempted_code`` when SIGTERM stopped
    them (it is passed on to the workers, which save a checkpoint and exit with that code); else the
    first failure's (a worker killed by a signal the launcher did not send, e.g. the OOM killer's
    SIGKILL, is named in one line). Once a worker fails, the others
    get SIGTERM; SIGTERM and SIGINT to the launcher are passed on to all. Either way, a worker still
    running ``KILL_AFTER_S`` later gets SIGKILL, so none waits forever in a collective, and the
    launcher returns only once every worker has exited. The workers also share an unlinked file, where one
    that refuses an input says so before it exits (``lipflow.launcher.run_beside_other_workers``: the others,
    whose collectives then fail, stop quietly)."""
    threads = str(threads_per_worker(nproc))
    refusals = tempfile.TemporaryFile()  # unlinked: gone once the launcher (once they started) and its workers close it
    pass_fds = (*pass_fds, refusals.fileno())
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nproc),
           "LOCAL_WORLD_SIZE": str(nproc), LAUNCHER_PID: str(os.getpid()), HANDED_FDS: ",".join(map(str, pass_fds)),
           REFUSALS_FD: str(refusals.fileno()), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    with refusals:
        workers = [subprocess.Popen([sys.executable, "-m", module, *argv], env={**env, "RANK": str(rank),
                                                                               "LOCAL_RANK": str(rank)},
                                    pass_fds=pass_fds)
                   for rank in range(nproc)]

    kill_at = None  # once a worker failed or a stop signal was passed on: when the stragglers get SIGKILL
    killed = None  # (rank, signal) of a worker a signal killed before the launcher sent any: it said nothing

    def terminate_workers(signum=signal.SIGTERM, frame=None) -> None:
        nonlocal kill_at
        if kill_at is None:
            kill_at = time.monotonic() + KILL_AFTER_S
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    previous = {sig: signal.signal(sig, terminate_workers) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        first_failure = None
        while True:
            running = any(worker.poll() is None for worker in workers)  # then look once more for a failure
            if first_failure is None:
                failed = next(((rank, w.returncode) for rank, w in enumerate(workers) if w.poll() not in (None, 0)),
                              None)
                if failed is not None and kill_at is None:  # not already stopping them
                    if failed[1] < 0:
                        killed = (failed[0], -failed[1])
                    terminate_workers()
                first_failure = None if failed is None else failed[1]
            if not running:
                break
            if kill_at is not None and time.monotonic() > kill_at:
                terminate_workers(signal.SIGKILL)
            time.sleep(0.05)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if killed is not None:  # the others' errors (gloo: "Connection closed by peer") follow from it
        rank, signum = killed
        print(f"lipflow: worker {rank} of {nproc} was killed by {signal_name(signum)}"
              f"{' (out of memory?)' if signum == signal.SIGKILL else ''}, which stopped the run",
              file=sys.stderr)
    codes = [exit_code(worker.returncode) for worker in workers]
    if all(code == 0 for code in codes):
        return 0
    if 2 in codes:
        return 2
    if all(code in (0, preempted_code) for code in codes):
        return preempted_code
    first = exit_code(first_failure) if first_failure is not None else preempted_code
    return first if first != preempted_code else max(code for code in codes if code != preempted_code)


def signal_name(signum: int) -> str:
    """``SIGKILL`` for 9; the number for a signal without a name (a real-time one)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code(returncode: int) -> int:
    """A process's status as a shell reports it: 128 + N for one killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode
