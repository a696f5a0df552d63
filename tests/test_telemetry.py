"""Per-step training telemetry: gradient norm, step time, the optimizer's measured update norms and
σ₁ after the constraint at eval steps, and the max pre-softmax attention score per layer."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import torch

from lipflow.model import build_model
from lipflow.train.trainer import Trainer

from conftest import run_stage

LIPSCHITZ = {"model": "lipschitz_gpt", "optimizer": "muon", "lr": 0.05, "weight_constraint": "spectral_soft_cap",
             "sigma_max": 1.0}


@pytest.mark.parametrize("model", ["gpt", "lipschitz_gpt"])
def test_attention_scores_are_the_ones_the_model_attends_with(model, tiny_run_config):
    """softmax(attention_scores with the causal mask)·V reproduces the module's own attention."""
    torch.manual_seed(0)
    net = build_model({**tiny_run_config, "model": model}, 50)
    attn = net.blocks[0].attn
    x = torch.randn(3, 16, tiny_run_config["d_model"])
    scores = attn.attention_scores(x)
    mask = torch.ones(16, 16, dtype=torch.bool).tril()
    weights = torch.softmax(scores.masked_fill(~mask, -math.inf), dim=-1)
    B, T, C = x.shape
    if model == "gpt":
        v = attn.qkv(x).split(C, dim=2)[2]
    else:
        v = attn.v(x)
    v = v.view(B, T, attn.n_heads, -1).transpose(1, 2)
    mixed = (weights @ v).transpose(1, 2).reshape(B, T, C)
    out = attn.out(mixed) if model == "gpt" else attn.o(mixed) * attn.output_scale
    torch.testing.assert_close(out, attn(x), atol=1e-5, rtol=1e-4)
    assert torch.count_nonzero(scores[..., ~mask]) == 0


def test_training_logs_telemetry(char_shards, tiny_run_config, tmp_path):
    cfg = {**tiny_run_config, **LIPSCHITZ}
    done = run_stage("lipflow.train", "--run-id", "tiny-00000000", "--config-json", json.dumps(cfg),
                     "--data-dir", str(char_shards), "--out-dir", str(tmp_path), "--no-progress")
    assert done.returncode == 0, done.stderr
    rows = pq.read_table(tmp_path / "train_metrics.parquet").to_pylist()
    assert [r["step"] for r in rows] == list(range(1, cfg["steps"] + 1))
    for r in rows:
        assert r["grad_norm"] > 0 and r["step_time"] > 0 and r["clipped_updates"] == 0
        assert r["tokens_per_s"] == pytest.approx(cfg["batch_size"] * cfg["context"] / r["step_time"])
    evals = [r for r in rows if r["val_loss"] is not None]
    assert [r["step"] for r in evals] == list(range(cfg["eval_every"], cfg["steps"] + 1, cfg["eval_every"]))
    for r in evals:
        layers = json.loads(r["layers"])
        assert len(layers) == 6 * cfg["n_layers"] + 1  # q, k, v, o, up, down per block, and the head
        for name, layer in layers.items():
            assert 0 < layer["update_norm"] <= layer["update_bound"] * (1 + 1e-5), name  # Muon's bound holds
            assert layer["sigma_max"] <= cfg["sigma_max"] * (1 + 1e-4), name  # the soft cap's promise
        logits = json.loads(r["attention_logits"])
        assert set(logits) == {f"blocks.{i}.attn" for i in range(cfg["n_layers"])}
        assert r["max_attention_logit"] == max(logits.values()) > 0


def test_step_result_gradient_norm_is_the_global_norm(char_shards, tiny_run_config, tmp_path):
    trainer = Trainer("tiny-00000000", {**tiny_run_config, **LIPSCHITZ}, char_shards, tmp_path, progress=False)
    result = trainer.train_step()
    grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    assert float(result.grad_norm) == pytest.approx(grads.norm().item(), rel=1e-5)
    assert result.loss.ndim == 0 and int(result.clipped_updates) == 0
