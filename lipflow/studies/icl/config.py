"""The ``icl`` study configuration: defaults and validation from ``config_schema.yaml``.

The schema file is the single source of truth for keys, ranges and defaults; the one validator of
:mod:`lipflow.config.schema` fills defaults and validates (draft 2020-12), and this module adds the
one cross-field rule the schema cannot state (``len(sigma.eigenvalues) == d``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lipflow.config.runs import int_as_float
from lipflow.config.schema import load_schema, validate
from lipflow.errors import ConfigError

SCHEMA_PATH = Path(__file__).with_name("config_schema.yaml")
# The sigma keys each kind reads (lipflow.studies.icl.data.SIGMA_KINDS); the others are set to their defaults
SIGMA_KEYS_READ = {"identity": (), "diagonal": ("eigenvalues",), "rotated": ("eigenvalues", "seed")}


def schema() -> dict[str, Any]:
    return load_schema(SCHEMA_PATH)


@dataclass(frozen=True)
class SigmaConfig:
    kind: str
    eigenvalues: tuple[float, ...]
    seed: int


@dataclass(frozen=True)
class ICLConfig:
    enabled: bool
    d: int
    n: int
    layers: tuple[int, ...]
    n_grid: tuple[int, ...]
    sigma: SigmaConfig
    w_prior: str
    noise_std: float
    parametrization: str
    attention: str
    init_std: float
    train_steps: int
    batch_size: int
    lr: float
    lr_halve_every: int
    betas: tuple[float, float]
    grad_clip: float
    test_prompts: int
    theory_samples: int
    regression_prompts: int
    seed: int
    device: str

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["sigma"] = {f.name: getattr(self.sigma, f.name) for f in fields(self.sigma)}
        return json.loads(json.dumps(out))  # tuples → lists


def load_config(raw: dict[str, Any] | None) -> ICLConfig:
    """Validate the ``icl`` block (missing keys take the schema defaults) into an ICLConfig."""
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"icl: expected a mapping, got {type(raw).__name__}")
    cfg = validate(raw or {}, SCHEMA_PATH, prefix="icl")
    sigma = cfg["sigma"]
    sigma_defaults = schema()["properties"]["sigma"]["properties"]
    for key in ("eigenvalues", "seed"):  # an unread key would change the params and retrain the same models
        if key not in SIGMA_KEYS_READ[sigma["kind"]]:
            sigma[key] = sigma_defaults[key]["default"]
    if sigma["kind"] != "identity" and len(sigma["eigenvalues"]) != cfg["d"]:
        raise ConfigError(
            f"icl.sigma.eigenvalues: has {len(sigma['eigenvalues'])} entries but icl.d = {cfg['d']}"
        )
    if sigma["kind"] != "identity":
        for i, value in enumerate(sigma["eigenvalues"]):
            try:  # an integer past float64's range (10**400) has no float64 value: float() raises
                inverse = 1.0 / float(value)
            except OverflowError:
                raise ConfigError(f"icl.sigma.eigenvalues.{i}: an integer of {len(str(value))} digits is beyond "
                                  "float64's range") from None
            if not math.isfinite(inverse):  # Σ⁻¹ (the PGD baseline, w's prior)
                raise ConfigError(f"icl.sigma.eigenvalues.{i}: {value} has no finite inverse in float64 (Σ⁻¹)")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    for key in ("layers", "n_grid"):  # their order changes no result: one params string, no rerun
        values[key] = tuple(sorted(values[key]))
    for field in fields(ICLConfig):  # lr: 1 is 1.0, as the defaults write it: one params string, no retraining
        if field.type == "float":
            values[field.name] = int_as_float(values[field.name])
        elif field.type == "tuple[float, float]":
            values[field.name] = tuple(int_as_float(value) for value in values[field.name])
    values["sigma"] = SigmaConfig(
        kind=sigma["kind"],
        eigenvalues=tuple(float(e) for e in sigma["eigenvalues"]),
        seed=sigma["seed"],
    )
    return ICLConfig(**values)


def check_regression_prompts(cfg: ICLConfig) -> None:
    """A ConfigError when the one-layer regression Γ̂ is computed (1 in ``layers``) from fewer prompts
    than its d² coefficients: its normal equations are singular and Γ̂ is noise. The workflow's plan
    checks it before any job starts (not only the baselines job, after the training jobs)."""
    if 1 in cfg.layers and cfg.regression_prompts < cfg.d**2:
        raise ConfigError(f"icl.regression_prompts: {cfg.regression_prompts} is fewer than the d² = {cfg.d**2} "
                          f"coefficients of the one-layer regression Γ̂ (icl.d = {cfg.d})")


def caption_terms(cfg: ICLConfig) -> dict[str, str]:
    """What the figures' captions (workflow/report/figure_icl_*.rst) state of the config: the models trained
    (attention, which blocks learn), the layer counts L at n, and the context lengths n_grid at max(L)."""
    learned = "P = 0, only Q learned" if cfg.parametrization == "sparse" else "P and Q learned"
    return {"models": f"{cfg.attention}-attention transformers ({cfg.parametrization}: {learned})",
            "layers": ", ".join(map(str, cfg.layers)), "n": str(cfg.n),
            "deepest": str(max(cfg.layers)), "n_grid": ", ".join(map(str, cfg.n_grid))}


def training_jobs(cfg: ICLConfig) -> list[tuple[int, int]]:
    """(L, n) of every training job: each L in ``layers`` at n, and max(layers) at each n_grid."""
    jobs = {(layers, cfg.n) for layers in cfg.layers}
    jobs |= {(max(cfg.layers), n) for n in cfg.n_grid}
    return sorted(jobs)


# Keys that change what a training job learns (the rest only choose what is evaluated).
TRAINING_KEYS = (
    "d", "sigma", "w_prior", "noise_std", "parametrization", "attention", "init_std",
    "train_steps", "batch_size", "lr", "lr_halve_every", "betas", "grad_clip", "seed", "device",
)


def training_config(cfg: ICLConfig) -> dict[str, Any]:
    """The part of the config a training job depends on (its cache key in the workflow)."""
    full = cfg.to_dict()
    return {key: full[key] for key in TRAINING_KEYS}


# Keys that change the baselines file (the rest only choose how models train).
BASELINE_KEYS = ("d", "n", "layers", "n_grid", "sigma", "w_prior", "noise_std", "test_prompts", "theory_samples",
                 "regression_prompts", "seed")


def baselines_config(cfg: ICLConfig) -> dict[str, Any]:
    """The part of the config the baselines file depends on (its cache key in the workflow, recorded in
    the file and checked by collect)."""
    full = cfg.to_dict()
    return {key: full[key] for key in BASELINE_KEYS}
