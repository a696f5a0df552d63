"""Checkpoints as safetensors + JSON: no pickle anywhere on a load path.

A training checkpoint is one ``.safetensors`` file holding model weights (``model.*``), optimizer
tensors (``optim.*``), RNG states (``rng.*``) and the metric rows so far as UTF-8 JSON bytes
(``metrics``, a uint8 tensor: safetensors refuses a header above 100 MB, which the rows of a long
run outgrow); everything else that is not a tensor (step, optimizer hyper-parameters, the config
and data it was written for) lives in the safetensors header metadata as JSON. Files are written atomically (temp file, fsync, rename) with a ``.sha256``
sidecar; a checkpoint whose hash does not match, or that has no sidecar, is treated as corrupt and
skipped with a warning. Resuming restores model, optimizer and RNG states, so a resumed run
continues bit for bit.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lipflow import provenance
from lipflow.atomic import read_verified, sha256_file, sidecar_path, write_with_sidecar
from lipflow.errors import CheckpointError, IntegrityError, parse_json

CHECKPOINT_GLOB = "step-*.safetensors"
METRICS_TENSOR = "metrics"  # a checkpoint's metric rows so far, as UTF-8 JSON bytes
CHECKPOINT_NAME = re.compile(r"step-(\d{9,})\.safetensors")  # step-<step, 9 digits or more>.safetensors


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint file name exactly as :func:`save_checkpoint` writes it
    (``step-{step:09d}.safetensors``), else None: ``step-1.safetensors`` is no checkpoint of lipflow's."""
    match = CHECKPOINT_NAME.fullmatch(name)
    return int(match[1]) if match and f"{int(match[1]):09d}" == match[1] else None


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
        raise CheckpointError(f"checkpoint {path} {'is a folder, not a file' if path.is_dir() else 'does not exist'}")
    try:
        blob = read_verified(path)
    except IntegrityError as err:
        raise CheckpointError(f"checkpoint {err}") from None
    try:
        tensors = st_load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        header = parse_json(blob[8:8 + header_len])
        meta = parse_json(header.get("__metadata__", {}).get("lipflow", "{}"))
    except (SafetensorError, ValueError, UnicodeDecodeError, AttributeError) as err:
        raise CheckpointError(f"{path} is not a safetensors checkpoint ({err}); lipflow never unpickles") from None
    return tensors, meta


def read_header(path: Path) -> tuple[set[str], Any]:
    """A safetensors file's tensor names and its lipflow metadata (None without), from its header alone: no
    tensor is read and no sidecar checked. OSError, ValueError or SafetensorError for a file that is no
    safetensors file or whose metadata is no JSON."""
    with safe_open(str(path), "pt") as weights:
        metadata = (weights.metadata() or {}).get("lipflow")
        return set(weights.keys()), None if metadata is None else parse_json(metadata)


def checkpoints_newest_first(directory: Path) -> list[Path]:
    """The checkpoints in ``directory`` by their step, highest first (by name, step 10⁹'s ten digits
    sorted before step-999999999)."""
    found = [(step, path) for path in Path(directory).glob(CHECKPOINT_GLOB)
             if (step := checkpoint_step(path.name)) is not None]
    return [path for _, path in sorted(found, reverse=True)]


def latest_valid_checkpoint(directory: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` that loads and matches its hash; corrupt ones are skipped
    (with a warning saying whether an earlier one is left to try)."""
    paths = checkpoints_newest_first(directory)
    for index, path in enumerate(paths):
        fallback = ("falling back to an earlier checkpoint" if index + 1 < len(paths)
                    else "no earlier checkpoint: training starts over")
        if not sidecar_path(path).exists():  # a crash between a new file and its sidecar: never sealed, never trusted
            print(f"warning: checkpoint {path} has no checksum file {sidecar_path(path).name} (a crash while it "
                  f"was written?); {fallback}", file=sys.stderr)
            continue
        try:
            tensors, meta = load_weights(path)
        except CheckpointError as err:
            print(f"warning: {err}; {fallback}", file=sys.stderr)
            continue
        return path, tensors, meta
    return None


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (and their sidecars)."""
    for path in checkpoints_newest_first(directory)[keep:]:
        sidecar_path(path).unlink(missing_ok=True)
        path.unlink(missing_ok=True)


def rng_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The global torch (and CUDA) RNG states and the data generator's, as ``rng.*`` tensors."""
    out = {"rng.torch": torch.get_rng_state(), "rng.data": generator.get_state()}
    if torch.cuda.is_available():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(tensors: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.data"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def run_identity(cfg: dict[str, Any], data_dir: Path) -> dict[str, str]:
    """What a checkpoint must match to be resumed: the run config's hash and the data manifest's."""
    return {"config_hash": provenance.config_hash(cfg),
            "manifest_sha256": sha256_file(Path(data_dir) / "manifest.json")}


class TrainingState(NamedTuple):
    """What a checkpoint holds besides tensors: the steps taken, the metric rows so far, and the
    run's origin: when it first started, under which git commit and package versions (what run.json
    records)."""

    step: int
    metrics: list[dict[str, Any]]
    origin: dict[str, Any] | None = None


def save_checkpoint(directory: Path, state: TrainingState, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, identity: dict[str, str]) -> None:
    """Write ``step-<step>.safetensors`` in ``directory`` and keep the two newest checkpoints."""
    optim_tensors, optim_meta = flatten_optimizer_state(optimizer.state_dict())
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(optim_tensors)
    tensors.update(rng_tensors(generator))
    # the rows grow with the run (≈ 0.4 kB a step at 12 blocks): a tensor, not header metadata (at most 100 MB)
    tensors[METRICS_TENSOR] = torch.frombuffer(bytearray(json.dumps(state.metrics).encode()), dtype=torch.uint8)
    meta = {"step": state.step, "optimizer": optim_meta, "origin": state.origin, **identity}
    save_weights(Path(directory) / f"step-{state.step:09d}.safetensors", tensors, meta)
    prune_checkpoints(directory, keep=2)


def refuse_another_runs(path: Path, meta: dict[str, Any], identity: dict[str, str]) -> None:
    """A CheckpointError when the checkpoint at ``path`` (its metadata ``meta``) was written for another run
    config than ``identity``'s: that run's, which is never replaced."""
    if meta.get("config_hash") != identity["config_hash"]:
        raise CheckpointError(f"{path} is another run's checkpoint (written for a different config); refusing to "
                              f"replace it (choose another --out-dir or move {path.parent.parent} away)")


def check_newest_is_this_runs(directory: Path, identity: dict[str, str]) -> None:
    """What :func:`resume` refuses, from the newest sealed checkpoint's header alone (no tensors read): the
    train stage checks it with its inputs, so a launcher refuses it once instead of each of its workers.
    One whose header does not parse is left to :func:`resume`, which skips it with a warning."""
    newest = next((path for path in checkpoints_newest_first(directory) if sidecar_path(path).exists()), None)
    if newest is None:
        return
    try:
        _, meta = read_header(newest)
    except (OSError, ValueError, SafetensorError):
        return
    meta = {} if meta is None else meta  # as load_weights reads a file without lipflow metadata
    if isinstance(meta, dict):
        refuse_another_runs(newest, meta, identity)


def missing_part(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str | None:
    """The first part :func:`save_checkpoint` writes that a checkpoint (its ``tensors`` and metadata ``meta``)
    lacks, named as in the file (``metadata 'step'``), else None: what :func:`resume` reads of it."""
    optimizer = meta.get("optimizer")
    present = {"metadata 'step'": "step" in meta,
               "metadata 'optimizer'": isinstance(optimizer, dict) and {"state", "param_groups"} <= optimizer.keys(),
               "tensor 'rng.torch'": "rng.torch" in tensors, "tensor 'rng.data'": "rng.data" in tensors,
               f"tensor {METRICS_TENSOR!r}": METRICS_TENSOR in tensors or "metrics" in meta}
    return next((part for part, found in present.items() if not found), None)


def resume(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
           identity: dict[str, str], data_dir: Path) -> TrainingState | None:
    """Load the newest valid checkpoint written for ``identity`` into model, optimizer and RNGs;
    None when there is none. Checkpoints of other token shards are deleted (the run's data changed);
    those of another run config are another run's, which is never replaced (a CheckpointError)."""
    found = latest_valid_checkpoint(directory)
    if found is None:
        return None
    path, tensors, meta = found
    refuse_another_runs(path, meta, identity)
    if meta.get("manifest_sha256") != identity["manifest_sha256"]:
        # other token shards (an edited corpus or tokenizer): start afresh, and drop those checkpoints
        # so that pruning keeps the new ones
        print(f"warning: ignoring {path}: it was written for other data than {data_dir}; "
              "training from scratch", file=sys.stderr)
        prune_checkpoints(directory, keep=0)
        return None
    part = missing_part(tensors, meta)
    if part is not None:
        raise CheckpointError(f"{path} has no {part}, which every checkpoint of lipflow's trainer holds (written "
                              "otherwise, or damaged and resealed); move it away to resume from an earlier one")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta["optimizer"]))
    restore_rng(tensors, generator)
    print(f"resumed from {path.name} at step {meta['step']}", file=sys.stderr)
    # a checkpoint written before the rows became a tensor holds them in its metadata
    metrics = meta["metrics"] if "metrics" in meta else parse_json(tensors[METRICS_TENSOR].numpy().tobytes())
    return TrainingState(meta["step"], metrics, meta.get("origin"))  # no origin: written before it was kept
