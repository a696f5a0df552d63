"""Model registry: ``MODELS.get(name)(cfg, vocab_size)`` builds a :class:`LanguageModel`."""

from lipflow.model.base import LanguageModel, rms_operator_norm, spectral_norm
from lipflow.model.registry import MODELS, build_model
from lipflow.model import gpt, lipschitz_gpt, mlp  # noqa: F401  (register "gpt", "lipschitz_gpt", "mlp")

__all__ = ["LanguageModel", "MODELS", "build_model", "rms_operator_norm", "spectral_norm"]
