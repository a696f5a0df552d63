"""Everything a run is built from its config: output directory, token splits, model, optimizer and
weight constraint, and the loss a training step calls (``torch.compile`` when asked)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from lipflow.atomic import is_clutter, is_temporary, remove_temporaries, sha256_file
from lipflow.config import check_run_id
from lipflow.data.loader import TokenShards
from lipflow.errors import parse_json
from lipflow.metrics import resolve_device
from lipflow.model import build_model
from lipflow.optimizers import build_optimizer
from lipflow.train.checkpoint import check_newest_is_this_runs, checkpoint_step, run_identity
from lipflow.train.update import ConstraintSettings, check_coupling, constrained_matrices, fit_within_cap_


def ensure_writable(directory: Path) -> None:
    """Fail before training, not after it, when results cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"cannot create results directory {directory}: {err.strerror}") from None
    if not os.access(directory, os.W_OK):
        raise PermissionError(f"results directory {directory} is not writable")


# What the train and evaluate stages write into a run directory (anything else there is a user's).
RUN_LOCK = ".train.lock"  # the file the train stage holds an exclusive flock on (exclusive_run_folder)
RUN_ENTRIES = frozenset({RUN_LOCK, "config.json", "run.json", "model.safetensors", "model.safetensors.sha256",
                         "train_metrics.parquet", "train_metrics.parquet.sha256", "checkpoints", "tensorboard",
                         "evals", "evals.parquet", "evals.parquet.sha256"})


def check_run_directory(directory: Path, run_id: str, cfg: dict[str, Any], manifest_sha256: str | None = None) -> None:
    """A FileExistsError when ``directory`` holds what training would replace and is not this run's: a
    name no stage writes there, another run's config.json (or a file of that name that is no run's),
    the same run finished on other token shards than ``manifest_sha256``'s (its config.json records
    theirs; retraining would leave its evaluations describing the old model), or, without a
    config.json (the end of training writes it after the weights, before the metrics and run.json),
    a run.json, metrics or weights of no run of this id. The same run's files (a rerun, or what an
    interrupted run left, temporary files included) may be replaced. (Snakemake deletes a train job's
    outputs, config.json included, before rerunning it on changed data, and reruns its evaluations.)"""
    if not (directory.exists() or directory.is_symlink()):
        return
    if not directory.is_dir():
        raise FileExistsError(f"--out-dir {directory} exists and is not a folder; refusing to replace it")
    foreign = sorted(entry.name for entry in directory.iterdir()
                     if entry.name not in RUN_ENTRIES and not is_temporary(entry.name) and not is_clutter(entry.name))
    if foreign:
        raise FileExistsError(f"--out-dir {directory} holds {foreign[0]!r}, which no lipflow stage writes there; "
                              "refusing to train into it (choose another --out-dir or move it away)")
    check_run_folders(directory)
    path = directory / "config.json"
    if not (path.exists() or path.is_symlink()):
        for name in ("run.json", "train_metrics.parquet", "model.safetensors"):
            left_by_this_run = name == "model.safetensors" and weights_of_run(directory / name, run_id)
            if (directory / name).exists() and not left_by_this_run:
                raise FileExistsError(f"--out-dir {directory} holds {name} but no config.json, so it is no run's "
                                      "that training left; refusing to replace it")
        return
    try:
        info = parse_json(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise OSError(f"--out-dir {directory}: cannot read {path} ({err.strerror})") from None
    except (UnicodeDecodeError, ValueError):
        info = None
    if not (isinstance(info, dict) and isinstance(info.get("config"), dict)):
        raise FileExistsError(f"--out-dir {directory} holds a config.json that is not a run's; refusing to replace it")
    ours = json.loads(json.dumps(cfg))
    if info.get("run_id") != run_id or info["config"] != ours:
        keys = sorted(k for k in set(ours) | set(info["config"]) if ours.get(k) != info["config"].get(k))
        what = f"differs in {keys[0]}" if keys else f"run id {info.get('run_id')!r}"
        raise FileExistsError(f"--out-dir {directory} holds another run ({what}); refusing to replace it "
                              "(choose another --out-dir or move it away)")
    recorded = info.get("manifest_sha256")
    if manifest_sha256 is not None and recorded is not None and recorded != manifest_sha256:
        raise FileExistsError(f"--out-dir {directory} holds run {run_id} finished on other token shards (its "
                              "config.json records another manifest.json); refusing to replace it and leave its "
                              "evaluations stale (move it away, or delete its outputs as Snakemake does)")


RUN_FOLDERS = ("checkpoints", "evals", "tensorboard")  # the RUN_ENTRIES that are folders
RUN_FILES = tuple(sorted(RUN_ENTRIES - set(RUN_FOLDERS)))  # the others: files


def check_run_folders(directory: Path) -> None:
    """A FileExistsError when a folder of :data:`RUN_FOLDERS` in ``directory`` is a link (training would
    write, and prune, where it points) or not a folder, when ``checkpoints`` holds a name that
    :func:`lipflow.train.checkpoint.save_checkpoint` does not write (pruning would delete a
    ``step-1.safetensors`` of the user's), or when a file training reads or writes (:data:`RUN_FILES`, a
    checkpoint or its sidecar) is a folder: refused here, where every worker then failed reading it
    ("Is a directory", once per worker) or the run failed writing it after training up to it."""
    for name in RUN_FOLDERS:
        entry = directory / name
        if entry.is_symlink() or (entry.exists() and not entry.is_dir()):
            kind = "a link" if entry.is_symlink() else "not a folder"
            raise FileExistsError(f"--out-dir {directory}: {name} is {kind}; refusing to train into it "
                                  "(move it away)")
    checkpoints = directory / "checkpoints"
    entries = sorted(checkpoints.iterdir()) if checkpoints.is_dir() else []
    foreign = [entry.name for entry in entries if not is_checkpoint_file(entry.name)
               and not is_temporary(entry.name) and not is_clutter(entry.name)]
    if foreign:
        raise FileExistsError(f"--out-dir {directory}: checkpoints holds {foreign[0]!r}, which lipflow does not "
                              "write there; refusing to train into it (checkpoint pruning would delete it)")
    files = [directory / name for name in RUN_FILES] + [entry for entry in entries if not is_clutter(entry.name)
                                                        and not is_temporary(entry.name)]
    folder = next((path for path in files if path.is_dir()), None)
    if folder is not None:
        raise FileExistsError(f"--out-dir {directory}: {folder} is a folder where training writes a file; refusing "
                              "to train into it (move it away)")


@contextlib.contextmanager
def exclusive_run_folder(directory: Path, run_id: str) -> Iterator[int | None]:
    """Hold an exclusive ``flock`` on the run folder's :data:`RUN_LOCK` file (folder and file created if
    missing; a file opened for writing, as NFS needs) while training into it: a second trainer of the
    run (e.g. a rerun while the job of a killed Snakemake still runs) is a FileExistsError, never two
    processes writing one run's checkpoints and outputs; the holder writes ``run_id`` into the file, and
    the refusal names that run (not the refused one's). Yields the lock's file descriptor: a flock
    belongs to the open file, so workers started with it (``launch_workers``' ``pass_fds``) hold the
    folder until the last of them exits, even after their launcher was SIGKILLed. Where the file system
    has no locks training goes on unlocked, with a warning; a path that is no folder, or that cannot be
    made, is left to the stage's own checks (None is yielded for both)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # e.g. a read-only folder: the stage's own checks name it
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(fd) or run_id  # the run its holder trains (an earlier lipflow's lock is empty)
            raise FileExistsError(f"--out-dir {directory}: another process is training run {holder} into it (the "
                                  f"job of a killed Snakemake? find it with `pgrep -af {holder}`); stop it "
                                  "first") from None
        except OSError as err:
            print(f"warning: cannot lock {directory / RUN_LOCK} ({err.strerror}): training unlocked", file=sys.stderr)
            yield None
            return
        with contextlib.suppress(OSError):  # what a refused trainer names (a full disk: it names its own run)
            os.ftruncate(fd, 0)
            os.pwrite(fd, run_id.encode(), 0)
        remove_left_checkpoint_temporaries(directory / "checkpoints")
        yield fd
    finally:
        os.close(fd)


def is_checkpoint_file(name: str) -> bool:
    """Whether ``name`` is what :func:`lipflow.train.checkpoint.save_checkpoint` writes: a checkpoint or its sidecar."""
    return checkpoint_step(name.removesuffix(".sha256")) is not None


def remove_left_checkpoint_temporaries(checkpoints: Path) -> None:
    """Delete the temporary checkpoint files a killed trainer left (its rename never came), saying so: with the
    run folder's lock held no other process writes checkpoints there, so every one is stale."""
    if checkpoints.is_dir() and not checkpoints.is_symlink():
        with contextlib.suppress(OSError):  # a folder it cannot read: the stage's own checks name it
            removed = remove_temporaries(checkpoints, is_checkpoint_file)
            if removed:
                print(f"removed {len(removed)} temporary file(s) a killed trainer left in {checkpoints}: "
                      f"{', '.join(removed)}", file=sys.stderr)


def lock_holder(fd: int) -> str | None:
    """The run id the holder of a run folder's lock wrote into it, if it is one."""
    with contextlib.suppress(OSError, UnicodeDecodeError, ValueError):
        return check_run_id(os.pread(fd, 256, 0).decode(), RUN_LOCK)
    return None


def missing_folders(directory: Path) -> list[Path]:
    """``directory`` and its parents up to the first that exists, deepest first: what making it creates."""
    missing = []
    for folder in (directory, *directory.parents):
        if folder.exists() or folder.is_symlink():
            break
        missing.append(folder)
    return missing


def remove_if_unused(created: list[Path]) -> None:
    """Remove the run folder ``created[0]`` when it holds nothing but its lock file (a run that failed
    before writing), then the parents in ``created`` (those the stage made) that are left empty."""
    directory = created[0]
    with contextlib.suppress(OSError):  # another process may have written to it since
        if {entry.name for entry in directory.iterdir()} <= {RUN_LOCK}:
            (directory / RUN_LOCK).unlink(missing_ok=True)
            directory.rmdir()
    for parent in created[1:]:
        with contextlib.suppress(OSError):  # not empty: another process's, or the run's folder stayed
            parent.rmdir()


def weights_of_run(path: Path, run_id: str) -> bool:
    """Whether ``path`` is a safetensors file whose lipflow metadata names ``run_id``."""
    try:
        with safe_open(str(path), "pt") as weights:
            metadata = parse_json((weights.metadata() or {}).get("lipflow", "{}"))
    except (OSError, ValueError, SafetensorError):  # not a safetensors file, or no JSON metadata
        return False
    return isinstance(metadata, dict) and metadata.get("run_id") == run_id


def checked_inputs(run_id: str, cfg: dict[str, Any], data_dir: Path,
                   out_dir: Path) -> tuple[TokenShards, TokenShards, torch.device]:
    """(train, val, device) once the shards, the device and the run directory are checked: every bad
    input a run can have refused before anything is written."""
    train, val = token_splits(data_dir, cfg)
    device = resolve_device(cfg["device"])
    if device.type == "cuda" and cfg["nproc"] > torch.cuda.device_count():  # one GPU per process (cuda:<local rank>)
        raise ValueError(f"nproc: {cfg['nproc']} processes need a GPU each, and this machine has "
                         f"{torch.cuda.device_count()}; lower nproc or set device: cpu")
    check_run_directory(out_dir, run_id, cfg, sha256_file(Path(data_dir) / "manifest.json"))
    check_newest_is_this_runs(out_dir / "checkpoints", run_identity(cfg, data_dir))
    return train, val, device


def token_splits(data_dir: Path, cfg: dict[str, Any]) -> tuple[TokenShards, TokenShards]:
    """(train, val) shards; train cut to ``train_tokens`` (all of it when the split holds fewer:
    :func:`warn_of_a_short_train_split`); both checked to hold a ``context`` window."""
    train, val = TokenShards(data_dir, "train", max_tokens=cfg["train_tokens"]), TokenShards(data_dir, "val")
    for split in (train, val):
        split.check_context(cfg["context"])
    return train, val


def warn_of_a_short_train_split(cfg: dict[str, Any], train: TokenShards, data_dir: Path) -> None:
    """A warning when ``train_tokens`` is above what the train split holds: the run trains on the whole
    split, while its name and ``train_tokens`` say more tokens than it saw (the trainer's rank 0 says it)."""
    if cfg["train_tokens"] is not None and cfg["train_tokens"] > train.num_tokens:
        print(f"warning: train_tokens {cfg['train_tokens']:,} is more than the {train.num_tokens:,} tokens of the "
              f"train split in {data_dir}: the run trains on all of them", file=sys.stderr)


class Learner(NamedTuple):
    """A model with what updates it: the optimizer, the constrained matrices and the constraint."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    matrices: list[torch.nn.Parameter]
    constraint: ConstraintSettings


def build_learner(cfg: dict[str, Any], vocab_size: int, device: torch.device) -> Learner:
    """Model (initialised from the global torch RNG) on ``device``, its optimizer with each group's
    ``base_lr`` (the schedule scales it), and the constraint, checked against the optimizer's steps; under
    the soft cap, matrices initialised above sigma_max are scaled onto it (``fit_within_cap_``)."""
    learner = checked_learner(build_model(cfg, vocab_size).to(device), cfg)
    fit_within_cap_(learner.matrices, learner.constraint)  # the soft cap keeps σ ≤ σmax only from weights within it
    for group in learner.optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
    return learner


def checked_learner(model: torch.nn.Module, cfg: dict[str, Any]) -> Learner:
    """``model`` with its optimizer, constrained matrices and constraint, the constraint checked against the
    optimizer's steps (an lr the soft cap cannot absorb is a ValueError)."""
    optimizer = build_optimizer(model, cfg)
    matrices = [p for _, p in constrained_matrices(model)]
    constraint = ConstraintSettings.from_config(cfg)
    check_coupling(optimizer, matrices, constraint)
    return Learner(model, optimizer, matrices, constraint)


def check_learner(cfg: dict[str, Any], vocab_size: int) -> None:
    """What :func:`build_learner` refuses in a config (:func:`checked_learner`), checked on the meta device,
    so without the weights' memory: a launcher checks it once, not each of its workers."""
    with torch.device("meta"):
        checked_learner(build_model(cfg, vocab_size), cfg)


class NextTokenLoss(torch.nn.Module):
    """Mean cross-entropy of ``model``'s logits, cast to fp32, against the next tokens: what a training step
    differentiates. One module with the model, so that ``torch.compile`` fuses the cast, the log-softmax
    over the vocabulary and their backward instead of writing fp32 logits (GPT-2: 16,384 × 50,257 per
    micro-batch of 16) to memory several times over, as nanoGPT computes its loss inside the compiled
    model."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.model(x).float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def training_loss(model: torch.nn.Module, cfg: dict[str, Any]) -> torch.nn.Module:
    """The module a train step calls, (x, y) → loss: ``NextTokenLoss(model)``, compiled when ``compile``
    is set."""
    loss = NextTokenLoss(model)
    return torch.compile(loss) if cfg["compile"] else loss
