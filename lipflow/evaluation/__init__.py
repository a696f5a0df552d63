"""Checkpoint evaluations: ``EVALUATIONS.get(name)(ctx) -> list[dict]`` of long-form rows.

Each row is {"metric": str, "value": float, ...parameter columns} (e.g. "epsilon", "k", "format",
"scaling", "layer", "head", "matrix"); columns a row does not use are absent or None.
Registered: ``val``, ``robustness``, ``precision``, ``rank``, ``sharpness``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from lipflow.model.base import LanguageModel
from lipflow.registry import Registry


@dataclass
class EvalContext:
    """Everything an evaluation may read; windows are token ids of shape (N, context + 1)."""

    model: LanguageModel
    train_windows: torch.Tensor
    val_windows: torch.Tensor
    cfg: dict[str, Any]            # this evaluation's own parameters
    run: dict[str, Any]            # the run's resolved training config
    train_loss: float | None
    val_loss: float | None
    device: torch.device
    certificate: float | None      # ℓ2 Lipschitz certificate (embedded sequence → logits), if any


EVALUATIONS: Registry[Callable[[EvalContext], list[dict]]] = Registry("evaluation")

from lipflow.evaluation import precision, rank, robustness, sharpness, val  # noqa: E402,F401  (register)

__all__ = ["EVALUATIONS", "EvalContext"]
