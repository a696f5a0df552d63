"""Data-parallel training across processes started by ``torchrun`` (DDP; NCCL on GPU, gloo on CPU).

Every rank draws the same global batch from the same seeded generator and keeps its own slice,
so the data-loader state is identical on all ranks and rank 0's checkpoint resumes them all.
Decisions that end the loop (divergence, SIGTERM) are all-reduced so every rank stops together.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: torch.device) -> tuple[Topology, torch.device]:
    """Join the process group torchrun describes in the environment (a no-op without torchrun;
    under torchrun also for one process, so ``nproc: 1`` runs the NCCL/gloo and DDP code paths)."""
    if "WORLD_SIZE" not in os.environ:
        return Topology(), device
    terminate_with_launcher()
    world = int(os.environ["WORLD_SIZE"])
    topo = Topology(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", topo.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return topo, device


PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent exits


def terminate_with_launcher() -> None:
    """torchrun starts each worker in a session of its own, so killing the job's process group (a
    SIGKILLed Snakemake or job step) missed the workers, which trained on into the run's folder. On
    Linux each worker asks for SIGTERM when torchrun exits: the preemption path (checkpoint, exit 143)."""
    if sys.platform != "linux":
        return
    launcher = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != launcher:  # it exited before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def mean_tensor_across_ranks(t: torch.Tensor, topo: Topology) -> torch.Tensor:
    """The mean of ``t`` over ranks (one all-reduce, no host sync); ``t`` itself for one process."""
    if topo.world == 1:
        return t
    t = t.double()
    dist.all_reduce(t)
    return t / topo.world


def any_rank(flag: bool, topo: Topology, device: torch.device) -> bool:
    if topo.world == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


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
