"""Model registry: ``MODELS.get(name)(cfg, vocab_size)`` builds a :class:`LanguageModel`."""

from lipflow.model.base import LanguageModel, rms_operator_norm, spectral_norm
from lipflow.model.registry import MODELS, build_model
from lipflow.registry import import_package_modules

import_package_modules(__name__, __path__)  # each model module registers its model ("gpt", "lipschitz_gpt", …)

__all__ = ["LanguageModel", "MODELS", "build_model", "rms_operator_norm", "spectral_norm"]
