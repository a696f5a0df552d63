"""When a run stops early: SIGTERM (checkpoint, then exit ``EXIT_PREEMPTED`` so a rerun resumes),
a non-finite loss or gradient, or a certified bound above ``max_bound`` (status ``diverged``)."""

from __future__ import annotations

import signal
from typing import Any

import torch

from lipflow import distributed

EXIT_PREEMPTED = 143  # 128 + SIGTERM: the job did not finish; rerunning resumes it
STOP_CHECK_EVERY = 10  # under DDP, steps between agreeing on SIGTERM (a collective and a host sync)


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was written."""


class SigtermWatch:
    """While entered, SIGTERM only sets a flag; ``requested`` says whether it arrived on any rank."""

    def __init__(self, topo: distributed.Topology, device: torch.device):
        self.topo, self.device, self.arrived = topo, device, False

    def __enter__(self) -> "SigtermWatch":
        self.previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self.previous)

    def _on_sigterm(self, signum, frame) -> None:
        self.arrived = True

    def requested(self, step: int, force_check: bool) -> bool:
        """Under DDP agreed only every ``STOP_CHECK_EVERY`` steps and when ``force_check`` (at
        flushes), since agreeing is a collective and a host sync."""
        if self.topo.world == 1:
            return self.arrived
        if force_check or step % STOP_CHECK_EVERY == 0:
            return distributed.any_rank(self.arrived, self.topo, self.device)
        return False


def divergence(rows: list[dict[str, Any]], bad_step: int | None, max_bound: float) -> tuple[int, str] | None:
    """(step, reason) when the steps just flushed end the run: a non-finite loss or gradient norm, or a
    certified bound (present on an eval step's row) above ``max_bound``; None otherwise."""
    if bad_step is not None:
        return bad_step, f"loss is {rows[-1]['loss']}, gradient norm is {rows[-1]['grad_norm']}"
    bound = rows[-1].get("lipschitz_bound")
    if bound is not None and not bound <= max_bound:
        return rows[-1]["step"], f"Lipschitz bound {bound:.4g} exceeds max_bound {max_bound:.4g}"
    return None
