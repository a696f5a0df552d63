"""``load_run``: everything a notebook needs about one trained run."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lipflow.config import RUN_ID_PATTERN, RUN_KEYS, check_run_id, run_defaults, stage_run
from lipflow.errors import ConfigError, memory_errors_in_one_line
from lipflow.train.checkpoint import CheckpointError, load_weights
from lipflow.atomic import read_json, sha256_file
from lipflow.metrics import resolve_device
from lipflow.model import LanguageModel, build_model
from lipflow.results.inputs import (JSON_FORMS, check_summary_matches_metrics, check_value, read_run_json,
                                    read_run_table, value_of)

if TYPE_CHECKING:  # pandas only where load_run builds the metrics table: the evaluation stage runs without it
    import pandas as pd


@dataclass
class Run:
    run_id: str
    config: dict[str, Any]
    summary: dict[str, Any]
    metrics: pd.DataFrame
    model: LanguageModel
    device: torch.device
    data_dir: Path

    def to(self, device: str | torch.device) -> Run:
        """The run with its model on ``device`` (named as for :func:`load_run`) and ``device`` saying so:
        ``run.model.to(...)`` alone left ``device`` naming the old one, where the inputs made with
        ``device=run.device`` then failed to meet the model. A bad name changes nothing."""
        moved = resolve_device(device)
        self.model.to(moved)
        self.device = moved
        return self


def load_model(run_dir: Path, device: torch.device) -> tuple[LanguageModel, dict[str, Any]]:
    """Rebuild a run's model from config.json and load model.safetensors (no pickle); config.json
    must agree with the config and vocabulary size stored in the checksummed weights, so an edit
    to it (e.g. ``n_heads``) is an error, never a silently different model, and that config must
    be a valid run's (a CheckpointError naming the weights file and the key)."""
    info = read_json(run_dir / "config.json")
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict) or "vocab_size" not in info:
        raise ValueError(f"{run_dir / 'config.json'} lacks the run's config and vocab_size")
    weights = run_dir / "model.safetensors"
    tensors, meta = load_weights(weights)
    stored = meta.get("config", {}) if isinstance(meta, dict) else None
    if not isinstance(stored, dict):
        raise CheckpointError(f"{weights} stores a config that is no mapping (forged or damaged)")
    if stored.get("model") != info["config"].get("model"):
        raise CheckpointError(f"{weights} holds a {stored.get('model')!r} "
                              f"model but config.json says {info['config'].get('model')!r}")
    changed = sorted(k for k in stored.keys() | info["config"].keys() if stored.get(k) != info["config"].get(k))
    if "vocab_size" in meta and meta["vocab_size"] != info["vocab_size"]:
        changed.insert(0, "vocab_size")
    if changed:
        raise CheckpointError(f"{run_dir / 'config.json'} does not match the config stored in model.safetensors "
                              f"(differs in {', '.join(changed[:3])}): edited after training?")
    try:  # forged and resealed: never build a model of an invalid config (a key since removed is no error)
        stage_run({key: value for key, value in stored.items() if key in RUN_KEYS}, f"{weights} config")
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    if type(info["vocab_size"]) is not int or info["vocab_size"] < 1:
        raise CheckpointError(f"{weights} stores vocab_size {info['vocab_size']!r}, not a vocabulary size (forged "
                              "or damaged)")
    with memory_errors_in_one_line(f"the model {weights} records is larger than this machine's memory"):
        model = build_model(run_defaults(**info["config"]), info["vocab_size"])  # a key added since: its default
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as err:  # a tensor of another shape under a parameter's name: torch's lines name it
        raise CheckpointError(f"{weights} does not fit a {info['config']['model']} model "
                              f"({str(err).splitlines()[-1].strip()})") from None
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not fit a {info['config']['model']} model "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return model.to(device).eval(), {**info, "manifest_sha256": meta.get("manifest_sha256")}


def check_trained_on(run_dir: Path, info: dict[str, Any], data_dir: Path) -> None:
    """A CheckpointError when the weights record the sha256 of the token shards' manifest they were
    trained on (runs since it was recorded) and ``data_dir`` holds other shards: another corpus or
    tokenizer with the same vocabulary size would give wrong numbers or text without a word."""
    recorded = info.get("manifest_sha256")
    manifest = Path(data_dir) / "manifest.json"
    if recorded is not None and manifest.is_file() and sha256_file(manifest) != recorded:
        raise CheckpointError(f"{run_dir / 'model.safetensors'} was trained on other token shards than {data_dir} "
                              "(its manifest.json differs): use the data directory it was trained on")


def load_run(run_id: str, results: str | Path = "results", device: str = "auto") -> Run:
    """One finished run under ``results`` (any name: a moved or renamed results tree works); its data
    directory, recorded relative to the directory it was trained in (``results/data/…``), is looked up
    in the same tree. ``run_id`` must be a run id (never a path out of ``results/runs``); its run.json
    and metrics must be the run's own, and a completed run's run.json what its metrics say at the final
    step (as the database build checks them)."""
    runs = Path(results) / "runs"

    def finished() -> list[str]:  # listed only for an error message: a results tree may hold thousands of runs
        return sorted(p.name for p in runs.glob("*") if (p / "run.json").is_file())

    if isinstance(run_id, str) and not re.fullmatch(RUN_ID_PATTERN, run_id):
        named = [known for known in finished() if re.fullmatch(re.escape(run_id) + "-[0-9a-f]{8}", known)]
        if named:
            raise ConfigError(f"run_id: '{run_id}' is a run name, not a run id; its finished runs under "
                              f"{runs}: {', '.join(named)}")
    run_dir = runs / check_run_id(run_id, "run_id")
    if not (run_dir / "run.json").is_file():
        raise FileNotFoundError(f"no finished run '{run_id}' under {runs} (known: {', '.join(finished()) or 'none'})")
    dev = resolve_device(device)
    model, info = load_model(run_dir, dev)
    config_json = run_dir / "config.json"
    recorded = check_value(config_json, "data_dir", value_of(info, "data_dir", config_json), JSON_FORMS["string"],
                           nullable=False)
    data_dir = data_dir_in(Path(results), Path(recorded))
    check_trained_on(run_dir, info, data_dir)
    run_json = run_dir / "run.json"
    summary, metrics = read_run_json(run_json), read_run_table(run_dir / "train_metrics.parquet")
    check_summary_matches_metrics(run_json, summary, metrics)
    return Run(run_id=run_id, config=info["config"], summary=summary, metrics=metrics.to_pandas(), model=model,
               device=dev, data_dir=data_dir)


def data_dir_in(results: Path, recorded: Path) -> Path:
    """The recorded data directory (``results/data/<corpus>/<tokenizer>``, relative to where the run
    trained) inside the results tree ``results``; a path recorded otherwise is taken from its parent."""
    if not recorded.is_absolute() and recorded.parts[:2] == ("results", "data"):
        return results / recorded.relative_to("results")
    return results.parent / recorded
