"""When a run stops early: SIGTERM or SIGINT (checkpoint, then exit 128 + the signal, ``EXIT_PREEMPTED``
for SIGTERM, so a rerun resumes; asked again seconds later: at once, without a new checkpoint; after
the last step: the run writes its outputs and completes; once the run's summary is written: ignored),
a non-finite loss or gradient, or a certified bound above ``max_bound`` (status ``diverged``)."""

from __future__ import annotations

import signal
import time
from typing import Any

from lipflow import distributed

EXIT_PREEMPTED = 143  # 128 + SIGTERM: the job did not finish; rerunning resumes it


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A stop signal this long after the first stops the run at once. Copies of one stop arrive together (a
# Ctrl-C reaches Snakemake's job and the launcher, which passes it on to its workers; Snakemake sends
# SIGTERM after the terminal's SIGINT; SLURM signals every process of the step) and are not a second stop.
SECOND_SIGNAL_AFTER_S = 5.0


class Preempted(Exception):
    """A stop signal arrived; a checkpoint was written. ``exit_code``: 128 + the signal; ``announce``:
    whether this process says so (rank 0: every rank stops after the same step, so one line)."""

    def __init__(self, message: str, exit_code: int, announce: bool = True):
        super().__init__(message)
        self.exit_code, self.announce = exit_code, announce


class SecondSignal(BaseException):
    """A second stop signal (:data:`SECOND_SIGNAL_AFTER_S` or more after the first) arrived before the
    run stopped: it stops now, without a new checkpoint (the last one saved stays); exits 128 + the
    signal."""

    def __init__(self, signum: signal.Signals):
        super().__init__(f"a second {signum.name} before the run could stop: stopped without a new checkpoint "
                         "(a rerun resumes from the last one saved, or starts over if none was)")
        self.exit_code = 128 + signum


class SigtermWatch:
    """While entered, SIGTERM and SIGINT (Ctrl-C) only record their arrival, so that the step in flight
    finishes and every rank stops after the same step (a KeyboardInterrupt in one rank's collective
    left the other waiting in it); ``requested`` says whether one arrived on any rank. A second signal,
    :data:`SECOND_SIGNAL_AFTER_S` or more after the first, raises :class:`SecondSignal` at once (a step
    of a huge ``grad_accum`` may take hours); copies of one stop arriving together are one stop."""

    def __init__(self, topo: distributed.Topology):
        self.topo, self.arrived, self.arrived_at = topo, None, None
        self.agreed = 0  # the stop signal any rank got (the largest number), as requested() last agreed

    def __enter__(self) -> "SigtermWatch":
        self.previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        """Restore the handlers found on entry where the watch's own is still installed (one set since,
        such as :func:`ignore_stop_signals`, stays: restoring first would leave a moment of the default)."""
        for sig, handler in self.previous.items():
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.arrived is None:
            self.arrived, self.arrived_at = signal.Signals(signum), time.monotonic()
        elif time.monotonic() - self.arrived_at >= SECOND_SIGNAL_AFTER_S:  # asked again: too long to wait for
            raise SecondSignal(signal.Signals(signum))

    def requested(self) -> bool:
        """Whether a stop signal arrived on any rank, agreed after every step (a CPU all-reduce over the
        control group: the ranks stop after the same step, and no rank waits for its GPU)."""
        self.agreed = distributed.largest_on_any_rank(int(self.arrived or 0), self.topo)
        return self.agreed > 0

    def stop(self, step: int) -> Preempted:
        """The exception that ends the run once its checkpoint is saved, naming the signal this process
        got (another rank's, when it got none: then it exits as preempted)."""
        name = self.arrived.name if self.arrived else "a stop signal to another process"
        where = ""
        if not self.arrived and self.agreed:  # rank 0 speaks for all: it names the signal another rank got
            name = signal.Signals(self.agreed).name
            where = f" ({name} reached another process)"
        code = 128 + self.arrived if self.arrived else EXIT_PREEMPTED
        return Preempted(f"{name} at step {step}: checkpoint saved; rerun to resume{where}", code, self.topo.is_main)


def ignore_stop_signals() -> None:
    """SIGTERM and SIGINT change nothing from now on: the train stage calls it once its run is complete
    (the summary written), when all that is left is to exit; that takes about a second (torch's
    teardown), and a stop then made a finished run exit 143, as if preempted."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def divergence(rows: list[dict[str, Any]], bad_step: int | None, max_bound: float) -> tuple[int, str] | None:
    """(step, reason) when the steps just flushed end the run: a non-finite loss or gradient norm, or a
    certified bound (present on an eval step's row) above ``max_bound``; None otherwise."""
    if bad_step is not None:
        return bad_step, f"loss is {rows[-1]['loss']}, gradient norm is {rows[-1]['grad_norm']}"
    bound = rows[-1].get("lipschitz_bound")
    if bound is not None and not bound <= max_bound:
        return rows[-1]["step"], f"Lipschitz bound {bound:.4g} exceeds max_bound {max_bound:.4g}"
    return None
