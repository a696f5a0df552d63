"""Per-step training telemetry: gradient norm, step time, the optimizer's measured update norms and
σ₁ after the constraint at eval steps, and the max pre-softmax attention score per layer."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import torch

from conftest import train_here
from lipflow.model import build_model
from lipflow.train.trainer import Trainer


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
    assert train_here(cfg, char_shards, tmp_path) == 0
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


def test_evaluated_loss_is_the_exact_per_token_mean_with_a_partial_last_batch(tiny_run_config):
    """evaluate_windows' loss is the mean cross-entropy over every predicted token of every window,
    computed here in one pass; 5 windows in batches of 2 leave a partial last batch of 1."""
    from lipflow.metrics import evaluate_windows

    torch.manual_seed(0)
    vocab, context = 50, tiny_run_config["context"]
    net = build_model({**tiny_run_config, "model": "gpt"}, vocab).eval()
    gen = torch.Generator().manual_seed(1)
    windows = torch.randint(0, vocab, (5, context + 1), generator=gen)
    windows[4] = 7  # a last window unlike the rest, so weighting it wrongly moves the mean
    got = evaluate_windows(net, windows, 2, torch.device("cpu"))
    with torch.no_grad():
        logits = net(windows[:, :-1]).double()
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), windows[:, 1:].reshape(-1)).item()
    assert got["tokens"] == 5 * context
    assert got["loss"] == pytest.approx(expected, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_max_attention_logit_is_the_largest_magnitude_also_when_it_is_negative(tiny_run_config):
    """max_attention_logits is max |scale·q·kᵀ| over causal pairs (recomputed here from W_q, W_k):
    the same for W_q and −W_q, one of which makes the largest-magnitude score negative."""
    from lipflow.metrics import max_attention_logits

    torch.manual_seed(0)
    net = build_model({**tiny_run_config, "model": "gpt"}, 50)
    attn = net.blocks[0].attn
    captured = {}
    attn.register_forward_pre_hook(lambda module, args: captured.__setitem__("x", args[0].detach()))
    idx = torch.randint(0, 50, (2, tiny_run_config["context"]), generator=torch.Generator().manual_seed(3))
    C, H = tiny_run_config["d_model"], tiny_run_config["n_heads"]
    signs = []
    for flip in (False, True):
        if flip:
            with torch.no_grad():
                attn.qkv.weight[:C].neg_()
        with torch.no_grad():
            net.eval()
            net(idx)
        x = captured["x"].double()
        w_q, w_k, _ = attn.qkv.weight.double().chunk(3, dim=0)
        B, T, _ = x.shape
        q = (x @ w_q.T).view(B, T, H, C // H).transpose(1, 2)
        k = (x @ w_k.T).view(B, T, H, C // H).transpose(1, 2)
        scores = attn.score_scale * q @ k.transpose(-1, -2)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        causal_scores = scores[..., causal]
        top = causal_scores.abs().max().item()
        signs.append(causal_scores.flatten()[causal_scores.abs().argmax()].item() < 0)
        got = max_attention_logits(net, idx)
        assert got["blocks.0.attn"] == pytest.approx(top, rel=1e-4)
    assert any(signs)  # one of the two cases had a negative largest-magnitude score


def test_tokens_count_every_micro_batch():
    """The `tokens` column after step s is s·batch_size·grad_accum·context (every micro-batch's
    tokens), and tokens_per_s is that per-step count over the step time."""
    from lipflow.distributed import Topology
    from lipflow.train.telemetry import StepLog, StepResult

    cfg = {"batch_size": 4, "grad_accum": 3, "context": 16}
    log = StepLog(cfg, Topology())
    one = torch.tensor(1.0)
    for step in (1, 2):
        log.add(step, 1.0, StepResult(one, one, torch.tensor(0)))
    rows, bad = log.flush()
    assert bad is None
    assert [r["tokens"] for r in rows] == [4 * 3 * 16, 2 * 4 * 3 * 16]
    for r in rows:
        assert r["tokens_per_s"] == pytest.approx(4 * 3 * 16 / r["step_time"])


def test_grad_accum_logs_the_mean_micro_batch_loss_and_the_mean_gradient(char_shards, tiny_run_config, tmp_path):
    """With grad_accum = 2, a step's loss is the mean of its two micro-batch losses and its gradient
    (hence grad_norm) the mean of their gradients, recomputed here on the same windows."""
    import copy

    import torch.nn.functional as F

    cfg = {**tiny_run_config, "grad_accum": 2, "batch_size": 2}
    trainer = Trainer("tiny-00000000", cfg, char_shards, tmp_path, progress=False)
    model = copy.deepcopy(trainer.model)
    gen = torch.Generator()
    gen.set_state(trainer.generator.get_state())
    result = trainer.train_step()
    losses = []
    for _ in range(2):
        x, y = trainer.train_windows.sample_windows(cfg["batch_size"], cfg["context"], gen)
        logits = model(x).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        (loss / 2).backward()
        losses.append(loss.item())
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert float(result.loss) == pytest.approx(sum(losses) / 2, rel=1e-5)
    assert float(result.grad_norm) == pytest.approx(grads.norm().item(), rel=1e-4)
