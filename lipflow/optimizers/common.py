"""What Muon and Scion share: Adam's ε and torch.optim's closure convention."""

from __future__ import annotations

from typing import Callable

import torch

ADAM_EPS = 1e-8  # torch's default


def evaluate_closure(closure: Callable[[], float] | None) -> float | None:
    """The loss of ``step(closure)``: the closure run with gradients on (torch.optim's convention)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
