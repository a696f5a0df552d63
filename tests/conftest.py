"""Shared fixtures: a tokenized copy of the embedded corpus and a tiny run config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_stage(module: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m <module> args`` and return the finished process (never raises)."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


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
    """In-process tests use small matrices: one intra-op thread avoids thrashing on a busy 2-core
    machine (subprocesses started by the tests keep torch's default)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
