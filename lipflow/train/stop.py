"""When a run stops early: SIGTERM (checkpoint, then exit ``EXIT_PREEMPTED`` so a rerun resumes),
a non-finite loss or gradient, or a certified bound above ``max_bound`` (status ``diverged``)."""

from __future__ import annotations

import signal
from typing import Any

from lipflow import distributed

EXIT_PREEMPTED = 143  # 128 + SIGTERM: the job did not finish; rerunning resumes it


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was written."""


class SigtermWatch:
    """While entered, SIGTERM only sets a flag; ``requested`` says whether it arrived on any rank."""

    def __init__(self, topo: distributed.Topology):
        self.topo, self.arrived = topo, False

    def __enter__(self) -> "SigtermWatch":
        self.previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self.previous)

    def _on_sigterm(self, signum, frame) -> None:
        self.arrived = True

    def requested(self) -> bool:
        """Whether SIGTERM arrived on any rank, agreed after every step (a CPU all-reduce over the
        control group: the ranks stop after the same step, and no rank waits for its GPU)."""
        return distributed.any_rank(self.arrived, self.topo)


def divergence(rows: list[dict[str, Any]], bad_step: int | None, max_bound: float) -> tuple[int, str] | None:
    """(step, reason) when the steps just flushed end the run: a non-finite loss or gradient norm, or a
    certified bound (present on an eval step's row) above ``max_bound``; None otherwise."""
    if bad_step is not None:
        return bad_step, f"loss is {rows[-1]['loss']}, gradient norm is {rows[-1]['grad_norm']}"
    bound = rows[-1].get("lipschitz_bound")
    if bound is not None and not bound <= max_bound:
        return rows[-1]["step"], f"Lipschitz bound {bound:.4g} exceeds max_bound {max_bound:.4g}"
    return None
