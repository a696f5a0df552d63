"""Checkpoints as safetensors + JSON: no pickle anywhere on a load path.

A training checkpoint is one ``.safetensors`` file holding model weights (``model.*``), optimizer
tensors (``optim.*``) and RNG states (``rng.*``); everything that is not a tensor (step, optimizer
hyper-parameters, metrics so far) lives in the safetensors header metadata as JSON. Files are
written atomically (temp file, fsync, rename) with a ``.sha256`` sidecar; a checkpoint whose
hash does not match, or that has no sidecar, is treated as corrupt and skipped with a warning.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lipflow.data.atomic import read_verified, sidecar_path, write_with_sidecar
from lipflow.errors import CheckpointError, IntegrityError

CHECKPOINT_GLOB = "step-*.safetensors"


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into safetensors tensors and a JSON-able remainder."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        plain[str(idx)] = {}
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain[str(idx)][key] = value
    return tensors, {"state": plain, "param_groups": state["param_groups"]}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["state"].items()}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_weights(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> str:
    """Atomically write ``tensors`` (+ JSON ``metadata``) as safetensors with a sha256 sidecar."""
    blob = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                   metadata={"lipflow": json.dumps(metadata or {})})
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_with_sidecar(path, blob)


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file written by :func:`save_weights` after checking it against its
    sidecar (a missing sidecar is an error naming the file, as is a mismatch)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        blob = read_verified(path)
    except IntegrityError as err:
        raise CheckpointError(f"checkpoint {err}") from None
    try:
        tensors = st_load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:8 + header_len])
    except (SafetensorError, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not a safetensors checkpoint ({err}); lipflow never unpickles") from None
    meta = json.loads(header.get("__metadata__", {}).get("lipflow", "{}"))
    return tensors, meta


def latest_valid_checkpoint(directory: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` that loads and matches its hash; corrupt ones are skipped."""
    for path in sorted(Path(directory).glob(CHECKPOINT_GLOB), reverse=True):
        try:
            tensors, meta = load_weights(path)
        except CheckpointError as err:
            print(f"warning: {err}; falling back to an earlier checkpoint", file=sys.stderr)
            continue
        return path, tensors, meta
    return None


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (and their sidecars)."""
    for path in sorted(Path(directory).glob(CHECKPOINT_GLOB), reverse=True)[keep:]:
        sidecar_path(path).unlink(missing_ok=True)
        path.unlink(missing_ok=True)
