"""Checkpoint evaluations: ``EVALUATIONS.get(name)(ctx) -> list[dict]`` of long-form rows.

Each row is {"metric": str, "value": float, ...parameter columns} (e.g. "epsilon", "k", "format",
"scaling", "layer", "head", "matrix"); columns a row does not use are absent or None.
Registered by the package's modules (found at import): ``val``, ``robustness``, ``precision``, ``rank``,
``sharpness``.
"""

from __future__ import annotations

import importlib
import pkgutil
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


def _register_all() -> None:
    """Import every module of this package, so each registers its evaluations: adding one is adding a
    file (and its name to the schema's enum). Skipped: the stage's entry point and the image-MLP study,
    a training loop rather than a checkpoint evaluation."""
    for module in pkgutil.iter_modules(__path__):
        if module.name not in ("__main__", "image_mlp"):
            importlib.import_module(f"{__name__}.{module.name}")


_register_all()

__all__ = ["EVALUATIONS", "EvalContext"]
