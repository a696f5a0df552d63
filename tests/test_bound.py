"""The certified Lipschitz bounds: hand computations, scaling, and soundness against attacks.

Soundness: every ratio ‖f(x)−f(y)‖/‖x−y‖ is a lower bound on the true Lipschitz constant, so a
ratio above the certificate (random pairs, or pairs found by gradient ascent on the ratio) would
prove the certificate wrong.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lipflow.config import run_defaults
from lipflow.model import build_model
from lipflow.model.base import rms_operator_norm, spectral_norm
from lipflow.model.bound import GELU_MAX_SLOPE, project_rms_ball
from lipflow.model.certificate import Certificate, residual, scaled, sequential, total
from lipflow.model.lipschitz_gpt import LipschitzAttention, orthogonal_init_


def inf_rms(z: torch.Tensor) -> torch.Tensor:
    """‖Z‖_∞RMS per sample: max over tokens of the RMS over the last dim."""
    return z.pow(2).mean(dim=-1).sqrt().amax(dim=-1)


def flat_l2(z: torch.Tensor) -> torch.Tensor:
    return z.flatten(1).norm(dim=1)


def ascent_ratio(f, x0: torch.Tensor, norm, steps: int, step_size: float = 1e-2, lr: float = 0.03) -> float:
    """max over Adam ascent steps of ‖f(x+εu)−f(x)‖/‖εu‖ (u = d/‖d‖), optimizing x and d jointly."""
    x = x0.clone().requires_grad_(True)
    d = torch.randn_like(x0).requires_grad_(True)
    opt = torch.optim.Adam([x, d], lr=lr)
    best = 0.0
    for _ in range(steps):
        y = x + step_size * d / norm(d).reshape(-1, *([1] * (d.ndim - 1)))
        ratio = norm(f(y) - f(x)) / norm(y - x)
        best = max(best, ratio.max().item())
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    return best


def random_ratio(f, x: torch.Tensor, y: torch.Tensor, norm) -> float:
    with torch.no_grad():
        return (norm(f(x) - f(y)) / norm(x - y)).max().item()


# --------------------------------------------------------------------------- hand computations

D, H, V, T = 8, 2, 8, 5
Q, K, VAL, O, UP, DOWN, HEAD = 0.7, 1.3, 0.9, 1.1, 0.8, 0.6, 1.5
ATTN_SCALE, LOGIT_SCALE = 3.0, 2.0


def known_model(n_layers: int, activation: str, name: str = "lipschitz_gpt"):
    """Every block: W_q = Q·I, W_k = K·I, W_v = VAL·I, W_o = O·I, W_up = UP·[I;I;I;I],
    W_down = DOWN·[I I I I]; head = HEAD·I. RMS→RMS norms: UP (σ 2·UP, s = 2) and 4·DOWN (σ 2·DOWN, s = ½)."""
    cfg = run_defaults(model=name, d_model=D, n_layers=n_layers, n_heads=H, context=T, mlp_ratio=4,
                       attn_scale=ATTN_SCALE, logit_scale=LOGIT_SCALE, activation=activation)
    model = build_model(cfg, V)
    eye = torch.eye(D)
    with torch.no_grad():
        for block in model.blocks:
            for lin, c in ((block.attn.q, Q), (block.attn.k, K), (block.attn.v, VAL), (block.attn.o, O)):
                lin.weight.copy_(c * eye)
            block.mlp.up.weight.copy_(UP * eye.repeat(4, 1))
            block.mlp.down.weight.copy_(DOWN * eye.repeat(1, 4))
        model.head.weight.copy_(HEAD * eye)
    return model


def hand_attention(a: float, divisor: float = 3.0) -> float:
    # per head: σ_q = Q, σ_k = K, σ_v = VAL; score scale c = attn_scale/d_head so 2·c·d·a² = 2·attn_scale·H·a²
    return O * math.sqrt(H * VAL ** 2 * (1 + 2 * ATTN_SCALE * H * a * a * Q * K) ** 2) / divisor


@pytest.mark.parametrize("activation,act_gain", [("gelu", 1 / GELU_MAX_SLOPE), ("relu", 1.0)])
def test_one_block_bound_matches_hand_computation(activation, act_gain):
    model = known_model(1, activation)
    alpha = 0.5
    body = ((1 - alpha) + alpha * hand_attention(1.0)) * ((1 - alpha) + alpha * UP * 4 * DOWN)
    assert model.lipschitz_bound() == pytest.approx(LOGIT_SCALE * HEAD * body, rel=1e-5)
    assert model.lipschitz_bound_l2() == pytest.approx(math.sqrt(T) * LOGIT_SCALE * HEAD * body, rel=1e-5)
    assert model.lipschitz_bound_l2(seq_len=2) == pytest.approx(math.sqrt(2) * LOGIT_SCALE * HEAD * body, rel=1e-5)


@pytest.mark.parametrize("activation,act_gain", [("gelu", 1 / GELU_MAX_SLOPE), ("relu", 1.0)])
def test_two_block_bound_propagates_the_activation_bound(activation, act_gain):
    model = known_model(2, activation)
    alpha = 0.25
    lip_mlp = UP * 4 * DOWN
    attn_gain = O * math.sqrt(H) * VAL / 3
    a1 = ((1 - alpha) + alpha * attn_gain) * ((1 - alpha) + alpha * act_gain * lip_mlp)
    body = 1.0
    for a in (1.0, a1):
        body *= ((1 - alpha) + alpha * hand_attention(a)) * ((1 - alpha) + alpha * lip_mlp)
    assert model.lipschitz_bound() == pytest.approx(LOGIT_SCALE * HEAD * body, rel=1e-5)


@pytest.mark.parametrize("activation,act_gain", [("gelu", 1 / GELU_MAX_SLOPE), ("relu", 1.0)])
def test_two_block_bound_of_the_unscaled_model_matches_hand_computation(activation, act_gain):
    """lipschitz_gpt_unscaled: x + F(x) and attention without ⅓, so each residual contributes 1 + L_F and
    the stream's RMS bound grows by (1 + g_att)(1 + g_mlp) per block."""
    model = known_model(2, activation, "lipschitz_gpt_unscaled")
    lip_mlp = UP * 4 * DOWN
    attn_gain = O * math.sqrt(H) * VAL
    a1 = (1 + attn_gain) * (1 + act_gain * lip_mlp)
    body = 1.0
    for a in (1.0, a1):
        body *= (1 + hand_attention(a, divisor=1.0)) * (1 + lip_mlp)
    assert model.lipschitz_bound() == pytest.approx(LOGIT_SCALE * HEAD * body, rel=1e-5)
    modula = known_model(2, activation)
    assert model.lipschitz_bound() > 10 * modula.lipschitz_bound()


def test_bound_scales_with_weights_as_the_formula_predicts():
    model = known_model(1, "gelu")
    base_inf, base_l2 = model.lipschitz_bound(), model.lipschitz_bound_l2()
    assert math.isfinite(base_inf) and math.isfinite(base_l2)
    with torch.no_grad():
        model.head.weight.mul_(3.0)
    assert model.lipschitz_bound() == pytest.approx(3 * base_inf, rel=1e-5)
    assert model.lipschitz_bound_l2() == pytest.approx(3 * base_l2, rel=1e-5)
    with torch.no_grad():
        model.head.weight.div_(3.0)
        model.blocks[0].mlp.up.weight.mul_(2.5)
    lip_mlp = UP * 4 * DOWN
    predicted = (0.5 + 0.5 * 2.5 * lip_mlp) / (0.5 + 0.5 * lip_mlp)
    assert model.lipschitz_bound() / base_inf == pytest.approx(predicted, rel=1e-5)
    with torch.no_grad():
        model.blocks[0].mlp.up.weight.div_(2.5)
        model.blocks[0].attn.q.weight.mul_(2.0)  # only the QK term grows
    qk = 1 + 2 * ATTN_SCALE * H * Q * K
    predicted = (0.5 + 0.5 * hand_attention(1.0) * (1 + 2 * (qk - 1)) / qk) / (0.5 + 0.5 * hand_attention(1.0))
    assert model.lipschitz_bound() / base_inf == pytest.approx(predicted, rel=1e-5)


def test_baseline_gpt_has_no_certificate():
    model = build_model(run_defaults(model="gpt", d_model=16, n_layers=1, n_heads=2, context=8, mlp_ratio=4), 10)
    assert model.lipschitz_bound() is None and model.lipschitz_bound_l2() is None


# --------------------------------------------------------------------------- attention alone

def random_attention(n_heads: int, d: int, context: int, attn_scale: float, seed: int) -> LipschitzAttention:
    torch.manual_seed(seed)
    attn = LipschitzAttention(d, n_heads, context, attn_scale)
    with torch.no_grad():
        for lin in (attn.q, attn.k, attn.v, attn.o):
            orthogonal_init_(lin.weight)
    attn.requires_grad_(False)
    return attn


def attention_ascent(attn: LipschitzAttention, steps: int, pairs: int = 32) -> float:
    """Local ∞RMS ratio ascent with both points kept in the domain {RMS(x_t) ≤ 1}."""
    d, context = attn.q.in_features, attn.rope.cos.shape[0]
    x = project_rms_ball(torch.randn(pairs, context, d), 1.0).requires_grad_(True)
    u = torch.randn(pairs, context, d).requires_grad_(True)
    opt = torch.optim.Adam([x, u], lr=0.05)
    best = 0.0
    for _ in range(steps):
        xp = project_rms_ball(x, 1.0)
        yp = project_rms_ball(xp + 1e-3 * u / inf_rms(u)[:, None, None], 1.0)
        ratio = inf_rms(attn(yp) - attn(xp)) / inf_rms(yp - xp)
        best = max(best, ratio.max().item())
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    return best


def test_multi_head_attention_bound_is_sound_and_needs_its_head_factors():
    attn = random_attention(n_heads=4, d=16, context=4, attn_scale=8.0, seed=0)
    ours = attn.certify(1.0).lipschitz
    o, q, k, v = attn.weight_norms()
    paper = o * float(v.max()) * (1 + 2 * float(q.max() * k.max()) * 8.0) / 3  # Theorem B.1 with full-matrix norms
    found = attention_ascent(attn, steps=60)
    assert found <= ours
    assert found > 1.5 * paper  # the single-head formula would be violated: H matters


def test_single_head_attention_bound_is_nearly_tight():
    attn = random_attention(n_heads=1, d=8, context=4, attn_scale=8.0, seed=0)
    found = attention_ascent(attn, steps=100)
    bound = attn.certify(1.0).lipschitz
    assert bound / 1.5 < found <= bound


def test_attention_output_rms_stays_within_its_gain():
    attn = random_attention(n_heads=4, d=16, context=6, attn_scale=8.0, seed=1)
    x = project_rms_ball(torch.randn(64, 6, 16), 1.0).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    best = 0.0
    for _ in range(60):
        xp = project_rms_ball(x, 1.0)
        out = inf_rms(attn(xp))
        best = max(best, out.max().item())
        opt.zero_grad()
        (-out.sum()).backward()
        opt.step()
    assert best <= attn.certify(1.0).gain


# --------------------------------------------------------------------------- trained models

def clamp_rms_operator_norm_(w: torch.Tensor, sigma_max: float) -> None:
    """W ← s·U·min(Σ, σ_max)·Vᵀ for W/s = UΣVᵀ, s = √(fan_out/fan_in) (exact spectral clamp)."""
    fan_out, fan_in = w.shape
    s = math.sqrt(fan_out / fan_in)
    u, sig, vh = torch.linalg.svd(w / s, full_matrices=False)
    w.copy_((u * sig.clamp(max=sigma_max)) @ vh * s)


def train_lipschitz_gpt(activation: str, name: str = "lipschitz_gpt"):
    """A 2-block lipschitz_gpt trained 40 AdamW steps on 'next = previous + 1', norms clamped at 2."""
    torch.manual_seed(0)
    vocab, context = 16, 6
    model = build_model(run_defaults(model=name, d_model=16, n_layers=2, n_heads=2, context=context,
                                     attn_scale=4.0, activation=activation, optimizer="adamw"), vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.0)
    roles = model.param_roles()
    for _ in range(40):
        seq = (torch.randint(0, vocab, (32, 1)) + torch.arange(context + 1)) % vocab
        logits = model(seq[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), seq[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for _, w in roles["hidden"] + roles["head"]:
                clamp_rms_operator_norm_(w, 2.0)
            model.project_embeddings()
    assert loss.item() < 0.5  # it learned something, so the weights are not at init
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="module", params=["gelu", "relu"])
def trained_lipschitz_gpt(request):
    return train_lipschitz_gpt(request.param)


@pytest.fixture(scope="module")
def trained_unscaled_lipschitz_gpt():
    """The same for lipschitz_gpt_unscaled (x + F(x), attention without ⅓)."""
    return train_lipschitz_gpt("gelu", "lipschitz_gpt_unscaled")


def test_certificate_of_the_unscaled_model_is_sound(trained_unscaled_lipschitz_gpt):
    """No attack beats the certificate or the activation bounds of a model with x + F(x) residuals."""
    model = trained_unscaled_lipschitz_gpt
    assert_certificate_sound(model, "inf_rms")
    bounds = model.activation_bounds()
    best = max_entry_attack(model, bounds)
    assert all(best[k] <= bounds[k] * (1 + 1e-5) for k in bounds), {k: (best[k], bounds[k]) for k in bounds}
    assert best["blocks.0.attn.scores"] > bounds["blocks.0.attn.scores"] / 2  # the attack searches


@pytest.mark.parametrize("norm_name", ["inf_rms", "l2"])
def test_certificate_is_sound_on_a_trained_model(trained_lipschitz_gpt, norm_name):
    assert_certificate_sound(trained_lipschitz_gpt, norm_name)


def assert_certificate_sound(model, norm_name: str) -> None:
    """Random pairs in and outside the domain and a gradient ascent on the ratio stay within the bound."""
    norm, bound = {"inf_rms": (inf_rms, model.lipschitz_bound()),
                   "l2": (flat_l2, model.lipschitz_bound_l2())}[norm_name]
    assert math.isfinite(bound)
    f = model.forward_embedded
    gen = torch.Generator().manual_seed(1)
    x = project_rms_ball(torch.randn(256, model.context, 16, generator=gen), 1.0)
    near = x + 0.05 * torch.randn(x.shape, generator=gen)
    far = 3.0 * torch.randn(x.shape, generator=gen)  # outside the domain: forward_embedded projects
    found = [random_ratio(f, x, near, norm), random_ratio(f, x, far, norm)]
    start = model.embed(torch.randint(0, model.vocab_size, (32, model.context), generator=gen))
    found.append(ascent_ratio(f, start, norm, steps=80))
    assert max(found) <= bound
    assert found[-1] > found[0]  # the ascent does search: it beats random pairs


def scaled_mlp(**cfg):
    """A 3-layer mlp (12 → 24 → 24 → 5) with an orthogonal head and layer i scaled by 1 + i/2."""
    torch.manual_seed(0)
    model = build_model(run_defaults(**{"model": "mlp", "in_features": 12, "d_model": 24, "n_layers": 3,
                                        "activation": "gelu", **cfg}), 5)
    with torch.no_grad():
        orthogonal_init_(model.layers[-1].weight)
        for i, layer in enumerate(model.layers):
            layer.weight.mul_(1.0 + 0.5 * i)
    return model.requires_grad_(False)


def test_mlp_certificate_is_sound():
    model = scaled_mlp(optimizer="adamw")
    bound = model.lipschitz_bound()
    assert bound == model.lipschitz_bound_l2()
    x = torch.randn(128, 12)
    found = max(random_ratio(model, x, x + 0.1 * torch.randn_like(x), flat_l2),
                ascent_ratio(model, x[:32], flat_l2, steps=150))
    assert 0.3 * bound < found <= bound
    with torch.no_grad():
        model.layers[1].weight.mul_(-2.0)
    assert model.lipschitz_bound() == pytest.approx(2 * bound, rel=1e-5)


# --------------------------------------------------------------------------- activation bounds (max |entry|)

def hand_activation_bounds(activation: str) -> dict[str, float]:
    """known_model(1, ·)'s bounds by hand: A = √D (a = 1); α = ½; every W_q row has norm Q, etc."""
    A = math.sqrt(D)
    c = ATTN_SCALE / (D // H)
    a_mid = 0.5 + 0.5 * O * math.sqrt(H) * VAL / 3
    act_gain = 1 / GELU_MAX_SLOPE if activation == "gelu" else 1.0
    a_out = a_mid * (0.5 + 0.5 * act_gain * UP * 4 * DOWN)
    p = "blocks.0."
    return {p + "attn.q.input": A, p + "attn.q.output": Q * A, p + "attn.k.output": K * A,
            p + "attn.v.output": VAL * A, p + "attn.scores": c * Q * K * A * A, p + "attn.o.input": VAL * A,
            p + "attn.o.output": O * VAL * A,  # Σ_h ‖(W_o^(h) W_v^h)_i,:‖ = O·VAL: row i meets one head
            p + "mlp.up.input": math.sqrt(D) * a_mid, p + "mlp.up.output": UP * math.sqrt(D) * a_mid,
            p + "mlp.down.input": UP * math.sqrt(D) * a_mid,  # |GELU(h)|, |ReLU(h)| ≤ |h|
            p + "mlp.down.output": 4 * DOWN * UP * math.sqrt(D) * a_mid,  # ‖W_down,i‖ = 2·DOWN, σ_up = 2·UP
            "block0": math.sqrt(D) * a_out, "head.input": math.sqrt(D) * a_out,
            "head.output": HEAD * math.sqrt(D) * a_out, "logits": LOGIT_SCALE * HEAD * math.sqrt(D) * a_out}


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_activation_bounds_match_hand_computation(activation):
    bounds = known_model(1, activation).activation_bounds()
    for key, value in hand_activation_bounds(activation).items():
        assert bounds[key] == pytest.approx(value, rel=1e-6), key


def test_activation_bounds_follow_the_certificate_recursion(trained_lipschitz_gpt):
    """The RMS bound a behind every entry bound is the certificate's (``certify``), and embedding rows
    beyond RMS 1 (``forward`` on token ids skips the projection) raise the starting a."""
    model = copy.deepcopy(trained_lipschitz_gpt)
    a = 1.0
    bounds = model.activation_bounds()
    for i, block in enumerate(model.blocks):
        a = block.certify(a).bound
        assert bounds[f"block{i}"] == pytest.approx(math.sqrt(16) * a, rel=1e-6)  # a₀ = max row RMS, 1 + 5e-8
    with torch.no_grad():
        model.tok.weight[3] *= 2.0
    assert model.activation_bounds()["logits"] == pytest.approx(2 * bounds["logits"], rel=1e-6)  # linear in a₀


def activations(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every bounded tensor of ``model.forward_embedded(x)``, keyed like ``activation_bounds()``: each
    Linear's input and output (hooks), the scores c·RoPE(q)·RoPE(k)ᵀ on and below the diagonal
    (recomputed from the q and k outputs), the residual stream after each block and the logits."""
    found: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, key=f"{name}.input": found.__setitem__(key, args[0])))
            handles.append(module.register_forward_hook(
                lambda _m, _args, out, key=f"{name}.output": found.__setitem__(key, out)))
    try:
        found["logits"] = model.forward_embedded(x)
    finally:
        for h in handles:
            h.remove()
    for i, block in enumerate(model.blocks):
        attn, prefix = block.attn, f"blocks.{i}.attn."
        B, T, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return attn.rope(t.view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2))

        q, k = heads(found[prefix + "q.output"]), heads(found[prefix + "k.output"])
        scores = attn.score_scale * q @ k.transpose(-1, -2)
        found[prefix + "scores"] = scores * torch.ones(T, T, dtype=torch.bool).tril()
        found[f"block{i}"] = found[f"blocks.{i + 1}.attn.q.input" if i + 1 < len(model.blocks) else "head.input"]
    return found


def max_entry_attack(model, bounds: dict[str, float], per_key: int = 6, steps: int = 60,
                     seed: int = 0) -> dict[str, float]:
    """Best max |entry| per tensor found by projected gradient ascent on embedded inputs in the domain.

    One batch holds ``per_key`` sequences per tensor, each group ascending (Adam) its own tensor's
    max |entry| / bound, every step projected back onto {RMS(x_t) ≤ 1}; every sequence of every step
    counts for every tensor."""
    keys = list(bounds)
    gen = torch.Generator().manual_seed(seed)
    x = project_rms_ball(10 * torch.randn(len(keys) * per_key, model.context, model.tok.embedding_dim,
                                          generator=gen), 1.0).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    best = dict.fromkeys(keys, 0.0)
    for _ in range(steps):
        found = activations(model, x)
        objective = 0.0
        for j, key in enumerate(keys):
            peak = found[key].abs().flatten(1).amax(dim=1)
            best[key] = max(best[key], peak.max().item())
            objective = objective + peak[j * per_key:(j + 1) * per_key].sum() / max(bounds[key], 1e-12)
        opt.zero_grad()
        (-objective).backward()
        opt.step()
        with torch.no_grad():
            x.copy_(project_rms_ball(x, 1.0))
    return best


def factors(bounds: dict[str, float], best: dict[str, float]) -> dict[str, float]:
    return {k: bounds[k] / best[k] for k in bounds}


def test_activation_bounds_hold_and_are_near_the_attack_on_trained_models(trained_lipschitz_gpt):
    """Sound: no attack exceeds any bound. Near: every bound is within 5× of the best attack on its
    tensor, the median within 2×, the largest bound within 3.5× of the largest entry found, and block
    0's q/k/v/o outputs and scores within 1.25× — so halving those bounds makes the attack exceed them
    (the attack is strong enough to catch a bound that is too small).
    Measured (gelu / relu): per tensor 1.00–3.64 / 1.00–3.68 (worst: block 1's W_down output), median
    1.66 / 1.63, logits 2.50 / 2.67, largest bound / largest entry 2.94 / 3.12, block 0 ≤ 1.14 / 1.12."""
    model = trained_lipschitz_gpt
    bounds = model.activation_bounds()
    best = max_entry_attack(model, bounds)
    assert all(best[k] <= bounds[k] * (1 + 1e-5) for k in bounds), {k: (best[k], bounds[k]) for k in bounds}
    ratio = factors(bounds, best)
    assert max(ratio.values()) < 5.0 and sorted(ratio.values())[len(ratio) // 2] < 2.0, ratio
    assert max(bounds.values()) < 3.5 * max(best.values())
    block0 = [f"blocks.0.attn.{m}" for m in ("q.output", "k.output", "v.output", "o.output", "scores")]
    assert all(best[k] > bounds[k] / 2 for k in block0)
    assert all(ratio[k] < 1.25 for k in block0), ratio


def scaled_model(model, seed: int):
    """``model`` with every matrix multiplied by a random factor in [0.5, 4] and a 5× logit scale:
    bounds far from the constrained regime (σ up to 8), where a loose recursion would be exposed."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, w in model.param_roles()["hidden"] + model.param_roles()["head"]:
            w.mul_(0.5 + 3.5 * torch.rand((), generator=gen))
    model.logit_scale = 5.0
    return model


@pytest.mark.parametrize("seed", [0, 1])
def test_activation_bounds_hold_on_adversarially_scaled_models(trained_lipschitz_gpt, seed):
    model = scaled_model(trained_lipschitz_gpt, seed)
    bounds = model.activation_bounds()
    best = max_entry_attack(model, bounds, seed=seed)
    assert all(best[k] <= bounds[k] * (1 + 1e-5) for k in bounds), {k: (best[k], bounds[k]) for k in bounds}
    assert best["blocks.0.attn.scores"] > bounds["blocks.0.attn.scores"] / 2  # still searching well


def test_mlp_bounds_use_the_coordinate_bounds_and_the_readout_multiplier():
    """in 2 → 2 → 2 (ReLU), W₀ = diag(1, 0.01), W₁ = [[0.01, 1], [0.01, 1]], output_mult −0.25, inputs ‖x‖₂ ≤ 1.
    After layer 0 the coordinates are within (1, 0.01), so |(W₁h)_i| ≤ 0.01·1 + 1·0.01 = 0.02 (triangle
    inequality), far below Cauchy–Schwarz's ‖W₁[i,:]‖·‖h‖ ≈ 1.00005; the logits within 0.25·0.02. Forward:
    −0.25·W₁ relu(W₀x); the certified constant |−0.25|·σ(W₀)σ(W₁) = 0.25·√2·1.00005."""
    cfg = run_defaults(model="mlp", in_features=2, d_model=2, n_layers=2, activation="relu")
    model = build_model(cfg, 2).double()
    w0 = torch.diag(torch.tensor([1.0, 0.01], dtype=torch.float64))
    w1 = torch.tensor([[0.01, 1.0], [0.01, 1.0]], dtype=torch.float64)
    with torch.no_grad():
        model.layers[0].weight.copy_(w0)
        model.layers[1].weight.copy_(w1)
    model.output_mult = -0.25
    bounds = model.activation_bounds(input_norm=1.0)
    assert bounds["layers.0.output"] == pytest.approx(1.0) and bounds["block0"] == pytest.approx(1.0)
    assert bounds["layers.1.input"] == pytest.approx(1.0)
    assert bounds["layers.1.output"] == pytest.approx(0.02, rel=1e-12)
    assert bounds["logits"] == pytest.approx(0.25 * 0.02, rel=1e-12)
    assert model.lipschitz_bound() == pytest.approx(0.25 * math.sqrt(2 * (1 + 1e-4)), rel=1e-6)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), -0.25 * torch.relu(x @ w0.T) @ w1.T, rtol=1e-12, atol=1e-12)


def test_mlp_activation_bounds_hold_and_need_an_input_domain():
    model = scaled_mlp(input_norm=2.0)
    bounds = model.activation_bounds()
    assert build_model(run_defaults(model="mlp", in_features=12, d_model=24, n_layers=3), 5).activation_bounds() is None
    assert model.activation_bounds(input_norm=4.0)["logits"] == pytest.approx(2 * bounds["logits"], rel=1e-9)
    found: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.layers):
        layer.register_forward_pre_hook(lambda _m, args, key=f"layers.{i}.input": found.__setitem__(key, args[0]))
        layer.register_forward_hook(lambda _m, _a, out, key=f"layers.{i}.output": found.__setitem__(key, out))
    keys = [k for k in bounds if k.startswith("layers.")] + ["logits"]
    x = torch.randn(len(keys) * 8, 12, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    best = dict.fromkeys(keys, 0.0)
    for _ in range(100):
        xp = x * (2.0 / x.norm(dim=1, keepdim=True)).clamp(max=1.0)  # onto the ball ‖x‖₂ ≤ 2
        found["logits"] = model(xp)
        objective = 0.0
        for j, key in enumerate(keys):
            peak = found[key].abs().amax(dim=1)
            best[key] = max(best[key], peak.max().item())
            objective = objective + peak[j * 8:(j + 1) * 8].sum() / bounds[key]
        opt.zero_grad()
        (-objective).backward()
        opt.step()
    assert all(best[k] <= bounds[k] * (1 + 1e-5) for k in keys), {k: (best[k], bounds[k]) for k in keys}
    assert best["layers.0.output"] > 0.99 * bounds["layers.0.output"]  # a row of W₁ is attained exactly
    assert best["logits"] > bounds["logits"] / 4


@pytest.mark.parametrize("shape", [(12, 3), (3, 12), (5, 5)])
def test_rms_operator_norm_is_the_largest_rms_gain(shape):
    """‖W‖_RMS→RMS = max_x RMS(Wx)/RMS(x) = σ_max·√(fan_in/fan_out), attained at the top right singular
    vector (computed here from the SVD), and never exceeded by random inputs."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fan_out, fan_in = shape
    _, s, vh = torch.linalg.svd(w)
    rms = lambda z: z.pow(2).mean(dim=-1).sqrt()  # noqa: E731
    attained = float(rms(w @ vh[0]) / rms(vh[0]))
    assert rms_operator_norm(w) == pytest.approx(attained, rel=1e-6)
    assert rms_operator_norm(w) == pytest.approx(float(s[0]) * math.sqrt(fan_in / fan_out), rel=1e-6)
    x = torch.randn(1000, fan_in, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert float((rms(x @ w.T) / rms(x)).max()) <= attained * (1 + 1e-6)


def test_readout_certificate_uses_the_rms_norm_of_a_non_square_head():
    """Vocabulary 40 ≠ d 16: the readout's constant is |logit_scale·output_mult|·σ(W_head)·√(d/V)."""
    model = build_model(run_defaults(model="lipschitz_gpt", d_model=16, n_layers=1, n_heads=2, context=4,
                                     logit_scale=2.0), 40)
    model.output_mult = -0.5
    sigma = float(torch.linalg.matrix_norm(model.head.weight.detach().double(), ord=2))
    cert = model.readout_certificate(1.0)
    assert cert.lipschitz == pytest.approx(1.0 * sigma * math.sqrt(16 / 40), rel=1e-6)
    assert model.lipschitz_bound() == pytest.approx(model.body_lipschitz() * cert.lipschitz, rel=1e-12)


def test_norms_and_certificates_of_non_finite_weights_are_nan():
    """A diverged run's weights: spectral_norm and the certificate are NaN instead of an SVD error."""
    w = torch.randn(6, 4)
    w[1, 2] = math.nan
    assert math.isnan(spectral_norm(w)) and math.isnan(rms_operator_norm(w))
    w[1, 2] = math.inf
    assert math.isnan(spectral_norm(w))
    model = build_model(run_defaults(model="lipschitz_gpt", d_model=8, n_layers=1, n_heads=2, context=4), 8)
    with torch.no_grad():
        model.blocks[0].mlp.up.weight[0, 0] = math.inf
    assert math.isnan(model.lipschitz_bound())


# --------------------------------------------------------------------------- composition rules

def toy(gain: float, lipschitz_per_bound: float, key: str):
    """A module with output bound gain·b, constant lipschitz_per_bound·b (bound-dependent, like attention)
    and one entry key = b, so a test sees which bound each part was certified at."""
    return lambda b, coordinates=None: Certificate.leaf(b, gain, lipschitz_per_bound * b, {key: b})


def test_sequential_feeds_each_part_the_previous_bound_and_multiplies():
    cert = sequential([("a.", toy(2.0, 3.0, "in")), ("b.", toy(5.0, 7.0, "in"))], 0.5)
    assert cert.entries == {"a.in": 0.5, "b.in": 1.0}  # part b sees 2·0.5
    assert (cert.bound, cert.gain, cert.lipschitz) == (5.0, 10.0, (3.0 * 0.5) * (7.0 * 1.0))
    assert [p.bound for p in cert.parts] == [1.0, 5.0]


@pytest.mark.parametrize("keep, weight", [(0.75, 0.25), (1.0, 1.0)])
def test_residual_is_the_sum_of_its_scaled_branches(keep, weight):
    a = 0.8
    cert = residual(keep, weight, toy(4.0, 6.0, "x"))(a)
    assert cert.gain == keep + weight * 4.0 and cert.bound == a * cert.gain
    assert cert.lipschitz == keep + weight * 6.0 * a and cert.entries == {"x": a}
    summed = total(toy(1.0, 2.0, "p"), scaled(-3.0, toy(0.5, 1.0, "q")))(2.0)
    assert (summed.gain, summed.lipschitz, summed.bound) == (2.5, 4.0 + 6.0, 5.0)
    assert summed.entries == {"p": 2.0, "q": 2.0}


def test_scaled_multiplies_bound_gain_constant_and_coordinates_by_abs_c():
    """c·f with c < 0: every output quantity of f, the per-coordinate bounds included, times |c|."""
    coords = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    inner = lambda b, coordinates=None: Certificate.leaf(b, 3.0, 5.0, {"e": b}, coords * b)  # noqa: E731
    cert = scaled(-2.0, inner)(0.5)
    assert (cert.bound, cert.gain, cert.lipschitz, cert.entries) == (3.0, 6.0, 10.0, {"e": 0.5})
    torch.testing.assert_close(cert.coordinates, 2.0 * 0.5 * coords, rtol=0, atol=0)


def test_rules_carry_per_token_bounds_elementwise():
    """A local certificate passes a tensor of per-token bounds; each token gets what a float would give."""
    parts = [("r.", residual(0.5, 0.5, toy(3.0, 2.0, "x"))), ("s.", toy(0.5, 1.0, "y"))]
    bounds = torch.tensor([0.25, 1.0, 2.0], dtype=torch.float64)
    batch = sequential(parts, bounds)
    for t, b in enumerate(bounds.tolist()):
        one = sequential(parts, b)
        assert batch.bound[t].item() == one.bound and batch.lipschitz[t].item() == one.lipschitz
        assert batch.entries["s.y"][t].item() == one.entries["s.y"]


def test_block_certificate_is_its_two_residuals_in_sequence(trained_lipschitz_gpt):
    """The block's certificate is the product of (1−α) + α·L over its branches, each at its input's bound."""
    block, a = trained_lipschitz_gpt.blocks[1], 1.3
    alpha = 1 / (2 * len(trained_lipschitz_gpt.blocks))
    assert (block.keep, block.weight) == (1 - alpha, alpha)
    attn = block.attn.certify(a)
    a_mid = a * ((1 - alpha) + alpha * attn.gain)
    mlp = block.mlp.certify(a_mid)
    cert = block.certify(a)
    assert cert.lipschitz == ((1 - alpha) + alpha * attn.lipschitz) * ((1 - alpha) + alpha * mlp.lipschitz)
    assert cert.bound == a_mid * ((1 - alpha) + alpha * mlp.gain)
    assert cert.entries["mlp.up.input"] == math.sqrt(16) * a_mid
