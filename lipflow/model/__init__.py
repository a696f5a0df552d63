"""Model registry: ``MODELS.get(name)(cfg, vocab_size)`` builds a :class:`LanguageModel`."""

from lipflow.model.base import LanguageModel, rms_operator_norm, spectral_norm
from lipflow.model.registry import MODELS, build_model
from lipflow.model import gpt  # noqa: F401  (registers "gpt")

__all__ = ["LanguageModel", "MODELS", "build_model", "rms_operator_norm", "spectral_norm"]
