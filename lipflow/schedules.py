"""Learning-rate schedules: multipliers of the base lr as a function of the step.

Each schedule maps (step, total_steps) → factor in [0, 1]; ``lr_factor`` puts a linear warmup of
``warmup_steps`` before any of them. The trainer's steps are 0 … total − 1 (the factor of the
step about to be taken), so a decay "to 0" reaches 0 after the last step: linear runs it at 1/total.
"""

from __future__ import annotations

import math
from typing import Callable

from lipflow.registry import Registry

SCHEDULES: Registry[Callable[[int, int], float]] = Registry("schedule")


@SCHEDULES.register("constant")
def constant(step: int, total: int) -> float:
    return 1.0


@SCHEDULES.register("linear")
def linear(step: int, total: int) -> float:
    """Linear decay 1 − step/total, to 0 after the last step (the paper's default)."""
    return max(0.0, 1.0 - step / max(1, total))


@SCHEDULES.register("cosine")
def cosine(step: int, total: int) -> float:
    """Half-cosine decay ½(1 + cos(π·step/total)), to 0 after the last step."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))


def lr_factor(name: str, step: int, total: int, warmup: int) -> float:
    """A linear warmup from 1/warmup to 1 over the first ``warmup`` steps, then schedule ``name`` over
    the remaining total − warmup steps (nanoGPT's ``get_lr``), so the run reaches its peak lr: the
    warmup multiplied a decay that had already begun (cosine, 100 steps, warmup 50: peak 0.54·lr)."""
    if step < warmup:
        return (step + 1) / warmup
    return SCHEDULES.get(name)(step - warmup, total - warmup)
