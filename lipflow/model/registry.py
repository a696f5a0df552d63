"""The ``model`` registry (kept apart from ``__init__`` so model files can import it)."""

from __future__ import annotations

from typing import Any, Callable

from lipflow.model.base import LanguageModel
from lipflow.registry import Registry

MODELS: Registry[Callable[[dict[str, Any], int], LanguageModel]] = Registry("model")


def build_model(cfg: dict[str, Any], vocab_size: int) -> LanguageModel:
    """Build the model named by ``cfg['model']`` for a vocabulary of ``vocab_size``."""
    return MODELS.get(cfg["model"])(cfg, vocab_size)
