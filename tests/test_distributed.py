"""torchrun DDP on CPU (gloo, 2 processes) trains the same model as one process on the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import run_stage


def test_two_gloo_processes_match_one_process_with_the_global_batch(char_shards, tiny_run_config, tmp_path):
    cfg = {**tiny_run_config, "model": "lipschitz_gpt", "optimizer": "muon", "lr": 0.05,
           "weight_constraint": "spectral_soft_cap", "steps": 6, "eval_every": 3, "checkpoint_every": 3}
    single = {**cfg, "batch_size": 2 * cfg["batch_size"]}
    one = run_stage("lipflow.training", "--run-id", "one-00000000", "--config-json", json.dumps(single),
                    "--data-dir", str(char_shards), "--out-dir", str(tmp_path / "one"), "--no-progress")
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "lipflow.training", "--run-id", "two-00000000", "--config-json",
                          json.dumps({**cfg, "nproc": 2}), "--data-dir", str(char_shards),
                          "--out-dir", str(tmp_path / "two"), "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "run.json").read_text())
    assert summary["processes"] == 2 and summary["status"] == "completed"
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    moved = 0
    for name in a:
        assert torch.allclose(a[name], b[name], atol=2e-5, rtol=1e-4), name
        moved += int(not torch.equal(a[name], torch.zeros_like(a[name])))
    assert moved > 0
