"""Data-parallel training across processes started by ``torchrun`` (DDP; NCCL on GPU, gloo on CPU).

Every rank draws the same global batch from the same seeded generator and keeps its own slice,
so the data-loader state is identical on all ranks and rank 0's checkpoint resumes them all.
Decisions that end the loop (divergence, SIGTERM) are all-reduced so every rank stops together.
"""

from __future__ import annotations

import os
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
    """Join the process group torchrun describes in the environment (a no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Topology(), device
    topo = Topology(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", topo.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return topo, device


def mean_across_ranks(value: float, topo: Topology, device: torch.device) -> float:
    if topo.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / topo.world


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
    if topo.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
