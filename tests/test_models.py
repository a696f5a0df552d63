"""Model shapes, causality, initialization, embedding projection, RoPE and activations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lipflow.config import run_defaults
from lipflow.model import MODELS, build_model
from lipflow.model.bound import ACTIVATIONS, GELU_MAX_SLOPE
from lipflow.model.lipschitz_gpt import RotaryEmbedding, orthogonal_init_
from lipflow.registry import UnknownNameError

VOCAB = 40
LM_CFG = run_defaults(d_model=32, n_layers=2, n_heads=4, context=12, mlp_ratio=4, attn_scale=4.0, optimizer="adamw")


def lm(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model({**LM_CFG, "model": name, **overrides}, VOCAB)
    if name == "lipschitz_gpt":  # zero-init output projections would hide attention and MLP
        with torch.no_grad():
            for block in model.blocks:
                orthogonal_init_(block.attn.o.weight)
                orthogonal_init_(block.mlp.down.weight)
    return model


@pytest.mark.parametrize("name", ["gpt", "lipschitz_gpt"])
def test_shapes_and_forward_paths_agree(name):
    model = lm(name)
    idx = torch.randint(0, VOCAB, (3, LM_CFG["context"]))
    x = model.embed(idx)
    assert x.shape == (3, LM_CFG["context"], LM_CFG["d_model"])
    logits = model(idx)
    assert logits.shape == (3, LM_CFG["context"], VOCAB)
    torch.testing.assert_close(model.forward_embedded(x), logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["gpt", "lipschitz_gpt"])
def test_a_sequence_longer_than_the_context_is_named(name):
    """Past the context there is no position (gpt: a learned table, an IndexError; lipschitz_gpt: rotary
    tables, a shape mismatch): one ValueError naming both lengths. Shorter sequences run."""
    model = lm(name)
    context = LM_CFG["context"]
    assert model(torch.randint(0, VOCAB, (2, context - 5))).shape == (2, context - 5, VOCAB)
    with pytest.raises(ValueError, match=rf"^a sequence of {context + 1} tokens is longer than the model's context "
                                         rf"{context}: keep its last {context}"):
        model(torch.randint(0, VOCAB, (2, context + 1)))


@pytest.mark.parametrize("name", ["gpt", "lipschitz_gpt"])
@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 7, -1])
def test_a_token_id_outside_the_vocabulary_is_named(name, bad):
    """An id outside 0…VOCAB−1 given to a model in eval mode (as ``load_run`` returns it) is one ValueError
    naming the id and the vocabulary size, not torch's "index out of range in self"; the last id runs."""
    model = lm(name).eval()
    idx = torch.randint(0, VOCAB, (2, LM_CFG["context"]))
    idx[0, 0] = VOCAB - 1
    assert model(idx).shape == (2, LM_CFG["context"], VOCAB)
    idx[1, 3] = bad
    with pytest.raises(ValueError, match=rf"^token id {bad} is outside the model's vocabulary of {VOCAB} "
                                         rf"\(ids 0 to {VOCAB - 1}\)$"):
        model(idx)


@pytest.mark.parametrize("name", ["gpt", "lipschitz_gpt"])
def test_causality_future_tokens_never_change_earlier_logits(name):
    model = lm(name)
    idx = torch.randint(0, VOCAB, (2, LM_CFG["context"]))
    base = model(idx)
    for pos in (3, 7):
        changed = idx.clone()
        changed[:, pos] = (changed[:, pos] + 1) % VOCAB
        out = model(changed)
        assert torch.equal(out[:, :pos], base[:, :pos]), f"position {pos} leaked into earlier logits"
        # and attention does carry it forward: a later position sees the change
        assert (out[:, pos + 1] - base[:, pos + 1]).abs().max() > 1e-4


def test_lipschitz_gpt_init_follows_modula():
    model = build_model({**LM_CFG, "model": "lipschitz_gpt"}, VOCAB)
    rows_rms = model.tok.weight.pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(rows_rms, torch.ones(VOCAB))
    for block in model.blocks:
        for w in (block.attn.q.weight, block.attn.k.weight, block.attn.v.weight, block.mlp.up.weight):
            fan_out, fan_in = w.shape
            s = torch.linalg.svdvals(w.double()) / math.sqrt(fan_out / fan_in)
            torch.testing.assert_close(s, torch.ones_like(s), rtol=1e-5, atol=1e-5)  # all σ(W/s) = 1
        assert not block.attn.o.weight.any() and not block.mlp.down.weight.any()


def test_embedding_projection_shrinks_only_rows_above_rms_one():
    model = build_model({**LM_CFG, "model": "lipschitz_gpt"}, VOCAB)
    with torch.no_grad():
        scales = torch.linspace(0.2, 3.0, VOCAB)[:, None]
        model.tok.weight.mul_(scales)
    before = model.tok.weight.detach().clone()
    model.project_embeddings()
    after = model.tok.weight.detach()
    rms = after.pow(2).mean(dim=1).sqrt()
    inside = scales.squeeze(1) <= 1.0
    torch.testing.assert_close(after[inside], before[inside], rtol=0, atol=0)
    torch.testing.assert_close(rms[~inside], torch.ones(int((~inside).sum())))
    cos = torch.nn.functional.cosine_similarity(after[~inside], before[~inside], dim=1)
    torch.testing.assert_close(cos, torch.ones_like(cos))  # direction kept


@pytest.mark.parametrize("scale", [5e18, 2e19, 1e30, 1e37])  # 1e38 made an init entry above 3.4 inf
def test_embedding_projection_puts_huge_rows_on_the_sphere(scale):
    """A row whose entries' squares overflow float32 (an entry ≥ 1.8e19, or a sum of squares past 3.4e38:
    a step at a huge learning rate) goes onto RMS 1 in its own direction: its RMS was inf and the row was
    set to 0, so a run trained on with those tokens' rows silently zeroed. Rows of ordinary size are
    projected bit for bit as by the unscaled RMS."""
    torch.manual_seed(0)
    model = build_model({**LM_CFG, "model": "lipschitz_gpt"}, VOCAB)
    with torch.no_grad():
        assert model.tok.weight.abs().max() * scale < torch.finfo(torch.float32).max  # finite, only its squares overflow
        model.tok.weight[:VOCAB // 2].mul_(scale)
        model.tok.weight[VOCAB // 2:].mul_(torch.linspace(0.5, 3.0, VOCAB - VOCAB // 2)[:, None])
    before = model.tok.weight.detach().clone()
    model.project_embeddings()
    after = model.tok.weight.detach()
    huge, ordinary = slice(None, VOCAB // 2), slice(VOCAB // 2, None)
    torch.testing.assert_close(after[huge].pow(2).mean(dim=1).sqrt(), torch.ones(VOCAB // 2))
    cos = torch.nn.functional.cosine_similarity(after[huge], before[huge] / scale, dim=1)
    torch.testing.assert_close(cos, torch.ones_like(cos))
    unscaled_rms = before[ordinary].pow(2).mean(dim=1, keepdim=True).sqrt()
    assert torch.equal(after[ordinary], before[ordinary] * (1.0 / unscaled_rms.clamp(min=1.0)))


def test_forward_embedded_projects_inputs_onto_the_domain():
    model = lm("lipschitz_gpt")
    x = model.embed(torch.randint(0, VOCAB, (2, LM_CFG["context"])))
    torch.testing.assert_close(model.forward_embedded(3.0 * x), model.forward_embedded(x))
    assert not torch.allclose(model.forward_embedded(0.5 * x), model.forward_embedded(x))


def test_scaled_gelu_is_one_lipschitz_with_tight_constant():
    x = torch.linspace(-8, 8, 400_001, dtype=torch.float64)
    gelu = ACTIVATIONS.get("gelu")
    y = gelu.fn(x)
    slopes = (y[1:] - y[:-1]) / (x[1:] - x[:-1])
    assert slopes.abs().max() <= 1.0 + 1e-9
    assert slopes.max() >= 1.0 - 1e-6  # GELU_MAX_SLOPE is max GELU', not a loose constant
    peak = x[:-1][slopes.argmax()]
    assert abs(peak - math.sqrt(2)) < 1e-2
    assert torch.all(y.abs() <= gelu.gain * x.abs() + 1e-12)  # the magnitude bound used in the certificate
    assert abs(gelu.gain - 1 / GELU_MAX_SLOPE) < 1e-12 and abs(GELU_MAX_SLOPE - 1.1289) < 1e-5


def test_rope_is_orthogonal_and_relative():
    rope = RotaryEmbedding(head_dim=8, context=16)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=gen), torch.randn(1, 1, 1, 8, generator=gen)
    q_all, k_all = rope(q.expand(1, 1, 16, 8)), rope(k.expand(1, 1, 16, 8))
    torch.testing.assert_close(q_all.norm(dim=-1), q.norm(dim=-1).expand(1, 1, 16))
    scores = q_all[0, 0] @ k_all[0, 0].T  # depends on t − s only
    for shift in range(-5, 6):
        diag = torch.diagonal(scores, offset=shift)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_its_gradient_equal_the_pairwise_rotation_bit_for_bit(dtype):
    """(x_2i, x_2i+1) ↦ (x_2i·cos − x_2i+1·sin, x_2i·sin + x_2i+1·cos), θ_i = 10000^(−2i/d_head), written
    out pair by pair and differentiated by autograd: the same outputs and input gradients, not just
    close ones (on a transposed (B, H, T, d) view, as attention passes it)."""
    head_dim, context = 8, 16
    rope = RotaryEmbedding(head_dim=head_dim, context=context)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, context, 3, head_dim, generator=gen).to(dtype).transpose(1, 2).requires_grad_(True)
    upstream = torch.randn(x.shape, generator=gen).to(dtype)
    angles = torch.arange(context, dtype=torch.float32)[:, None] * 10000.0 ** (
        -torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    expected = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    (expected_grad,) = torch.autograd.grad(expected, x, upstream)
    y = rope(x)
    (grad,) = torch.autograd.grad(y, x, upstream)
    assert torch.equal(y, expected) and torch.equal(grad, expected_grad)


def test_rope_is_differentiable_twice_in_both_modes_and_under_vmap():
    rope = RotaryEmbedding(head_dim=4, context=5).double()
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(rope, (x,), check_forward_ad=True, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(rope, (x,))


@pytest.mark.parametrize("name", ["gpt", "lipschitz_gpt"])
def test_the_training_loss_compiles_to_one_graph(name):
    """torch.compile sees each model and its loss whole (compile: true compiles ``NextTokenLoss``; a graph
    break would split it, e.g. at RoPE's custom autograd Function, which the model leaves to the
    compiler when compiling)."""
    from lipflow.train.build import NextTokenLoss

    torch._dynamo.reset()
    x, y = torch.randint(0, VOCAB, (2, 2, LM_CFG["context"]))
    explanation = torch._dynamo.explain(NextTokenLoss(lm(name)))(x, y)
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_activation_stats_are_recorded_per_block_and_logits():
    model = lm("lipschitz_gpt")
    model.record_activations = True
    idx = torch.randint(0, VOCAB, (2, LM_CFG["context"]))
    logits = model(idx)
    stats = model.activation_stats
    assert {f"block{i}.{s}" for i in range(2) for s in ("max_abs", "rms")} <= set(stats)
    assert stats["logits.max_abs"] == pytest.approx(logits.abs().max().item())
    assert stats["logits.rms"] == pytest.approx(logits.pow(2).mean().sqrt().item())


@pytest.mark.parametrize("name", ["gpt", "lipschitz_gpt"])
def test_param_roles_cover_every_parameter_once(name):
    model = lm(name)
    roles = model.param_roles()
    listed = [id(p) for params in roles.values() for _, p in params]
    assert sorted(listed) == sorted(id(p) for p in model.parameters())
    assert [n for n, _ in roles["head"]] == ["head.weight"]


def test_mlp_classifier_shapes_roles_and_init():
    cfg = run_defaults(model="mlp", in_features=12, d_model=16, n_layers=3, activation="relu", optimizer="adamw")
    model = build_model(cfg, 5)
    assert model(torch.randn(4, 3, 4)).shape == (4, 5)  # images are flattened
    roles = model.param_roles()
    assert [n for n, _ in roles["hidden"]] == ["layers.0.weight", "layers.1.weight"]
    assert [n for n, _ in roles["head"]] == ["layers.2.weight"]
    assert not model.layers[2].weight.any()
    assert MODELS.get("mlp")({**cfg, "n_classes": 7}).layers[-1].out_features == 7
    with pytest.raises(ValueError, match="n_classes"):
        MODELS.get("mlp")({**cfg, "n_classes": 7}, 5)


def test_bad_configs_fail_with_one_line_errors():
    with pytest.raises(UnknownNameError, match="did you mean 'lipschitz_gpt'"):
        build_model({**LM_CFG, "model": "lipschitz_gtp"}, VOCAB)
    with pytest.raises(ValueError, match="n_heads"):
        build_model({**LM_CFG, "model": "lipschitz_gpt", "n_heads": 5}, VOCAB)
    with pytest.raises(ValueError, match="depth_mup"):
        build_model({**LM_CFG, "model": "lipschitz_gpt", "depth_mup": True}, VOCAB)
    with pytest.raises(UnknownNameError, match="activation"):
        build_model({**LM_CFG, "model": "lipschitz_gpt", "activation": "tanh"}, VOCAB)


def test_lipschitz_gpt_refuses_an_odd_head_dimension():
    """RoPE rotates pairs of each head's coordinates: d_model 12 over 4 heads (d_head 3) is refused up front."""
    with pytest.raises(ValueError, match="even integer"):
        build_model({**LM_CFG, "model": "lipschitz_gpt", "d_model": 12, "n_heads": 4}, VOCAB)
    assert build_model({**LM_CFG, "model": "lipschitz_gpt", "d_model": 16, "n_heads": 4}, VOCAB).blocks[0].attn.head_dim == 4


@pytest.mark.parametrize("parametrization, scale", [("sp", 1 / math.sqrt(8)), ("mup", 1 / 8)])
def test_gpt_attention_scale_is_one_over_root_d_head_in_sp_and_one_over_d_head_in_mup(parametrization, scale):
    """µP's attention 1/d_head (Tensor Programs V, §E.3) replaces SP's 1/√d_head (d_head = 32/4 = 8)."""
    model = build_model({**LM_CFG, "model": "gpt", "parametrization": parametrization}, VOCAB)
    assert all(block.attn.score_scale == pytest.approx(scale, rel=1e-15) for block in model.blocks)


@pytest.mark.parametrize("depth_mup, branch", [(False, 1.0), (True, 0.5)])
def test_gpt_block_is_the_pre_layernorm_residual_written_out(depth_mup, branch):
    """x ← x + b·attn(LN₁(x)); x ← x + b·mlp(LN₂(x)) with b = 1/√L under depth-µP (L = 4: ½), else 1:
    both branches carry the factor."""
    model = lm("gpt", n_layers=4, depth_mup=depth_mup).double()
    x = torch.randn(2, LM_CFG["context"], LM_CFG["d_model"], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for block in model.blocks:
            mid = x + branch * block.attn(block.ln1(x))
            expected = mid + branch * block.mlp(block.ln2(mid))
            torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)
            x = expected


def heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, C) → (B, H, T, C/H)."""
    B, T, C = t.shape
    return t.reshape(B, T, n_heads, C // n_heads).transpose(1, 2)


@pytest.mark.parametrize("name, parametrization", [("gpt", "sp"), ("gpt", "mup"), ("lipschitz_gpt", "sp")])
def test_attention_scores_and_output_equal_attention_written_out(name, parametrization):
    """From ``projection_weights`` alone: z = c·(RoPE)q·(RoPE)kᵀ per head (c = ``score_scale``: µP's
    1/d_head is not SDPA's default 1/√d_head) is ``attention_scores`` on and below the diagonal and 0
    above it, and W_o·concat_h softmax(z + causal mask)·v_h times ``output_scale`` is the attention's output."""
    model = lm(name, parametrization=parametrization).double()
    attn = model.blocks[0].attn
    n_heads = attn.n_heads
    x = torch.randn(2, LM_CFG["context"], LM_CFG["d_model"], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    w_q, w_k, w_v, w_o = attn.projection_weights()
    q, k, v = (heads(x @ w.T, n_heads) for w in (w_q, w_k, w_v))
    if name == "lipschitz_gpt":
        q, k = attn.rope(q), attn.rope(k)
    z = attn.score_scale * q @ k.transpose(-2, -1)
    below = torch.ones(z.shape[-2:], dtype=torch.bool).tril()
    with torch.no_grad():
        scores = attn.attention_scores(x)
        out = attn(x)
    torch.testing.assert_close(scores.double(), z.masked_fill(~below, 0.0), rtol=1e-5, atol=1e-5)
    y = torch.softmax(z.masked_fill(~below, -math.inf), dim=-1) @ v
    expected = y.transpose(1, 2).reshape(x.shape) @ w_o.T * attn.output_scale
    torch.testing.assert_close(out, expected.detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("activation, n_layers, name", [("gelu", 2, "lipschitz_gpt"), ("relu", 1, "lipschitz_gpt"),
                                                         ("gelu", 2, "lipschitz_gpt_unscaled")])
def test_lipschitz_block_equals_the_residual_written_out(activation, n_layers, name):
    """The block folds the branches' constant scales (⅓, 1/max GELU') into one fused residual step;
    it must equal x ← (1−α)x + α·attn(x); x ← (1−α)x + α·mlp(x), α = 1/(2N), with the scales applied in
    the branches (lipschitz_gpt), or x ← x + attn(x); x ← x + mlp(x) with no ⅓ (lipschitz_gpt_unscaled)."""
    torch.manual_seed(0)
    model = build_model(run_defaults(model=name, d_model=32, n_layers=n_layers, n_heads=4, context=8,
                                     activation=activation), 11)
    with torch.no_grad():  # output projections start at zero: give the branches something to add
        for block in model.blocks:
            block.attn.o.weight.normal_(0, 0.3)
            block.mlp.down.weight.normal_(0, 0.3)
    x = torch.randn(3, 8, 32, dtype=torch.float64)
    model = model.double()
    a, third = (1 / (2 * n_layers), 1 / 3) if name == "lipschitz_gpt" else (None, 1.0)
    for block in model.blocks:
        if a is None:
            expected = x + block.attn(x)
            expected = expected + block.mlp(expected)
        else:
            expected = (1 - a) * x + a * block.attn(x)
            expected = (1 - a) * expected + a * block.mlp(expected)
        torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(block.attn(x), block.attn.unscaled(x) * third)
        if activation == "gelu":
            torch.testing.assert_close(block.mlp(x), block.mlp.down(F.gelu(block.mlp.up(x)) / GELU_MAX_SLOPE))
        x = block(x)
