"""The configs of the Plan golden fixture (tests/data/plan_golden.json): config.yaml, the tiny test
config, and config.yaml selecting each experiment (and all of them) under each preset, with the
``runs`` block trained or not."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "data" / "plan_golden.json"
EXPERIMENT_NAMES = ("lipschitz_tradeoff", "lr_transfer", "super_consistency", "icl", "rank_vs_n", "robustness",
                    "precision")


def golden_cases() -> dict[str, dict]:
    """case name → raw config (before validation)."""
    base = yaml.safe_load((ROOT / "config.yaml").read_text())
    tiny = yaml.safe_load((ROOT / "tests/data/tiny_config.yaml").read_text())
    cases = {"config.yaml": base, "tiny_config.yaml": tiny}
    for preset in ("cpu", "paper"):
        selections = {name: [name] for name in EXPERIMENT_NAMES} | {"all": list(EXPERIMENT_NAMES)}
        for label, names in selections.items():
            for with_runs in (False, True):
                if with_runs and label != "all":
                    continue
                config = copy.deepcopy(base)
                config.update(experiments=names, experiment_preset=preset, runs_with_experiments=with_runs)
                cases[f"{label}/{preset}/runs_{str(with_runs).lower()}"] = config
    return cases


def digest(value) -> str:
    """sha256 of the canonical JSON of ``value``."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
