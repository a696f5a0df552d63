"""Robustness against brute force on position-wise linear and ReLU models whose Lipschitz constants
are known: f(x)_t = W x_t has L = σ_max(W), and the distance to the decision boundary is exact."""

import math

import pytest
import torch
from torch import nn

from lipflow.config import evaluation_params, run_defaults
from lipflow.evaluation import EVALUATIONS, EvalContext
from lipflow.evaluation.robustness import (OBJECTIVES, certified_accuracy, certified_radius, greedy_substitution,
                                           half_certified_epsilon, lipschitz_ascent, pgd_l2, random_substitution)
from lipflow.model import build_model
from lipflow.model.base import LanguageModel


class PositionwiseNet(LanguageModel):
    """Logits_t = W₂ relu(W₁ x_t) (or W x_t without a hidden layer); certificate ∏ σ_max(Wᵢ),
    which is exact for the linear case since the map is block diagonal over positions."""

    def __init__(self, vocab=6, d=5, hidden=None, context=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.vocab_size, self.context = vocab, context
        self.tok = nn.Parameter(torch.randn(vocab, d, generator=g))
        dims = [d, hidden, vocab] if hidden else [d, vocab]
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(o, i, generator=g) / math.sqrt(i))
                                        for i, o in zip(dims[:-1], dims[1:]))

    def embed(self, idx):
        return self.tok[idx]

    def forward_embedded(self, x):
        for i, w in enumerate(self.weights):
            x = x @ w.T if i == 0 else torch.relu(x) @ w.T
        return x

    def lipschitz_bound_l2(self):
        return math.prod(torch.linalg.matrix_norm(w.detach(), 2).item() for w in self.weights)


def predictions(model, n=40, seed=1):
    idx = torch.randint(0, model.vocab_size, (n, model.context), generator=torch.Generator().manual_seed(seed))
    x = model.embed(idx).detach()
    logits = model.forward_embedded(x)[:, -1].detach()
    return idx, x, logits, logits.argmax(1)


def last(model):
    return lambda x: model.forward_embedded(x)[:, -1]


def exact_boundary_distance(model, logits, labels):
    """min_{j≠y} (z_y − z_j) / ‖w_y − w_j‖₂ for a linear model."""
    w = model.weights[0].detach()
    gaps = (logits.gather(1, labels[:, None]) - logits) / (w[labels][:, None, :] - w[None]).norm(dim=2)
    return gaps.scatter(1, labels[:, None], float("inf")).min(dim=1).values


def flipped(model, x, delta, labels):
    return last(model)(x + delta).argmax(1) != labels


def test_pgd_finds_the_exact_boundary_of_a_linear_model_and_the_certificate_is_below_it():
    model = PositionwiseNet()
    _, x, logits, labels = predictions(model)
    distance = exact_boundary_distance(model, logits, labels)
    radius = certified_radius(logits, labels, model.lipschitz_bound_l2())
    assert torch.all(radius > 0) and torch.all(radius <= distance * (1 + 1e-5))
    g = torch.Generator().manual_seed(0)
    inside = pgd_l2(last(model), x, labels, 0.98 * distance, steps=30, restarts=2, generator=g)
    outside = pgd_l2(last(model), x, labels, 1.02 * distance, steps=30, restarts=2, generator=g)
    assert inside.flatten(1).norm(dim=1).max() <= (0.98 * distance).max() * (1 + 1e-5)
    assert not flipped(model, x, inside, labels).any()
    assert flipped(model, x, outside, labels).all()


def test_the_certified_radius_is_exact_when_the_class_rows_are_opposite():
    # W = [v; −v]: σ_max = √2‖v‖ and ‖w_0 − w_1‖ = 2‖v‖ = √2·σ_max, so m/(√2 L) is the exact distance
    model = PositionwiseNet(vocab=2, d=5, seed=6)
    with torch.no_grad():
        model.weights[0].copy_(torch.stack([model.weights[0][0], -model.weights[0][0]]))
    _, x, logits, labels = predictions(model, n=20)
    radius = certified_radius(logits, labels, model.lipschitz_bound_l2())
    assert torch.allclose(radius, exact_boundary_distance(model, logits, labels), rtol=1e-5)
    far = pgd_l2(last(model), x, labels, 1.01 * radius, steps=20, generator=torch.Generator().manual_seed(0))
    assert flipped(model, x, far, labels).all()


def test_nothing_flips_inside_the_certified_radius_of_a_relu_model():
    model = PositionwiseNet(hidden=16, seed=2)
    _, x, logits, labels = predictions(model, n=30)
    radius = certified_radius(logits, labels, model.lipschitz_bound_l2())
    eps = 0.999 * radius
    delta = pgd_l2(last(model), x, labels, eps, steps=40, restarts=3, generator=torch.Generator().manual_seed(0))
    assert not flipped(model, x, delta, labels).any()
    g = torch.Generator().manual_seed(1)
    for _ in range(20):  # brute force: random points on the sphere of radius 0.999·r
        direction = torch.randn(x.shape, generator=g)
        direction *= (eps / direction.flatten(1).norm(dim=1))[:, None, None]
        assert not flipped(model, x, direction, labels).any()
    # the same attack does flip predictions at 5× the certified radius: the check above has teeth
    far = pgd_l2(last(model), x, labels, 5 * radius, steps=40, restarts=3, generator=torch.Generator().manual_seed(0))
    assert flipped(model, x, far, labels).sum() >= 5


def test_lipschitz_ascent_recovers_sigma_max():
    model = PositionwiseNet(d=7, vocab=9)
    _, x, _, _ = predictions(model, n=4)
    ratios = lipschitz_ascent(model.forward_embedded, x, 1e-2, 40, torch.Generator().manual_seed(0))
    assert ratios.max().item() == pytest.approx(model.lipschitz_bound_l2(), rel=1e-3)


def test_greedy_substitution_matches_brute_force_and_random_respects_k():
    model = PositionwiseNet(vocab=6, context=3, seed=4)
    idx, _, _, labels = predictions(model, n=5)
    score = lambda t: last(model)(model.embed(t)).detach()  # noqa: E731
    objective = OBJECTIVES.get("margin")
    best = torch.full((5,), -float("inf"))
    for pos in range(3):
        for tok in range(6):
            trial = idx.clone()
            trial[:, pos] = tok
            changed = trial[:, pos] != idx[:, pos]
            best = torch.where(changed, torch.maximum(best, objective(score(trial), labels)), best)
    found = greedy_substitution(score, idx, labels, 1, 200, 6, torch.Generator().manual_seed(0))[0]
    assert torch.allclose(objective(score(found), labels), torch.maximum(best, objective(score(idx), labels)))
    attacked = random_substitution(score, idx, labels, 2, 10, 6, torch.Generator().manual_seed(0))
    assert ((attacked != idx).sum(dim=1) <= 2).all()
    assert torch.all(objective(score(attacked), labels) >= objective(score(idx), labels))


def test_the_sequences_row_counts_the_val_windows_attacked():
    """n_sequences above what the val split holds is cut to it: the rows say how many were used."""
    model = PositionwiseNet()
    for asked, used in ((10, 10), (1000, 16)):
        rows = robustness_rows(model, cfg={"n_sequences": asked, "epsilons": [0.0], "k_values": [], "pgd_steps": 1,
                                           "lipschitz_steps": 1})
        assert value(rows, "sequences") == used


def robustness_rows(model, certificate=None, cfg=None):
    windows = torch.randint(0, model.vocab_size, (16, model.context + 1), generator=torch.Generator().manual_seed(5))
    eval_cfg = evaluation_params("robustness", **{"epsilons": [0.0, 0.3, 1.0], "pgd_steps": 10, "k_values": [1, 2],
                                                  "random_trials": 3, "greedy_candidates": 4, "lipschitz_steps": 10,
                                                  "batch_size": 8, **(cfg or {})})
    ctx = EvalContext(model, lambda count: windows[:count], windows, eval_cfg, {}, None, None, torch.device("cpu"), certificate)
    return EVALUATIONS.get("robustness")(ctx)


def value(rows, metric, **columns):
    return next(r["value"] for r in rows if r["metric"] == metric and all(r.get(k) == v for k, v in columns.items()))


def test_robustness_evaluation_orders_certified_pgd_and_clean_and_stores_the_lower_bound():
    model = PositionwiseNet()
    rows = robustness_rows(model)
    sigma = model.lipschitz_bound_l2()
    assert value(rows, "certificate_l2") == pytest.approx(sigma)
    assert 0.99 * sigma <= value(rows, "lipschitz_lower_bound", attack="all") <= sigma * (1 + 1e-4)
    for eps in (0.0, 0.3, 1.0):
        assert value(rows, "certified_accuracy", epsilon=eps) <= value(rows, "robust_accuracy", attack="pgd",
                                                                        epsilon=eps)
    assert value(rows, "robust_accuracy", attack="pgd", epsilon=0.0) == value(rows, "clean_accuracy")


def test_a_radiuss_pgd_does_not_depend_on_the_other_radii_or_their_order():
    """With random restarts the radii shared one generator, so a radius's PGD rows changed with the radii
    before it: reordering `epsilons` changed numbers (and reran the evaluation). Each radius draws from a
    stream of its own now, and the config takes the list sorted."""
    model = PositionwiseNet(hidden=8)
    windows = torch.randint(0, model.vocab_size, (16, model.context + 1), generator=torch.Generator().manual_seed(5))
    params = evaluation_params("robustness", pgd_restarts=4, pgd_steps=3, k_values=[], lipschitz_steps=1,
                               epsilons=[1.0, 0.3])
    assert params["epsilons"] == [0.3, 1.0] and evaluation_params("robustness", k_values=[4, 1])["k_values"] == [1, 4]

    def pgd_rows(epsilons: list[float]) -> dict:
        ctx = EvalContext(model, lambda count: windows[:count], windows, {**params, "epsilons": epsilons}, {}, None,
                          None, torch.device("cpu"), None)
        return {(r["metric"], r["epsilon"]): r["value"] for r in EVALUATIONS.get("robustness")(ctx)
                if r.get("attack") == "pgd" and r["metric"] in ("robust_loss", "robust_accuracy")}

    both = pgd_rows([0.3, 1.0])
    assert pgd_rows([1.0, 0.3]) == both
    assert pgd_rows([1.0]) == {key: v for key, v in both.items() if key[1] == 1.0}


def test_a_certificate_below_the_measured_lower_bound_raises():
    model = PositionwiseNet()
    sigma = model.lipschitz_bound_l2()
    model.lipschitz_bound_l2 = None  # fall back to the context's (deliberately wrong) certificate
    with pytest.raises(RuntimeError, match="exceeds certificate .*: this is a bug"):
        robustness_rows(model, certificate=0.5 * sigma)


def test_robustness_evaluation_on_a_tiny_gpt_without_certificate():
    cfg = run_defaults(model="gpt", d_model=16, n_layers=1, n_heads=2, context=6, mlp_ratio=2)
    torch.manual_seed(0)
    model = build_model(cfg, 12)
    rows = robustness_rows(model, cfg={"epsilons": [0.0, 2.0], "pgd_steps": 5, "lipschitz_steps": 3})
    assert not [r for r in rows if r["metric"].startswith("certified")]
    clean = value(rows, "clean_accuracy")
    assert value(rows, "robust_accuracy", attack="pgd", epsilon=2.0) <= clean
    assert value(rows, "robust_accuracy", attack="greedy", k=2) <= value(rows, "robust_accuracy", attack="greedy", k=1)
    assert value(rows, "robust_loss", attack="pgd", epsilon=2.0) >= value(rows, "clean_loss")
    assert value(rows, "lipschitz_lower_bound", attack="all") > 0


def test_image_mlp_study_and_cli(tmp_path, capsys):
    import json
    import re

    import pyarrow.parquet as pq

    from lipflow.config import check_config
    from lipflow.studies import image_mlp

    tiny = {"width": 32, "steps": 40, "eval_every": 20, "batch_size": 64, "epsilons": [0.0, 0.3], "pgd_steps": 5,
            "seeds": 2}
    config = {"image_mlp": tiny}
    check_config(config)  # the schema fills the rest (seed, n_layers, methods, …)
    out = tmp_path / "digits.parquet"
    assert image_mlp.main(["--config-json", json.dumps(config["image_mlp"]), "--out", str(out)]) == 0
    table = pq.read_table(out)
    assert table.schema.names == list(image_mlp.COLUMNS)
    all_rows = table.to_pylist()
    # a line per seed and method trained, in the config's order, with its best val accuracy and the seconds so far
    methods = list(config["image_mlp"]["methods"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * len(methods) and len(methods) >= 2
    trained = [(seed, method) for seed in (0, 1) for method in methods]
    for number, (line, (seed, method)) in enumerate(zip(lines, trained), 1):
        match = re.fullmatch(rf"image_mlp: {method} trained at seed {seed}, best val accuracy ([\d.]+) "
                             rf"\({number} of {len(trained)}\) \([\d.]+ s\)", line)
        assert match, line
        mine = [r for r in all_rows if r["method"] == method and r["seed"] == seed]
        assert float(match.group(1)) >= max(value(mine, "val_accuracy"), value(mine, "final_val_accuracy")) - 5e-5
    # each seed is the study run at that seed alone: its own split, init, batches, attacks and matched target
    alone = tmp_path / "seed1.parquet"
    assert image_mlp.main(["--config-json", json.dumps({**tiny, "seed": 1, "seeds": 1}), "--out", str(alone)]) == 0
    assert pq.read_table(alone).to_pylist() == [r for r in all_rows if r["seed"] == 1]
    assert [r["value"] for r in all_rows if r["seed"] == 0] != [r["value"] for r in all_rows if r["seed"] == 1]
    rows = [r for r in all_rows if r["seed"] == 0]
    best = {}
    for line, (seed, method) in zip(lines, trained):
        if seed == 0:
            best[method] = float(re.search(r"best val accuracy ([\d.]+)", line).group(1))
    # the methods are matched at the lowest best accuracy: the weakest method's own best
    assert min(best.values()) == pytest.approx(min(value([r for r in rows if r["method"] == m], "val_accuracy")
                                                   for m in methods), abs=5e-5)
    for method in ("muon_soft_cap", "adamw_weight_decay"):
        mine = [r for r in rows if r["method"] == method]
        clean = value(mine, "clean_accuracy")
        assert value(mine, "robust_accuracy", epsilon=0.0) == clean
        assert value(mine, "certified_accuracy", epsilon=0.3) <= value(mine, "robust_accuracy", epsilon=0.3) <= clean
        assert value(mine, "lipschitz_lower_bound") <= value(mine, "certificate_l2") * (1 + 1e-4)
    # soft cap keeps every RMS→RMS norm ≤ σmax = 3: L ≤ 3³·√(32/64)·√(32/32)·√(10/32)
    cap = 27 * math.sqrt(32 / 64) * math.sqrt(10 / 32)
    assert value([r for r in rows if r["method"] == "muon_soft_cap"], "certificate_l2") <= cap * 1.01
    assert {r["metric"] for r in rows} >= {"matched_step", "val_accuracy", "robust_true_class_probability"}


def test_robustness_evaluation_reports_the_local_certificate_beside_the_global_one():
    cfg = run_defaults(model="lipschitz_gpt", d_model=16, n_layers=2, n_heads=2, context=6)
    torch.manual_seed(0)
    model = build_model(cfg, 12)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and not name.startswith("tok"):
                p.normal_().mul_(2.0 / torch.linalg.matrix_norm(p, 2))
    epsilons = [0.0, 0.01, 0.1, 1.0]
    rows = robustness_rows(model, cfg={"epsilons": epsilons, "k_values": []})
    clean = value(rows, "clean_accuracy")
    assert value(rows, "certified_accuracy_local", epsilon=0.0) == clean
    for eps in epsilons:
        local = value(rows, "certified_accuracy_local", epsilon=eps)
        assert value(rows, "certified_accuracy", epsilon=eps) <= local
        assert local <= value(rows, "robust_accuracy", attack="pgd", epsilon=eps)
    assert value(rows, "certified_radius_local_median") >= value(rows, "certified_radius_median")
    for eps in epsilons[1:]:  # the local bound is below the global one and above every attack
        assert value(rows, "tightness_global", attack="pgd", epsilon=eps) <= \
            value(rows, "tightness_local", attack="pgd", epsilon=eps) <= 1 + 1e-4
    half = value(rows, "half_certified_epsilon")
    assert 0 <= value(rows, "within_100x_local", attack="pgd_half_certified", epsilon=half) <= 1
    assert value(rows, "tightness_local", attack="pgd_half_certified", epsilon=half) <= 1 + 1e-4


def test_half_certified_epsilon_halves_the_certified_accuracy():
    radius = torch.tensor([0.5, 0.4, 0.3, 0.2, 0.0, 0.0, 0.0, 0.0])
    eps = half_certified_epsilon(radius, clean_accuracy=0.5)
    assert eps == pytest.approx(0.3) and certified_accuracy(radius, eps) == 0.25


def test_half_certified_epsilon_halves_a_float32_accuracy_that_rounds_down():
    """14 of 20 correct is 0.69999999 in float32 (the evaluation's mean): ⌊20·0.69999999/2⌋ was 6, so the ε
    certified 6 of 20 (30 %), not half of the 70 % clean accuracy."""
    radius = torch.tensor([1.0 - i / 20 for i in range(14)] + [0.0] * 6)
    clean = float((torch.arange(20) < 14).float().mean())
    eps = half_certified_epsilon(radius, clean_accuracy=clean)
    assert certified_accuracy(radius, eps) == pytest.approx(clean / 2)


# --- mutation-testing additions ---------------------------------------------------------------------

from lipflow.evaluation import robustness as robustness_module  # noqa: E402
from lipflow.evaluation.robustness import _random_in_ball, check_lower_bound, tightness_rows  # noqa: E402


def linear_two_class(seed=0, n=3, d=4):
    """score(x) = x Wᵀ with 2 classes: the margin objective is linear, its worst δ in the ε-ball is
    ε·(w_j − w_y)/‖w_j − w_y‖ and raises it by exactly ‖w_j − w_y‖·ε."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(2, d, generator=g)
    x = torch.randn(n, d, generator=g)
    labels = (x @ w.T).argmax(1)
    return w, x, labels


def test_pgd_takes_normalized_steps_of_two_and_a_half_epsilon_over_steps():
    """Restart 0 of ℓ2 PGD on a linear objective walks a straight line from δ = 0 in steps of
    2.5ε/steps, projected onto the ε-ball: iterate norms are min(i·2.5ε/steps, ε), i = 0..steps."""
    w, x, labels = linear_two_class()
    eps, steps, seen = 0.8, 10, []

    def score(z):
        seen.append((z - x).detach().flatten(1).norm(dim=1))
        return z @ w.T

    pgd_l2(score, x, labels, eps, steps=steps, restarts=1)
    norms = torch.stack(seen[1:])  # seen[0] is the clean forward
    expected = torch.tensor([min(i * 2.5 * eps / steps, eps) for i in range(steps + 1)])
    assert norms.shape[0] == steps + 1
    assert torch.allclose(norms, expected[:, None].expand_as(norms), atol=1e-5)


def test_pgd_with_one_step_scores_its_last_iterate_and_finds_the_linear_optimum():
    """steps=1 is one gradient step to the ε-sphere; that iterate must be scored, so PGD returns the
    exact optimum ε·(w_j − w_y)/‖w_j − w_y‖ of a linear margin (not δ = 0)."""
    w, x, labels = linear_two_class(seed=1)
    eps = 0.3
    delta = pgd_l2(lambda z: z @ w.T, x, labels, eps, steps=1, restarts=1)
    direction = w[1 - labels] - w[labels]
    optimum = eps * direction / direction.norm(dim=1, keepdim=True)
    assert torch.allclose(delta, optimum, atol=1e-5)


def test_random_restarts_are_uniform_in_the_ball():
    """Uniform in the D-dimensional ball of radius ε: P(‖δ‖ ≤ rε) = r^D and E‖δ‖ = ε·D/(D+1)."""
    g = torch.Generator().manual_seed(0)
    n, eps = 4000, 2.0
    flat = _random_in_ball(torch.Size([n, 2]), torch.full((n, 1), eps), g).norm(dim=1)
    assert flat.max() <= eps * (1 + 1e-6)
    assert abs(float((flat <= eps / 2).double().mean()) - 0.25) < 0.04
    deep = _random_in_ball(torch.Size([n, 3, 2]), torch.full((n, 1, 1), eps), g).flatten(1).norm(dim=1)
    assert float(deep.mean()) / eps == pytest.approx(6 / 7, abs=0.02)


def token_scorer(vocab, T, seed=0):
    """A fixed random linear function of the one-hot tokens (2 classes), recording every batch it scores."""
    w = torch.randn(T * vocab, 2, generator=torch.Generator().manual_seed(seed))
    calls = []

    def score(tokens):
        calls.append(tokens.clone())
        return torch.nn.functional.one_hot(tokens, vocab).float().flatten(1) @ w
    return score, calls


def test_random_substitution_changes_exactly_k_tokens_in_every_trial():
    """Each trial sets k distinct positions to *different* tokens: every candidate differs from the
    input in exactly k positions (vocabulary 2, where a zero shift would keep the token)."""
    vocab, T, k = 2, 4, 2
    idx = torch.randint(0, vocab, (6, T), generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(6, dtype=torch.long)
    score, calls = token_scorer(vocab, T)
    random_substitution(score, idx, labels, k, 20, vocab, torch.Generator().manual_seed(2))
    assert len(calls) == 21
    for candidate in calls[1:]:
        assert ((candidate != idx).sum(dim=1) == k).all()


def test_greedy_rounds_change_one_new_position_each():
    """Round r of greedy substitution tries single substitutions at untouched positions with a
    different token, so every trial of round r differs from the input at exactly r positions
    (vocabulary 2: re-picking a changed position would flip it back; a zero shift changes nothing)."""
    vocab, T, B, candidates = 2, 5, 4, 8
    idx = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(3))
    labels = torch.zeros(B, dtype=torch.long)
    score, calls = token_scorer(vocab, T, seed=4)
    per_budget = greedy_substitution(score, idx, labels, T, candidates, vocab, torch.Generator().manual_seed(5))
    assert len(per_budget) == T and len(calls) == T + 1
    for r, trial in enumerate(calls[1:], start=1):
        changed = (trial.view(B, candidates, T) != idx[:, None, :]).sum(dim=2)
        assert (changed == r).all(), (r, changed)
    for k, worst in enumerate(per_budget, start=1):
        assert ((worst != idx).sum(dim=1) <= k).all()


def test_tightness_global_is_one_for_an_exact_attack_on_opposite_class_rows():
    """The global bound on the margin fall is √2·L·ε (z_y − z_j is √2L-Lipschitz). For W = [v; −v],
    L = √2‖v‖ and the worst δ drops the margin by exactly 2‖v‖ε = √2Lε: tightness_global = 1."""
    v = torch.tensor([3.0, -1.0, 2.0])
    w = torch.stack([v, -v])
    L = float(torch.linalg.matrix_norm(w, 2))
    assert L == pytest.approx(math.sqrt(2) * float(v.norm()), rel=1e-6)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    logits = x @ w.T
    labels = logits.argmax(1)
    eps = 0.7
    direction = w[1 - labels] - w[labels]
    attacked = (x + eps * direction / direction.norm(dim=1, keepdim=True)) @ w.T
    drop = robustness_module.logit_margin(logits, labels) - robustness_module.logit_margin(attacked, labels)
    rows = tightness_rows(drop, eps, None, L, "pgd")
    assert [r["metric"] for r in rows] == ["tightness_global"]
    assert rows[0]["value"] == pytest.approx(1.0, rel=1e-5)


def test_a_ratio_one_percent_above_the_certificate_raises_and_round_off_does_not():
    """Only fp32 round-off (≪ 1 %) may separate a measured ratio from the certificate."""
    with pytest.raises(RuntimeError, match="this is a bug"):
        check_lower_bound(1.01 * 3.0, 3.0)
    check_lower_bound(3.0 * (1 + 1e-6), 3.0)
    check_lower_bound(2.0, None)


class FixedSlopeLocal:
    """A stand-in local certificate: margin fall bound slope·ε, radius 0.5 for every input."""

    def __init__(self, n, slope):
        self.margin, self.slope = torch.ones(n), slope

    def radius(self):
        return torch.full_like(self.margin, 0.5)

    def margin_drop(self, eps):
        return self.slope * eps.double()


def test_within_100x_local_counts_attacks_reaching_a_hundredth_of_the_local_bound(monkeypatch):
    """On a 2-class linear model PGD's margin fall at ε is exactly ‖w_0 − w_1‖ε; with a local bound
    20× that, every input reaches 1/20 ≥ 1/100 of it, so within_100x_local = 1 (and tightness 0.05)."""
    model = PositionwiseNet(vocab=2, d=3)
    gap = float((model.weights[0][0] - model.weights[0][1]).detach().norm())
    monkeypatch.setattr(robustness_module, "local_certificate",
                        lambda m, x, y, cert: FixedSlopeLocal(x.shape[0], 20 * gap))
    rows = robustness_rows(model, cfg={"epsilons": [0.0, 0.3], "k_values": [], "lipschitz_steps": 3})
    half = value(rows, "half_certified_epsilon")
    assert half == pytest.approx(0.5)
    assert value(rows, "tightness_local", attack="pgd_half_certified", epsilon=half) == pytest.approx(0.05, rel=1e-3)
    assert value(rows, "within_100x_local", attack="pgd_half_certified", epsilon=half) == 1.0


# ---- mutation round 4: the image-MLP study's matching and per-model rows on hand-made inputs

def _image_cfg(**extra):
    from lipflow.studies.image_mlp import study_config
    return study_config({"width": 16, "n_layers": 2, "epsilons": [0.0, 0.5], "pgd_steps": 3, "seeds": 1, **extra})


def test_image_mlp_study_matches_each_method_at_its_first_snapshot_reaching_the_lower_best_accuracy(monkeypatch):
    """Best val accuracies 0.9 (a) and 0.8 (b): the target is 0.8; a is taken at its first snapshot ≥ 0.8
    (step 20, not its best at 30 nor its last at 40), b at its best (step 30); final_val_accuracy is the last."""
    from lipflow.studies import image_mlp

    cfg = _image_cfg(methods={"a": {"optimizer": "adamw"}, "b": {"optimizer": "adamw"}})
    weights = build_model(run_defaults(**image_mlp.mlp_config(cfg)), image_mlp.CLASSES).state_dict()
    curves = {"a": [(10, 0.5), (20, 0.85), (30, 0.9), (40, 0.7)], "b": [(10, 0.6), (20, 0.7), (30, 0.8), (40, 0.75)]}
    order = iter(curves)
    monkeypatch.setattr(image_mlp, "train_snapshots",
                        lambda method, cfg, data, seed: [(s, acc, weights) for s, acc in curves[next(order)]])
    monkeypatch.setattr(image_mlp, "robustness_rows", lambda model, split, cfg, seed, **columns: [])
    rows = image_mlp.run_image_mlp_study(cfg)
    got = {(r["method"], r["metric"]): r["value"] for r in rows}
    assert got == {("a", "matched_step"): 20.0, ("a", "val_accuracy"): 0.85, ("a", "final_val_accuracy"): 0.7,
                   ("b", "matched_step"): 30.0, ("b", "val_accuracy"): 0.8, ("b", "final_val_accuracy"): 0.75}


def test_image_mlp_robustness_rows_against_independent_computations():
    """On an untrained MLP and the digits test split: at ε = 0 the true-class probability and loss are the
    clean ones (recomputed here); certified accuracy per ε is the share of certified radii above ε; the
    attack raises the loss at ε = 0.5; the Lipschitz lower bound is positive and below the certificate."""
    import torch.nn.functional as F

    from lipflow.studies import image_mlp

    torch.manual_seed(0)
    model = build_model(run_defaults(**image_mlp.mlp_config(_image_cfg())), image_mlp.CLASSES)
    with torch.no_grad():  # weights large enough for confident, attackable logits
        for weight in model.parameters():
            weight.copy_(torch.randn_like(weight) * 3 / weight.shape[-1] ** 0.5)
    x, y = image_mlp.digits_splits(0)["test"]
    assert 0.0 <= float(x.min()) and float(x.max()) == 1.0  # 16 grey levels scaled to [0, 1]
    with torch.no_grad():
        logits = model(x)
    radius = certified_radius(logits, y, model.lipschitz_bound_l2())
    eps = 0.75 * float(radius[radius > 0].median())  # some radii lie in (ε, 2ε]: certified accuracy depends on ε
    assert float((radius > eps).float().mean()) != float((radius > 2 * eps).float().mean())
    rows = image_mlp.robustness_rows(model, (x, y), _image_cfg(epsilons=[0.0, eps, 0.5]), 0, method="m")
    certificate = value(rows, "certificate_l2")
    assert certificate == pytest.approx(model.lipschitz_bound_l2())
    clean_loss = float(F.cross_entropy(logits, y))
    assert value(rows, "robust_true_class_probability", epsilon=0.0) == pytest.approx(
        float(logits.softmax(1)[torch.arange(len(y)), y].mean()), rel=1e-5)
    assert value(rows, "robust_loss", epsilon=0.0) == pytest.approx(clean_loss, rel=1e-5)
    assert value(rows, "robust_loss", epsilon=0.5) > clean_loss
    for e in (0.0, eps, 0.5):
        assert value(rows, "certified_accuracy", epsilon=e) == pytest.approx(float((radius > e).float().mean()))
    assert 0 < value(rows, "lipschitz_lower_bound") <= certificate * (1 + 1e-4)


def test_image_mlp_snapshots_every_eval_every_steps_and_at_the_last_step():
    from lipflow.studies import image_mlp

    cfg = _image_cfg(steps=3, eval_every=2, batch_size=8)
    data = image_mlp.digits_splits(0)
    snapshots = image_mlp.train_snapshots({"optimizer": "adamw"}, cfg, data, 0)
    assert [step for step, *_ in snapshots] == [2, 3]
    assert all(0.0 <= acc <= 1.0 for _, acc, _ in snapshots)


def test_the_median_radius_is_over_the_correct_predictions():
    """The radius medians are over the correctly predicted inputs (margin > 0): over all inputs, the
    wrong ones at radius 0, a model below 50 % clean accuracy had a median of 0 whatever its radii
    (here 1 correct of 3), and a model with none correct has no median (NaN)."""
    import math

    from lipflow.evaluation.robustness import median_radius_of_correct

    assert median_radius_of_correct(torch.tensor([0.5, 0.0, 0.0]), torch.tensor([1.0, -1.0, -2.0])) == 0.5
    radius = torch.tensor([0.1, 0.3, 0.2, 0.0, 0.0])
    margin = torch.tensor([1.0, 3.0, 2.0, -1.0, 0.0])  # a tie (margin 0) is not a correct prediction
    assert median_radius_of_correct(radius, margin) == pytest.approx(0.2)
    assert math.isnan(median_radius_of_correct(torch.zeros(2), torch.tensor([-1.0, 0.0])))


def test_image_mlp_refuses_a_radius_given_twice_in_one_line():
    """epsilons [0.1, 0.1] wrote every row of ε = 0.1 twice (two PGD runs, possibly different values)."""
    from lipflow.config import ConfigError
    from lipflow.studies.image_mlp import study_config

    with pytest.raises(ConfigError, match=r"^--config-json: .*image_mlp\.epsilons.*non-unique"):
        study_config({"epsilons": [0.1, 0.3, 0.1]})


def test_image_mlp_refuses_a_method_its_soft_cap_cannot_hold_before_any_method_trains(monkeypatch):
    """A method whose steps the soft cap cannot absorb at its lr was refused by build_learner when its turn
    came, after the methods before it had trained (minutes), as "lr: …" without the method's name."""
    from lipflow.config import ConfigError
    from lipflow.studies import image_mlp

    monkeypatch.setattr(image_mlp, "train_snapshots", lambda *args: pytest.fail("a method trained"))
    block = {"width": 16, "methods": {"a": {"optimizer": "adamw"},
                                      "b": {"optimizer": "muon", "weight_constraint": "spectral_soft_cap",
                                            "sigma_max": 1e-30}}}
    with pytest.raises(ConfigError, match=r"^--config-json: image_mlp\.methods\.b\.lr: at lr 0\.003 the optimizer's "
                                          r"steps reach .* more than the soft cap absorbs at sigma_max 1e-30 .*"
                                          r"lower lr to at most .* or raise sigma_max$"):
        image_mlp.run_image_mlp_study(image_mlp.study_config(block))


def test_image_mlp_refuses_a_file_in_its_tables_sidecar_place_before_it_trains(tmp_path, monkeypatch, capsys):
    """A user's file in the place of --out's .sha256 (no table there yet) was refused when the table was
    written, after the minutes of training; it is refused up front (as by every study and ICL command that
    replaces only its own sealed output), naming it, and kept."""
    from lipflow.studies import image_mlp

    monkeypatch.setattr(image_mlp, "run_image_mlp_study", lambda *args: pytest.fail("the study trained"))
    out = tmp_path / "robustness.parquet"
    (tmp_path / "robustness.parquet.sha256").write_text("my notes\n")
    assert image_mlp.main(["--config-json", "{}", "--out", str(out)]) == 2
    assert f"--out {out}.sha256 exists and is not a sha256 checksum" in capsys.readouterr().err
    assert (tmp_path / "robustness.parquet.sha256").read_text() == "my notes\n" and not out.exists()


@pytest.mark.parametrize("n_layers, key, table, roles", [
    (3, "lmo_norms", {"hidden": "spectral", "embed": "sign"}, "hidden, head"),
    (3, "lmo_radius", {"vector": 1.0}, "hidden, head"),
    (1, "lmo_norms", {"head": "sign", "hidden": "spectral"}, "head")])
def test_image_mlp_refuses_a_per_role_table_entry_for_a_role_its_mlp_lacks(n_layers, key, table, roles):
    """The MLP has hidden and head matrices only (a one-layer MLP a head only): a scion method's lmo_norms.embed
    (or lmo_radius.vector, or lmo_norms.hidden at n_layers 1) passed the config and the study's --config-json
    check and was ignored without a word."""
    import yaml

    from lipflow.config import ConfigError, check_config
    from lipflow.config.runs import image_mlp_roles
    from lipflow.studies.image_mlp import mlp_config, study_config

    role = sorted(set(table) - set(roles.split(", ")))[0]
    block = {"n_layers": n_layers, "methods": {"m": {"optimizer": "scion", key: table}}}
    with pytest.raises(ConfigError, match=rf"^--config-json: image_mlp\.methods\.m\.{key}\.{role}: the study's MLP "
                                          rf"\(image_mlp\.n_layers = {n_layers}\) has no {role} parameters; its roles "
                                          rf"are {roles}$"):
        study_config(block)
    config = yaml.safe_load(open("config.yaml"))
    config["image_mlp"] = block
    with pytest.raises(ConfigError, match=rf"^config error: image_mlp\.methods\.m\.{key}\.{role}: "):
        check_config(config)
    kept = {name: value for name, value in table.items() if name in roles.split(", ")}
    cfg = study_config({"n_layers": n_layers, "methods": {"m": {"optimizer": "scion", key: kept}}})
    mlp = build_model(run_defaults(**mlp_config(cfg)), 10)
    assert tuple(role for role, params in mlp.param_roles().items() if params) == image_mlp_roles(n_layers)


def test_pgd_at_the_largest_allowed_radius_stays_finite_and_larger_radii_are_refused():
    """At ε = 10⁶ (the schema's cap) PGD on a linear classifier still finds the exact worst margin,
    −ε·‖w₀ − w₁‖ + clean margin, and drives it below zero; at 10²⁰ its fp32 norms overflowed, the
    objective became NaN, and the ball scored as clean. Such radii are refused by the schema."""
    from lipflow.config import ConfigError
    from lipflow.evaluation.robustness import pgd_l2

    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    x, labels = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    score = lambda inputs: inputs @ weight.T  # noqa: E731
    delta = pgd_l2(score, x, labels, 1e6, steps=5)
    margin = OBJECTIVES.get("margin")(score(x + delta), labels)
    assert torch.isfinite(delta).all() and float(-margin) == pytest.approx(2.0 - 1e6 * math.sqrt(2), rel=1e-4)
    with pytest.raises(ConfigError, match=r"epsilons\.0: 1e\+20 is greater than the maximum of 1000000"):
        evaluation_params("robustness", epsilons=[1e20])


@pytest.mark.parametrize("name, key, values", [("robustness", "epsilons", [0, 0.0]), ("robustness", "k_values", [1, 1]),
                                               ("rank", "rtols", [0.01, 0.01])])
def test_a_value_given_twice_in_an_evaluation_list_is_refused_naming_the_key(name, key, values):
    """A repeated ε, k or rtol gave two rows of one (metric, parameter), the random attack's with two
    different values; it is a one-line error naming the key."""
    from lipflow.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"^evaluations\.{name}\.{key}: .* has non-unique elements$"):
        evaluation_params(name, **{key: values})


def test_the_lipschitz_radius_is_capped_like_the_epsilons_and_the_cap_gives_a_finite_ratio():
    """A lipschitz_radius of 10³⁰ gave a NaN lipschitz_lower_bound row on a gpt (its LayerNorm's
    float32 variance overflows) with exit 0; above 10⁶ it is refused naming the key, and at 10⁶
    the ascent's ratio is finite."""
    from lipflow.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^evaluations\.robustness\.lipschitz_radius: 1e\+30 is greater than"):
        evaluation_params("robustness", lipschitz_radius=1e30)
    cfg = run_defaults(model="gpt", d_model=16, n_layers=1, n_heads=2, context=6, mlp_ratio=2)
    torch.manual_seed(0)
    rows = robustness_rows(build_model(cfg, 12), cfg={"epsilons": [0.0], "k_values": [], "pgd_steps": 1,
                                                      "lipschitz_steps": 2, "lipschitz_radius": 1e6})
    assert math.isfinite(value(rows, "lipschitz_lower_bound", attack="lipschitz_ascent"))


def test_the_medians_of_an_even_count_are_the_mean_of_the_two_middle_values():
    """certified_radius_median and tightness_* are medians: over 2 (or 26) inputs the mean of the
    middle two, not torch's lower one (radii 0.1 and 0.3 gave 0.1)."""
    from lipflow.evaluation.robustness import median_radius_of_correct

    assert median_radius_of_correct(torch.tensor([0.1, 0.3, 0.0]), torch.tensor([1.0, 3.0, -1.0])) == pytest.approx(0.2)
    rows = tightness_rows(torch.tensor([1.0, 3.0, 2.0, 6.0]), 0.5, torch.tensor([2.0, 2.0, 2.0, 2.0]), 1.0, "pgd")
    assert value(rows, "tightness_local", attack="pgd") == pytest.approx(1.25)  # ratios 0.5, 1, 1.5, 3
    assert value(rows, "tightness_global", attack="pgd") == pytest.approx(2.5 / (math.sqrt(2.0) * 0.5))  # bound √2·L·ε


def test_a_median_over_a_nan_is_nan_as_torchs():
    """Tensor.median is NaN when a value is; the mean-of-the-middle-two median sorted the NaNs last
    and then took the middle of the rest: tightness ratios 1, 2, NaN gave 2 instead of NaN."""
    from lipflow.evaluation.robustness import median

    assert math.isnan(median(torch.tensor([1.0, 2.0, math.nan])))
    assert math.isnan(median(torch.tensor([math.nan, 1.0, 2.0, 3.0, 4.0])))
    rows = tightness_rows(torch.tensor([1.0, 2.0, math.nan]), 0.5, torch.tensor([1.0, 1.0, 1.0]), None, "pgd")
    assert math.isnan(value(rows, "tightness_local", attack="pgd"))
    assert median(torch.tensor([3.0, 1.0, 2.0, 4.0])) == 2.5


def test_ratios_of_pairs_closer_than_float32_resolves_are_measured_in_float64():
    """The Lipschitz ratios are lower bounds only in exact arithmetic: with float32 logits a ratio ascent
    of radius 10⁻⁷ measured 1.2 on a lipschitz_gpt certified at 0.61 (round-off over ‖Δx‖) and the
    evaluation raised "this is a bug". Measured in float64, it is the ratio the same ascent finds at 10⁻⁴."""
    cfg = run_defaults(model="lipschitz_gpt", d_model=16, n_layers=1, n_heads=2, context=8)
    torch.manual_seed(0)
    model = build_model(cfg, 12)
    found = {radius: value(robustness_rows(model, cfg={"epsilons": [0.0], "k_values": [], "pgd_steps": 1,
                                                       "lipschitz_steps": 3, "lipschitz_radius": radius}),
                           "lipschitz_lower_bound", attack="lipschitz_ascent") for radius in (1e-7, 1e-4)}
    assert found[1e-7] == pytest.approx(found[1e-4], rel=1e-3)
    assert found[1e-7] <= model.lipschitz_bound_l2()


def test_an_image_mlp_radiuss_pgd_does_not_depend_on_the_other_radii_or_their_order():
    """With random restarts the study's radii shared one generator, so a radius's PGD rows changed with the
    radii before it. Each radius draws from a stream seeded by the seed and the radius now, and the config
    takes the list sorted (one params string for one study)."""
    from lipflow.config import check_config
    from lipflow.studies import image_mlp

    torch.manual_seed(0)
    model = build_model(run_defaults(**image_mlp.mlp_config(_image_cfg())), image_mlp.CLASSES)
    with torch.no_grad():  # weights large enough for confident, attackable logits
        for weight in model.parameters():
            weight.copy_(torch.randn_like(weight) * 3 / weight.shape[-1] ** 0.5)
    x, y = (part[:64] for part in image_mlp.digits_splits(0)["test"])

    def pgd_rows(epsilons: list[float]) -> dict:
        rows = image_mlp.robustness_rows(model, (x, y), _image_cfg(epsilons=epsilons, pgd_restarts=3), 0,
                                         method="m")
        return {(r["metric"], r["epsilon"]): r["value"] for r in rows
                if r["metric"] in ("robust_accuracy", "robust_loss", "robust_true_class_probability")}

    both = pgd_rows([0.3, 1.0])
    assert pgd_rows([1.0, 0.3]) == both
    assert pgd_rows([1.0]) == {key: v for key, v in both.items() if key[1] == 1.0}
    config = {"image_mlp": {"epsilons": [1.0, 0.3, 0]}}
    check_config(config)
    assert config["image_mlp"]["epsilons"] == [0.0, 0.3, 1.0]
