"""``load_run``: everything a notebook needs about one trained run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from lipflow.checkpoint import CheckpointError, load_weights
from lipflow.metrics import resolve_device
from lipflow.model import LanguageModel, build_model


@dataclass
class Run:
    run_id: str
    config: dict[str, Any]
    summary: dict[str, Any]
    metrics: pd.DataFrame
    model: LanguageModel
    device: torch.device
    data_dir: Path


def load_model(run_dir: Path, device: torch.device) -> tuple[LanguageModel, dict[str, Any]]:
    """Rebuild a run's model from config.json and load model.safetensors (no pickle)."""
    info = json.loads((run_dir / "config.json").read_text())
    tensors, meta = load_weights(run_dir / "model.safetensors")
    if meta.get("config", {}).get("model") != info["config"]["model"]:
        raise CheckpointError(f"{run_dir / 'model.safetensors'} holds a {meta.get('config', {}).get('model')!r} "
                              f"model but config.json says {info['config']['model']!r}")
    model = build_model(info["config"], info["vocab_size"])
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{run_dir / 'model.safetensors'} does not fit a {info['config']['model']} model "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return model.to(device).eval(), info


def load_run(run_id: str, results: str | Path = "results", device: str = "auto") -> Run:
    run_dir = Path(results) / "runs" / run_id
    if not (run_dir / "run.json").is_file():
        known = sorted(p.name for p in (Path(results) / "runs").glob("*") if (p / "run.json").is_file())
        raise FileNotFoundError(f"no finished run '{run_id}' under {run_dir.parent} (known: {', '.join(known) or 'none'})")
    dev = resolve_device(device)
    model, info = load_model(run_dir, dev)
    return Run(run_id=run_id, config=info["config"], summary=json.loads((run_dir / "run.json").read_text()),
               metrics=pd.read_parquet(run_dir / "train_metrics.parquet"), model=model, device=dev,
               data_dir=Path(info["data_dir"]))
