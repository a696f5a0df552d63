"""Checkpoint evaluations: ``EVALUATIONS.get(name)(ctx) -> list[dict]`` of long-form rows.

Each row is {"metric": str, "value": float, ...parameter columns} (e.g. "epsilon", "k", "format",
"scaling", "layer", "head", "matrix"); columns a row does not use are absent or None.
Registered by the package's modules (found at import): ``val``, ``robustness``, ``precision``, ``rank``,
``sharpness``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from lipflow.errors import silent
from lipflow.metrics import evaluate_windows
from lipflow.model.base import LanguageModel
from lipflow.registry import Registry, import_package_modules


TRAIN_LOSS_WINDOWS = 256  # the train windows ``EvalContext.train_loss`` is measured on


@dataclass
class EvalContext:
    """Everything an evaluation may read; windows are token ids of shape (N, context + 1).
    ``first_train_windows(n)`` reads the first n windows of the train tokens the run trained on (the
    split's first ``train_tokens``; fewer where they hold fewer),
    as many as an evaluation asks for. ``train_loss`` and ``val_loss`` are the known losses, else
    measured over the first :data:`TRAIN_LOSS_WINDOWS` train windows and over all val windows (in
    batches of the evaluation's ``batch_size``) when an evaluation first reads them. ``report(message)``
    tells the user a phase of a long evaluation is done (the stage prints it, with the time so far, to
    its log); by default it says nothing."""

    model: LanguageModel
    first_train_windows: Callable[[int], torch.Tensor]
    val_windows: torch.Tensor
    cfg: dict[str, Any]            # this evaluation's own parameters
    run: dict[str, Any]            # the run's resolved training config
    known_train_loss: float | None
    known_val_loss: float | None
    device: torch.device
    certificate: float | None      # ℓ2 Lipschitz certificate (embedded sequence → logits), if any
    report: Callable[[str], None] = silent

    @functools.cached_property
    def train_loss(self) -> float:
        return self._loss(self.known_train_loss, self.first_train_windows(TRAIN_LOSS_WINDOWS))

    @functools.cached_property
    def val_loss(self) -> float:
        return self._loss(self.known_val_loss, self.val_windows)

    def _loss(self, known: float | None, windows: torch.Tensor) -> float:
        if known is not None:
            return known
        return evaluate_windows(self.model, windows, self.cfg["batch_size"], self.device)["loss"]


EVALUATIONS: Registry[Callable[[EvalContext], list[dict]]] = Registry("evaluation")


import_package_modules(__name__, __path__)  # each module registers its evaluations

__all__ = ["EVALUATIONS", "EvalContext"]
