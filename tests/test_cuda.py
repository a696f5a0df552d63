"""CUDA: training in bf16 autocast, a step with no host sync, bit-exact resume on one GPU,
torch.compile, torchrun + NCCL, and every evaluation on the GPU. Skipped without a GPU;
``bench/gpu_check`` runs them (``pytest -m cuda``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_stage
from lipflow.config import load_config_file

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

RUNS = load_config_file(Path(__file__).resolve().parent.parent / "config.yaml")["runs"]
ARMS = {"gpt": RUNS["baseline"], "lipschitz_gpt": RUNS["lipschitz"]}  # config.yaml's, logits × 8 included


@pytest.fixture
def cuda_cfg(tiny_run_config):
    return {**tiny_run_config, "device": "cuda", "d_model": 64, "n_heads": 4, "context": 32, "batch_size": 8}


def train_args(cfg: dict, data: Path, out: Path) -> list[str]:
    return ["--run-id", "cuda-00000000", "--config-json", json.dumps(cfg), "--data-dir", str(data),
            "--out-dir", str(out), "--no-progress"]


def train(cfg: dict, data: Path, out: Path) -> int:
    """The train stage's entry point with the pipeline's arguments, in this process (bench/gpu_check's lease
    is short: a stage process each would start Python, torch and CUDA again); its exit status."""
    from lipflow.train.__main__ import main

    return main(train_args(cfg, data, out))


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_training_on_cuda_in_bf16(arm, cuda_cfg, char_shards, tmp_path):
    assert train({**cuda_cfg, **ARMS[arm]}, char_shards, tmp_path) == 0
    summary = json.loads((tmp_path / "run.json").read_text())
    assert summary["status"] == "completed" and summary["device"].startswith("cuda")
    rows = pq.read_table(tmp_path / "train_metrics.parquet").to_pylist()
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["val_loss"] == summary["final_val_loss"]


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_a_training_step_never_waits_for_the_gpu(arm, cuda_cfg, char_shards, tmp_path):
    """torch.cuda.set_sync_debug_mode('error') raises on any host-device synchronization."""
    from lipflow.train.trainer import Trainer

    trainer = Trainer("cuda-00000000", {**cuda_cfg, **ARMS[arm]}, char_shards, tmp_path, progress=False)
    trainer.train_step()  # first step: lazy CUDA initialisation may synchronize
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = [trainer.train_step() for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(r.loss) for r in results)
    if arm == "gpt":
        assert trainer.optimizer.defaults["fused"]  # AdamW's one-kernel step on CUDA


def test_resume_on_one_gpu_gives_the_uninterrupted_weights(cuda_cfg, char_shards, tmp_path, capsys):
    cfg = {**cuda_cfg, **ARMS["lipschitz_gpt"], "steps": 12, "checkpoint_every": 6, "eval_every": 6}
    whole = tmp_path / "whole"
    assert train(cfg, char_shards, whole) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(whole / "checkpoints", resumed / "checkpoints")
    for late in (resumed / "checkpoints").glob("step-000000012*"):
        late.unlink()
    capsys.readouterr()
    assert train(cfg, char_shards, resumed) == 0
    stderr = capsys.readouterr().err
    assert "resumed from step-000000006" in stderr, stderr[-2000:]
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    diffs = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a}
    assert all(d == 0.0 for d in diffs.values()), diffs


def test_compiled_training_on_cuda(cuda_cfg, char_shards, tmp_path):
    """A stage process of its own: compilation stays out of this test process."""
    done = run_stage("lipflow.train", *train_args({**cuda_cfg, **ARMS["lipschitz_gpt"], "compile": True},
                                                  char_shards, tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "completed"


def test_torchrun_one_process_with_nccl(cuda_cfg, char_shards, tmp_path):
    cfg = {**cuda_cfg, **ARMS["lipschitz_gpt"], "nproc": 1}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           "-m", "lipflow.train", *train_args(cfg, char_shards, tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run.json").read_text())
    assert summary["status"] == "completed" and summary["processes"] == 1


@pytest.fixture(scope="module")
def trained_on_cuda(char_shards, tmp_path_factory):
    from lipflow.config import check_config

    config = {"runs": {"tiny": {"d_model": 64, "n_layers": 1, "n_heads": 4, "context": 32, "batch_size": 8,
                                "steps": 10, "eval_every": 5, "device": "cuda", **ARMS["lipschitz_gpt"]}}}
    check_config(config)
    out = tmp_path_factory.mktemp("cuda_run")
    assert train(config["runs"]["tiny"], char_shards, out) == 0
    return out, config["evaluations"]


@pytest.mark.parametrize("evaluation", ["val", "robustness", "precision", "rank", "sharpness"])
def test_each_evaluation_on_cuda(evaluation, trained_on_cuda, char_shards, tmp_path):
    """The evaluation stage's entry point with the pipeline's arguments, in this process (a stage process
    each would start Python, torch and CUDA five more times in bench/gpu_check's short lease)."""
    from lipflow.evaluation.__main__ import main

    run_dir, params = trained_on_cuda
    out = tmp_path / f"{evaluation}.parquet"
    assert main(["--evaluation", evaluation, "--run-dir", str(run_dir), "--data-dir", str(char_shards),
                 "--params-json", json.dumps(params[evaluation]), "--out", str(out), "--device", "cuda"]) == 0
    rows = pq.read_table(out).to_pylist()
    assert rows and all(r["eval"] == evaluation for r in rows)
