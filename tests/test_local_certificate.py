"""The local certificate against attacks and autograd: PGD and random search inside the ball never
move the margin further than the bound, the bound over ε tends to ‖∇margin‖₂ as ε → 0, and the
certified radius holds — on lipschitz_gpt and mlp checkpoints (init, random σ 2 weights, trained)."""

import copy

import pytest
import torch

from lipflow.config import run_defaults
import lipflow.evaluation.local_certificate as lc
from lipflow.evaluation.local_attention import across_heads, attention_at, attention_bounds, attention_jacobian_norm
from lipflow.evaluation.local_certificate import local_certificate
from lipflow.evaluation.robustness import _random_in_ball, certified_radius, lipschitz_ascent, logit_margin, pgd_l2
from lipflow.model import build_model

GPT = run_defaults(model="lipschitz_gpt", d_model=32, n_layers=2, n_heads=4, context=12)
GPT_UNSCALED = {**GPT, "model": "lipschitz_gpt_unscaled"}  # x + F(x) residuals, attention without ⅓
MLP = run_defaults(model="mlp", in_features=24, d_model=32, n_layers=3, n_classes=7)
LINEAR = run_defaults(model="mlp", in_features=24, d_model=32, n_layers=1, n_classes=7)  # one Linear layer
VOCAB = 20  # the language models' vocabulary


def n_classes(cfg):
    return cfg["n_classes"] if cfg["model"] == "mlp" else VOCAB
SLACK = 1e-4  # fp32 round-off of the attacked forward against the float64 bound


def inputs(model, cfg, n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    if cfg["model"] == "mlp":
        return torch.randn(n, cfg["in_features"], generator=g)
    return model.embed(torch.randint(0, model.vocab_size, (n, cfg["context"]), generator=g)).detach()


def score(model, cfg):
    if cfg["model"] == "mlp":
        return model.forward_embedded
    return lambda x: model.forward_embedded(x)[:, -1]


def checkpoint(cfg, kind):
    """'init' (the model's own init), 'random' (every matrix at σ_max 2) or 'trained' (random, then
    20 Adam steps fitting random labels)."""
    torch.manual_seed(0)
    model = build_model(cfg, n_classes(cfg))
    if kind in ("random", "trained"):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2 and not name.startswith("tok"):
                    p.normal_().mul_(2.0 / torch.linalg.matrix_norm(p, 2))
    if kind == "trained":
        x = inputs(model, cfg, 32, seed=5)
        y = torch.randint(0, n_classes(cfg), (32,), generator=torch.Generator().manual_seed(6))
        opt = torch.optim.Adam(model.parameters(), lr=3e-2)
        for _ in range(20):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(score(model, cfg)(x), y).backward()
            opt.step()
        model.project_embeddings()
    return model.eval()


def certificate_at(model, cfg, x):
    with torch.no_grad():
        logits = score(model, cfg)(x).float()
    labels = logits.argmax(1)
    return local_certificate(model, x, labels, model.lipschitz_bound_l2()), logits, labels


def worst_attack_drop(model, cfg, x, labels, margin, eps):
    """max over PGD (2 restarts) and 32 uniform draws in the ball of margin(x) − margin(x + δ)."""
    f = score(model, cfg)
    delta = pgd_l2(f, x, labels, eps, steps=20, restarts=2, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        drops = [margin - logit_margin(f(x + delta), labels)]
        for _ in range(32):
            drops.append(margin - logit_margin(f(x + _random_in_ball(x.shape, torch.tensor(eps), g)), labels))
    return torch.stack(drops).max(dim=0).values


@pytest.mark.parametrize("cfg", [GPT, GPT_UNSCALED, MLP, LINEAR],
                         ids=["lipschitz_gpt", "lipschitz_gpt-unscaled", "mlp", "linear"])
@pytest.mark.parametrize("kind", ["init", "random", "trained"])
def test_no_attack_moves_the_margin_past_the_local_bound(cfg, kind):
    model = checkpoint(cfg, kind)
    x = inputs(model, cfg)
    cert, logits, labels = certificate_at(model, cfg, x)
    margin = logit_margin(logits, labels)
    assert torch.allclose(cert.logits.float(), logits, atol=1e-5)
    for eps in (1e-3, 0.1, 1.0):
        attack = worst_attack_drop(model, cfg, x, labels, margin, eps)
        bound = cert.margin_drop(torch.full((len(x),), eps)).float()
        assert bool((attack <= bound * (1 + SLACK) + 1e-6).all()), (eps, attack, bound)


def test_the_curvature_term_is_needed_the_gradient_alone_is_beaten():
    """An attack exceeds ‖∇margin‖·ε somewhere, so the soundness test above can fail."""
    model = checkpoint(GPT, "trained")
    x = inputs(model, GPT)
    cert, logits, labels = certificate_at(model, GPT, x)
    runner_up = cert.pair_margins.argmin(dim=1)
    gradient = cert.gradient_norms.gather(1, runner_up[:, None]).squeeze(1).float()
    margin = logit_margin(logits, labels)
    beaten = [bool((worst_attack_drop(model, GPT, x, labels, margin, eps) > gradient * eps * 1.01).any())
              for eps in (0.3, 1.0)]
    assert any(beaten)


def margin_gradient_norm(model, cfg, x, labels):
    """‖∇(z_y − z_j*)‖₂ per input by autograd on the model itself (float64), j* the runner-up."""
    model = copy.deepcopy(model).double()
    x = x.double().requires_grad_(True)
    logits = score(model, cfg)(x)
    runner_up = logits.scatter(1, labels[:, None], float("-inf")).argmax(1)
    margin = logits.gather(1, labels[:, None]).squeeze(1) - logits.gather(1, runner_up[:, None]).squeeze(1)
    grad, = torch.autograd.grad(margin.sum(), x)
    return grad.flatten(1).norm(dim=1)


@pytest.mark.parametrize("cfg", [GPT, MLP, LINEAR], ids=["lipschitz_gpt", "mlp", "linear"])
def test_the_bound_over_epsilon_tends_to_the_margin_gradient_norm(cfg):
    model = checkpoint(cfg, "trained")
    x = inputs(model, cfg)
    if cfg["model"] != "mlp":
        x = 0.9 * x  # strictly inside the RMS ball, where forward_embedded's projection is the identity
    cert, _, labels = certificate_at(model, cfg, x)
    gradient = margin_gradient_norm(model, cfg, x, labels)
    runner_up = cert.pair_margins.argmin(dim=1, keepdim=True)  # the class whose drop binds as ε → 0
    drops = [cert.pair_drops(torch.full((len(x),), eps, dtype=torch.float64)).gather(1, runner_up).squeeze(1)
             for eps in (1e-6, 1e-9, 1e-12)]
    ratios = [drop / (eps * gradient) for drop, eps in zip(drops, (1e-6, 1e-9, 1e-12))]
    assert torch.allclose(cert.margin_drop(torch.full((len(x),), 1e-6)), 1e-6 * ratios[0] * gradient, rtol=1e-6)
    assert bool((ratios[0] >= ratios[1] - 1e-9).all() and (ratios[1] >= ratios[2] - 1e-9).all())
    assert ratios[-1] == pytest.approx(torch.ones_like(ratios[-1]), abs=1e-3)
    assert bool((ratios[-1] >= 1 - 1e-6).all())


@pytest.mark.parametrize("kind", ["random", "trained"])
def test_the_local_radius_is_certified_and_at_least_the_global_one(kind):
    model = checkpoint(GPT, kind)
    x = inputs(model, GPT)
    cert, logits, labels = certificate_at(model, GPT, x)
    radius = cert.radius()
    assert bool((cert.margin_lower_bound(radius.double()) > 0).all())
    assert bool((cert.margin_lower_bound(1.01 * radius.double()) <= 0).all())
    global_radius = certified_radius(logits, labels, model.lipschitz_bound_l2())
    assert bool((radius >= global_radius * (1 - 1e-6)).all())
    assert float(radius.median()) > 10 * float(global_radius.median())
    delta = pgd_l2(score(model, GPT), x, labels, radius, steps=30, restarts=2)
    with torch.no_grad():
        assert bool((score(model, GPT)(x + delta).argmax(1) == labels).all())


@pytest.mark.parametrize("cfg", [run_defaults(model="gpt", d_model=16, n_layers=1, n_heads=2, context=6, mlp_ratio=2),
                                 {**MLP, "activation": "relu"}], ids=["layernorm", "relu"])
def test_models_without_a_curvature_bound_have_no_local_certificate(cfg):
    model = build_model(cfg, n_classes(cfg))
    x = inputs(model, cfg)
    assert local_certificate(model, x, torch.zeros(len(x), dtype=torch.long), None) is None


def composed_reference_drops(model, cfg, x, cert, eps, monkeypatch):
    """The bound before the telescoping (issue 20's first local certificate): L and β composed over all
    layers with each layer at radius L_prefix·ε, full-sequence attention constants, the gradients of
    the classes without an exact one bounded by ‖w_j‖·Π_k L_k(0)."""
    monkeypatch.setattr(lc, "last_query", lambda rec: rec)
    local = lc.local_model(model)
    with torch.no_grad():
        layers = local.body(local.prepare(x))[1]

    def compose(radius):
        lip, curv = torch.ones_like(radius), torch.zeros_like(radius)
        for layer in layers:
            layer_lip, layer_curv = layer.bounds(lip * radius)
            lip, curv = layer_lip * lip, layer_curv * lip * lip + layer_lip * curv
        return lip, curv

    nearest = cert.pair_margins.argsort(dim=1)[:, :lc.GRADIENT_CLASSES]
    gradients = (cert.head_norms * compose(torch.zeros(len(x), dtype=torch.float64))[0][:, None]).scatter(
        1, nearest, cert.gradient_norms.gather(1, nearest))
    lip, curv = compose(eps)
    e = eps[:, None]
    drop = torch.minimum(gradients * e + 0.5 * cert.head_norms * curv[:, None] * e * e,
                         cert.head_norms * lip[:, None] * e)
    return torch.minimum(drop, 2 ** 0.5 * cert.global_l2 * e)


@pytest.mark.parametrize("cfg,kind,gain", [(GPT, "random", 0.5), (GPT, "trained", 0.5), (MLP, "trained", 0.95)],
                         ids=["lipschitz_gpt-random", "lipschitz_gpt-trained", "mlp-trained"])
def test_the_telescoped_bound_is_at_most_the_composed_one_and_tighter_where_curvature_binds(cfg, kind, gain,
                                                                                           monkeypatch):
    """Never above the composed bound, and below it by the factor ``gain`` for some class (the mlp
    gains only the exact per-layer gradients; lipschitz_gpt also the attention constants)."""
    model = checkpoint(cfg, kind)
    x = inputs(model, cfg)
    cert, _, _ = certificate_at(model, cfg, x)
    ratios = []
    for eps in (1e-3, 1e-2, 0.1):
        eps = torch.full((len(x),), eps, dtype=torch.float64)
        new = cert.pair_drops(eps)
        old = composed_reference_drops(model, cfg, x.double(), cert, eps, monkeypatch)
        assert bool((new <= old * (1 + 1e-9)).all())
        ratios.append(float((new[old > 0] / old[old > 0]).min()))
    assert min(ratios) < gain, ratios


def power_iteration_norm(f, x, iters=50):
    """max over the iterates of ‖J u‖ for unit u, J the Jacobian of f at x (float64): a lower bound on ‖J‖₂."""
    u = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=x.dtype)
    best = torch.zeros(len(x), dtype=x.dtype)
    for _ in range(iters):
        u = u / u.flatten(1).norm(dim=1).view(-1, 1, 1)
        _, ju = torch.func.jvp(f, (x,), (u,))
        best = torch.maximum(best, ju.flatten(1).norm(dim=1))
        u, = torch.func.vjp(f, x)[1](ju)
    return best


@pytest.mark.parametrize("kind", ["random", "trained"])  # (at init W_o = 0: both sides vanish)
@pytest.mark.parametrize("last_only", [False, True], ids=["all_positions", "last_position"])
def test_the_attention_jacobian_bound_holds_and_is_at_most_the_ball_bound_at_zero(kind, last_only):
    model = checkpoint(GPT, kind).double()
    x = model.project_to_domain(inputs(model, GPT).double())
    restrict = lc.last_query if last_only else (lambda rec: rec)
    zero = torch.zeros(len(x), dtype=torch.float64)
    for block in model.blocks:
        rec = restrict(attention_at(block.attn, x)[1])
        bound = attention_jacobian_norm(rec)
        found = power_iteration_norm(lambda t: attention_at(block.attn, t)[0][:, -1:] if last_only
                                     else attention_at(block.attn, t)[0], x)
        assert bool((found <= bound * (1 + 1e-9)).all()), (found, bound)
        assert bool((bound <= attention_bounds(rec, zero)[0] * (1 + 1e-9)).all())
        x = block(x)


@pytest.mark.parametrize("cfg", [GPT, MLP], ids=["lipschitz_gpt", "mlp"])
@pytest.mark.parametrize("kind", ["random", "trained"])
def test_the_propagated_radius_bounds_how_far_the_scored_features_move(cfg, kind):
    """ρ_K ≥ ‖features(x + δ) − features(x)‖ for ascent on that distance and random draws in the ball."""
    model = checkpoint(cfg, kind)
    x = inputs(model, cfg).double()
    cert, _, _ = certificate_at(model, cfg, x.float())
    local = lc.local_model(model)

    def features(t):
        return local.body(local.prepare(t))[0]

    for eps in (0.01, 0.3):
        radius = lc.propagate(cert.layers, cert.nominal_lips, torch.full((len(x),), eps, dtype=torch.float64)).radius
        moved = eps * lipschitz_ascent(features, x, eps, steps=10, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            draws = [(features(x + _random_in_ball(x.shape, torch.tensor(eps), torch.Generator().manual_seed(s)))
                      - features(x)).norm(dim=1) for s in range(8)]
        assert bool((moved <= radius * (1 + 1e-9)).all()), (eps, moved, radius)
        assert bool((torch.stack(draws).max(0).values <= radius * (1 + 1e-9)).all())


@pytest.mark.parametrize("with_output", [False, True], ids=["gelu", "mlp_block"])
def test_the_readout_curvature_bounds_the_second_order_remainder_of_a_gelu_layer(with_output):
    """|wᵀ(f(x+Δ) − f(x) − Df(x)Δ)| ≤ ½κ(w)‖Δ‖² for f = W_out·s·GELU(W_in·), and κ(w) ≤ ‖w‖·β."""
    g = torch.Generator().manual_seed(8)
    w_in = torch.randn(48, 16, generator=g, dtype=torch.float64) * 0.8
    w_out = torch.randn(16, 48, generator=g, dtype=torch.float64) * 0.3 if with_output else None
    layer = lc.gelu_layer(1.5, w_in, w_out)

    def f(t):
        h = 1.5 * torch.nn.functional.gelu(t @ w_in.T)
        return h if w_out is None else h @ w_out.T

    x = torch.randn(64, 16, generator=g, dtype=torch.float64) * 2
    sizes = torch.logspace(-2, 0.5, 64, dtype=torch.float64)[:, None]
    delta = torch.randn(64, 16, generator=g, dtype=torch.float64) * sizes
    readout = torch.randn(64, w_in.shape[0] if w_out is None else 16, generator=g, dtype=torch.float64)
    linear = torch.func.jvp(f, (x,), (delta,))[1]
    remainder = (readout * (f(x + delta) - f(x) - linear)).sum(-1).abs()
    kappa = layer.readout_curvature(readout)
    assert bool((remainder <= 0.5 * kappa * delta.pow(2).sum(-1) * (1 + 1e-9)).all())
    assert bool((remainder >= 0.01 * 0.5 * kappa * delta.pow(2).sum(-1)).any())  # not vacuous
    zero = torch.zeros(1, dtype=torch.float64)
    assert bool((kappa <= readout.norm(dim=-1) * layer.bounds(zero)[1] * (1 + 1e-9)).all())


def test_the_readout_curvature_is_reached_at_the_curvature_peak():
    """At h = 0 (max GELU'') along W_in's top singular vector with every readout weight 1, the
    remainder tends to ½κ‖Δ‖²: the constant is attained, not just an upper bound."""
    w_in = torch.randn(48, 16, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    layer = lc.gelu_layer(1.5, w_in, None)
    top = torch.linalg.svd(w_in).Vh[0]
    delta = 1e-3 * top[None]
    x = torch.zeros_like(delta)

    def f(t):
        return 1.5 * torch.nn.functional.gelu(t @ w_in.T)

    remainder = (f(x + delta) - f(x) - torch.func.jvp(f, (x,), (delta,))[1]).sum(-1)
    bound = 0.5 * layer.readout_curvature(torch.ones(1, 48, dtype=torch.float64)) * delta.pow(2).sum(-1)
    assert float(remainder / bound) == pytest.approx(1.0, abs=1e-3)


# --- mutation-testing additions ---------------------------------------------------------------------

def constant_layer(lip, curv, per_token=True):
    """A hand-built SmoothLayer with L(r) = lip and β(r) = curv on every ball."""
    return lc.SmoothLayer(lambda r: (torch.full_like(r, lip), torch.full_like(r, curv)), per_token)


def test_propagated_radius_takes_the_smaller_of_mean_value_and_taylor():
    """ρ_1 = min(L(ε)·ε, L(0)·ε + ½β·ε²): L(ε) = 3, L(0) = 1, β = 2 at ε = 0.1 gives
    min(0.3, 0.1 + 0.01) = 0.11 (Taylor), at ε = 2 gives min(6, 2 + 4) = 6 (mean value)."""
    layer = constant_layer(3.0, 2.0)
    eps = torch.tensor([0.1, 2.0], dtype=torch.float64)
    out = lc.propagate([layer], torch.ones(1, 2, dtype=torch.float64), eps)
    assert torch.allclose(out.radius, torch.tensor([0.11, 6.0], dtype=torch.float64))
    assert torch.allclose(out.remainders[0], 0.5 * 2.0 * eps ** 2)


def test_residual_layer_scales_the_branch_lipschitz_and_curvature_by_its_weight():
    """x ↦ keep·x + weight·F(x): L = keep + weight·L_F and β = weight·β_F (keep·x has no curvature)."""
    layer = lc.residual_layer(0.5, 0.25, constant_layer(2.0, 3.0))
    lip, curv = layer.bounds(torch.tensor([0.1, 1.0], dtype=torch.float64))
    assert torch.allclose(lip, torch.full((2,), 1.0, dtype=torch.float64))
    assert torch.allclose(curv, torch.full((2,), 0.75, dtype=torch.float64))


def test_residual_curvature_bounds_a_scalar_residual_gelu_by_finite_differences():
    """For f(x) = x + w·GELU(x) (scalar), |f''| = w·|GELU''| ≤ w·max|GELU''|, and the residual
    layer's β equals that peak (reached at x = 0), not the unweighted branch curvature."""
    w = 0.2
    branch = lc.gelu_layer(1.0, torch.ones(1, 1), None)
    layer = lc.residual_layer(1.0, w, branch)
    beta = float(layer.bounds(torch.zeros(1, dtype=torch.float64))[1])
    x = torch.linspace(-4, 4, 801, dtype=torch.float64)
    h = 1e-3
    f = lambda t: t + w * torch.nn.functional.gelu(t)
    second = (f(x + h) - 2 * f(x) + f(x - h)) / h ** 2
    assert second.abs().max() <= beta * (1 + 1e-4)
    assert second.abs().max() == pytest.approx(beta, rel=1e-3)


# ---- attention's local constants against a loop-by-loop evaluation of their documented formulas (mutation round 3)

def _small_attention(seed=0, d_model=8, n_heads=2, context=5, gain=1.5):
    """A LipschitzAttention (float64) with random weights of σ_max ``gain`` and its record at a random input."""
    from lipflow.model.lipschitz_gpt import LipschitzAttention

    torch.manual_seed(seed)
    attn = LipschitzAttention(d_model, n_heads, context, attn_scale=2.0).double()
    with torch.no_grad():
        for m in (attn.q, attn.k, attn.v, attn.o):
            m.weight.normal_().mul_(gain / torch.linalg.matrix_norm(m.weight, 2))
    x = torch.randn(2, context, d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    return attn, x


def _spec_attention_bounds(rec, r):
    """attention_bounds' docstring evaluated entry by entry with Python floats: (L, β) per batch row."""
    import math

    c = rec.score_scale
    B, H, T, S = rec.probs.shape
    off = S - T  # query t (of the last T) sees keys s ≤ t + off
    wq, wk, wv = rec.sigma_whole
    lips, curvs = [], []
    for b in range(B):
        rb = float(r[b])
        heads = []
        for h in range(H):
            sq, sk, sv = (float(s[h]) for s in (rec.sigma_q, rec.sigma_k, rec.sigma_v))
            seen = [list(range(t + off + 1)) for t in range(T)]
            qn = [float(rec.q[b, h, t].norm()) for t in range(T)]
            bq = [qn[t] + sq * rb for t in range(T)]
            kh = [{s: float(rec.k_spread[b, h, t, s]) + sk * rb for s in seen[t]} for t in range(T)]
            vh = [{s: float(rec.v_spread[b, h, t, s]) + sv * rb for s in seen[t]} for t in range(T)]
            kmax = [max(kh[t].values()) for t in range(T)]
            delta = [c * rb * (sq * kmax[t] + sk * qn[t]) for t in range(T)]
            ph = [{s: min(1.0, float(rec.probs[b, h, t, s]) * math.exp(2 * delta[t])) for s in seen[t]}
                  for t in range(T)]

            def col_max(w):
                return max(sum(w[t] * ph[t].get(s, 0.0) for t in range(T)) for s in range(S))

            C = col_max([1.0] * T)
            S2 = [min(sum(ph[t][s] * vh[t][s] ** 2 for s in seen[t]), max(v ** 2 for v in vh[t].values()))
                  for t in range(T)]
            K2 = [min(sum(ph[t][s] * kh[t][s] ** 2 for s in seen[t]), kmax[t] ** 2) for t in range(T)]
            M = [sq * kmax[t] + sk * bq[t] for t in range(T)]
            lq, lk = max(S2[t] * K2[t] for t in range(T)), col_max([S2[t] * bq[t] ** 2 for t in range(T)])
            bqc, bkc = max(K2), col_max([bq[t] ** 2 for t in range(T)])
            heads.append(dict(
                lip=[sv * math.sqrt(C), c * math.sqrt(2 * sq ** 2 * lq + 2 * sk ** 2 * lk)],
                curv=[2 * math.sqrt(2) * c * sv * math.sqrt(sq ** 2 * bqc + sk ** 2 * bkc),
                      2 * c * sq * sk * math.sqrt(max(S2)),
                      2 * math.sqrt(2) * c * c * math.sqrt(
                          sq ** 2 * max(M[t] ** 2 * K2[t] * S2[t] for t in range(T))
                          + sk ** 2 * col_max([M[t] ** 2 * bq[t] ** 2 * S2[t] for t in range(T)]))],
                C=C, lq=lq, lk=lk, bqc=bqc, bkc=bkc, smax=math.sqrt(max(S2))))
        mx = {key: max(hd[key] for hd in heads) for key in ("C", "lq", "lk", "bqc", "bkc", "smax")}
        lips.append(_spec_across_heads(
            [hd["lip"] for hd in heads],
            [wv * math.sqrt(mx["C"]), c * math.sqrt(2 * wq ** 2 * mx["lq"] + 2 * wk ** 2 * mx["lk"])]))
        curvs.append(_spec_across_heads(
            [hd["curv"] for hd in heads],
            [2 * math.sqrt(2) * c * wv * math.sqrt(wq ** 2 * mx["bqc"] + wk ** 2 * mx["bkc"]),
             2 * c * wq * wk * mx["smax"], None]))
    return [rec.out_norm * v for v in lips], [rec.out_norm * v for v in curvs]


def _spec_across_heads(per_head_terms, whole):
    """min(‖(Σ_i term_i,h)_h‖₂, Σ_i min(‖(term_i,h)_h‖₂, whole_i)) for one batch row."""
    import math

    together = math.sqrt(sum(sum(terms) ** 2 for terms in per_head_terms))
    apart = 0.0
    for i, w in enumerate(whole):
        stacked = math.sqrt(sum(terms[i] ** 2 for terms in per_head_terms))
        apart += stacked if w is None else min(stacked, w)
    return min(together, apart)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("last_only", [False, True], ids=["all_positions", "last_position"])
def test_attention_bounds_evaluate_their_documented_formulas(seed, last_only):
    """(L, β) on balls of several radii equal a loop-by-loop evaluation of the docstring's formulas
    (Q_t, k̂, v̂, Δ_t, P̂ = min(1, P·e^{2Δ}), C, S_t², K_t², M_t and the heads combined by across_heads)."""
    attn, x = _small_attention(seed)
    rec = attention_at(attn, x)[1]
    if last_only:
        rec = lc.last_query(rec)
    for radius in (0.0, 0.05, 0.7):
        r = torch.tensor([radius, 2.0 * radius + 0.1], dtype=torch.float64)
        lip, curv = attention_bounds(rec, r)
        want_lip, want_curv = _spec_attention_bounds(rec, r)
        assert torch.allclose(lip, torch.tensor(want_lip, dtype=torch.float64), rtol=1e-10), (radius, lip, want_lip)
        assert torch.allclose(curv, torch.tensor(want_curv, dtype=torch.float64), rtol=1e-10), (radius, curv, want_curv)


def test_across_heads_is_the_smaller_of_the_stacked_sum_and_the_termwise_minkowski_sum():
    per_head = [torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[0.0, 0.0], [2.0, 2.0]])]
    # row 0: together ‖(3, 4)‖ = 5; apart min(5, 4.5) + 0 = 4.5 → 4.5
    # row 1: together ‖(3, 2)‖ = √13 ≈ 3.606; apart min(1, 9) + ‖(2, 2)‖ = 1 + 2√2 ≈ 3.828 → √13
    got = across_heads(per_head, [torch.tensor([4.5, 9.0]), None])
    assert torch.allclose(got, torch.tensor([4.5, 13.0 ** 0.5]))
    for b in range(2):
        want = _spec_across_heads([[float(t[b, h]) for t in per_head] for h in range(2)], [[4.5, 9.0][b], None])
        assert abs(float(got[b]) - want) < 1e-6


def test_attention_records_hold_each_key_and_values_distance_to_the_attended_mean():
    attn, x = _small_attention(3)
    rec = attention_at(attn, x)[1]
    for points, spread in ((rec.k, rec.k_spread), (rec.v, rec.v_spread)):
        mean = torch.einsum("bhts,bhsd->bhtd", rec.probs, points)
        want = (points[:, :, None, :, :] - mean[:, :, :, None, :]).norm(dim=-1)  # (B, H, t, s)
        assert torch.allclose(spread, want, atol=1e-9)


def test_attention_jacobian_bound_is_exact_when_the_scores_are_constant():
    """With W_q = 0 the scores vanish (uniform causal P, independent of the input) and W_o = I: the
    layer is x ↦ scale·P X W_vᵀ, whose Jacobian's norm ‖P‖₂·σ_max(W_v)·scale (autograd) the bound equals."""
    attn, x = _small_attention(4)
    with torch.no_grad():
        attn.q.weight.zero_()
        attn.o.weight.copy_(torch.eye(attn.o.weight.shape[0], dtype=torch.float64))
    rec = attention_at(attn, x)[1]
    bound = attention_jacobian_norm(rec)
    for b in range(len(x)):
        jac = torch.autograd.functional.jacobian(lambda t: attention_at(attn, t[None])[0][0], x[b])
        exact = torch.linalg.matrix_norm(jac.reshape(x[b].numel(), x[b].numel()), 2)
        assert torch.allclose(bound[b], exact, rtol=1e-9), (bound, exact)


def _spec_attention_jacobian_norm(rec):
    """attention_jacobian_norm's docstring with explicit loops: per head ‖P‖₂·σ_v and
    σ_q·c·max_t ‖Σ_s P_ts (v_s − v̄_t)(k_s − k̄_t)ᵀ‖₂ + σ_k·‖(c·P_ts‖v_s − v̄_t‖‖q_t‖)_ts‖₂."""
    c = rec.score_scale
    B, H, T, S = rec.probs.shape
    wq, wk, wv = rec.sigma_whole
    out = []
    for b in range(B):
        terms = []
        for h in range(H):
            P, k, v, q = rec.probs[b, h], rec.k[b, h], rec.v[b, h], rec.q[b, h]
            cov = 0.0
            n = torch.zeros(T, S, dtype=torch.float64)
            for t in range(T):
                kbar, vbar = P[t] @ k, P[t] @ v
                m = sum(P[t, s] * torch.outer(v[s] - vbar, k[s] - kbar) for s in range(S))
                cov = max(cov, c * float(torch.linalg.matrix_norm(m, 2)))
                for s in range(S):
                    n[t, s] = c * P[t, s] * (v[s] - vbar).norm() * q[t].norm()
            terms.append((float(torch.linalg.matrix_norm(P, 2)), cov, float(torch.linalg.matrix_norm(n, 2))))
        per_head = [[float(rec.sigma_v[h]) * m, float(rec.sigma_q[h]) * cv + float(rec.sigma_k[h]) * rk]
                    for h, (m, cv, rk) in enumerate(terms)]
        whole = [wv * max(t[0] for t in terms), wq * max(t[1] for t in terms) + wk * max(t[2] for t in terms)]
        out.append(rec.out_norm * _spec_across_heads(per_head, whole))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("last_only", [False, True], ids=["all_positions", "last_position"])
def test_attention_jacobian_bound_evaluates_its_documented_operators(last_only):
    attn, x = _small_attention(5)
    rec = attention_at(attn, x)[1]
    if last_only:
        rec = lc.last_query(rec)
    assert torch.allclose(attention_jacobian_norm(rec), _spec_attention_jacobian_norm(rec), rtol=1e-9)


@pytest.fixture(params=[False, True], ids=["denormals", "flush_denormal"])
def denormal_mode(request):
    """Both floating-point modes: denormals kept (the default) and flushed to zero (torch.set_flush_denormal,
    FTZ/DAZ, where the least subnormal floor of P̂ reads as 0)."""
    if request.param and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        yield request.param
    finally:
        torch.set_flush_denormal(False)


def test_sharp_attention_whose_probabilities_underflow_gives_finite_sound_drops_never_above_the_global_one(denormal_mode):
    """Nominal attention probabilities that underflow to exactly 0 (sharp attention: q, k × 60) met
    e^{2Δ} = inf in P̂ = min(1, P·e^{2Δ}) as 0·inf = NaN, and the NaN passed through every minimum:
    the margin drop was NaN instead of at most the global √2·L·ε (tightness_local rows NaN, the
    local radius 0 where the global one certifies). P̂ now floors P at the least subnormal."""
    model = checkpoint(GPT, "random")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".attn.q." in name or ".attn.k." in name:
                p.mul_(60.0)
    x = inputs(model, GPT, n=16)
    cert, logits, labels = certificate_at(model, GPT, x)
    assert any(bool((rec.probs == 0).any()) for rec in _attention_records(model, x))  # the case at hand
    for eps in (1e-3, 0.1, 10.0):
        epsilon = torch.full((x.shape[0],), eps, dtype=torch.float64)
        drop = cert.margin_drop(epsilon)
        assert bool(torch.isfinite(drop).all()), eps
        assert bool((drop <= 2 ** 0.5 * model.lipschitz_bound_l2() * eps * (1 + 1e-9)).all()), eps
    global_radius = certified_radius(logits, labels, model.lipschitz_bound_l2())
    assert bool((cert.radius() >= global_radius * (1 - 1e-6)).all())


def _attention_records(model, x):
    """Each block's attention record at the nominal input (as the certificate's body computes them)."""
    records, h = [], model.project_to_domain(x.double())
    for block in model.blocks:
        y, rec = attention_at(block.attn, h)
        records.append(rec)
        h = block.keep * h + block.weight * y
        mlp = block.mlp
        h = block.keep * h + block.weight * mlp.output_scale * (
            mlp.act.base(h @ mlp.up.weight.detach().double().T) @ mlp.down.weight.detach().double().T)
    return records
