"""Shared fixtures: a tokenized copy of the embedded corpus and a tiny run config."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Snakemake arguments for a test pipeline: training jobs on one thread (the train rule asks for 2), so on a
# 2-core machine two of them run side by side instead of one at a time with threads waiting on each other.
SNAKEMAKE_SINGLE_THREADED = ("--set-threads", "train=1")


def documented_training(shards: Path, cfg: dict, steps: int = 3):
    """The model after ``steps`` steps of the trainer's documented loop, written out here: seed, build,
    then per step lr ← base_lr·schedule, windows from the seeded generator, cross-entropy backward,
    constrained update, embedding projection."""
    import torch
    import torch.nn.functional as F

    from lipflow.schedules import lr_factor
    from lipflow.train.build import build_learner, token_splits
    from lipflow.train.update import constrained_update

    torch.manual_seed(cfg["seed"])
    train, _ = token_splits(shards, cfg)
    model, optimizer, matrices, constraint = build_learner(cfg, train.vocab_size, torch.device("cpu"))
    generator = torch.Generator().manual_seed(cfg["seed"])
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(cfg["schedule"], step, cfg["steps"], cfg["warmup_steps"])
        optimizer.zero_grad(set_to_none=True)
        x, y = train.sample_windows(cfg["batch_size"], cfg["context"], generator)
        logits = model(x).float()
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
        constrained_update(optimizer, matrices, constraint)
        model.project_embeddings()
    return model


def run_stage(module: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m <module> args`` and return the finished process (never raises)."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


# The main each stage's command runs. A test that only sets a case up with a stage (or tests what a run
# writes, not the command) runs it in this process: each command start costs a second or two of imports.
STAGE_MAINS = {"lipflow.train": "lipflow.train.__main__", "lipflow.evaluation": "lipflow.evaluation.__main__",
               "lipflow.results": "lipflow.results.cli"}


def stage_here(module: str, *args: str, cwd: Path | None = None) -> int:
    """:func:`run_stage` in this process: stage ``module``'s main with ``args`` (from ``cwd``); its exit code."""
    main = importlib.import_module(STAGE_MAINS[module]).main
    with contextlib.chdir(cwd or Path.cwd()):
        return main(list(args))


def train_here(cfg: dict, data: Path, out: Path, run_id: str = "tiny-00000000") -> int:
    """The train stage in this process (:func:`stage_here`) for run ``run_id`` of ``cfg``; its exit code."""
    return stage_here("lipflow.train", "--run-id", run_id, "--config-json", json.dumps(cfg), "--data-dir", str(data),
                      "--out-dir", str(out), "--no-progress")


@pytest.fixture(scope="session")
def char_shards(tmp_path_factory) -> Path:
    """The embedded corpus, split and char-tokenized: a data dir with manifest.json."""
    root = tmp_path_factory.mktemp("data")
    corpus = run_stage("lipflow.data.corpus", "--config-json", json.dumps({"name": "pydoc", "source": "embedded"}),
                       "--out-dir", str(root / "corpus"))
    assert corpus.returncode == 0, corpus.stderr
    tok = run_stage("lipflow.data.tokenize", "--corpus-dir", str(root / "corpus"),
                    "--config-json", json.dumps({"kind": "char"}), "--out-dir", str(root / "char"))
    assert tok.returncode == 0, tok.stderr
    return root / "char"


@pytest.fixture
def tiny_run_config() -> dict:
    """A resolved run config (schema defaults filled) for a model that trains in about a second."""
    from lipflow.config import check_config

    config = {"runs": {"tiny": {"d_model": 32, "n_layers": 1, "n_heads": 2, "context": 16, "batch_size": 4,
                                "steps": 12, "eval_every": 4, "eval_batches": 1, "checkpoint_every": 3,
                                "device": "cpu"}}}
    check_config(config)
    return config["runs"]["tiny"]


@pytest.fixture(scope="session", autouse=True)
def single_thread_torch():
    """Tests use small matrices: one intra-op thread avoids thrashing on a busy 2-core machine, in this
    process and in the subprocesses the tests start (torch reads OMP_NUM_THREADS when it loads; Snakemake
    sets it per job from the rule's threads, see SNAKEMAKE_SINGLE_THREADED)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session", autouse=True)
def slurm_sweep_in_background(request, tmp_path_factory):
    """When `slurm` tests are selected, their module's BackgroundSweep (test_slurm.py) starts with the session:
    its cluster and Snakemake runs mostly wait on SLURM, and the other tests use those minutes. Under
    pytest-xdist the first worker to claim it runs it and the others wait for what it publishes."""
    slurm_tests = [item for item in request.session.items if item.get_closest_marker("slurm")]
    if not slurm_tests:
        yield None
        return
    module = slurm_tests[0].module
    failure_case = any(item.name.startswith("test_failed_job") for item in slurm_tests)
    # xdist workers' temporary folders are popen-gw<N> inside the session's own folder, which they share
    shared = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") else None
    if shared is not None and not module.claim_sweep(shared):
        yield module.SweepOfAnotherWorker(shared)
        return
    with module.BackgroundSweep(tmp_path_factory.mktemp("slurm_sweep"), failure_case, shared) as sweep:
        yield sweep
        if not sweep.delivered and shared is None:  # the session ended first (-x, --maxfail, Ctrl-C): don't
            sweep.stop.set()                          # wait the runs out (under xdist, another worker may need them)


def unscaled_simulation(model, fmt, inputs, device: str = "cpu"):
    """The precision evaluation's unscaled simulation in number format ``fmt``: a copy of ``model`` with its
    weights cast, every Linear's input and output cast (``linear_hooks``) and attention on SDPA's math backend,
    run on ``inputs``; (the copy, its output, the hooks' state: the largest |value| before each cast)."""
    import copy

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lipflow.evaluation.number_formats import simulate_cast
    from lipflow.evaluation.precision import _cast_parameters, linear_hooks

    cast_model = copy.deepcopy(model)
    _cast_parameters(cast_model, lambda p: simulate_cast(p, fmt))
    with torch.no_grad(), linear_hooks(cast_model.to(device), fmt) as state, sdpa_kernel([SDPBackend.MATH]):
        output = cast_model(inputs.to(device))
    return cast_model, output, state
