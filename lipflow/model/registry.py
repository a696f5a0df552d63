"""The ``model`` registry (kept apart from ``__init__`` so model files can import it)."""

from __future__ import annotations

from typing import Any, Callable

from lipflow.model.base import LanguageModel
from lipflow.parametrization import PARAMETRIZATIONS
from lipflow.registry import Registry

MODELS: Registry[Callable[[dict[str, Any], int], LanguageModel]] = Registry("model")


def build_model(cfg: dict[str, Any], vocab_size: int) -> LanguageModel:
    """Build the model named by ``cfg['model']`` for a vocabulary (or class count) of ``vocab_size``,
    then apply the parametrization ``cfg['parametrization']`` to it."""
    make = MODELS.get(cfg["model"])
    parametrize = PARAMETRIZATIONS.get(cfg["parametrization"])
    model = make(cfg, vocab_size)
    parametrize(model, cfg, lambda width: make({**cfg, "d_model": width}, vocab_size))
    return model
