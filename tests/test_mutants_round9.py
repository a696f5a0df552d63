"""Mutation-testing round 9: the checkpoint evaluations — number formats and the precision evaluation
(lipflow.evaluation.number_formats / .precision), rank (.rank), sharpness (.sharpness), robustness
(.robustness), val (.val) and the local certificate (.local_certificate / .local_attention).
Each test here holds a property (a closed form, an exact spectrum, a second computation, the documented
boundary case) that a plausible wrong version of the code, which the rest of the suite let through, breaks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lipflow.config import evaluation_params, run_defaults
from lipflow.evaluation import EVALUATIONS, EvalContext
from lipflow.model import build_model

FP32_EPS = float(torch.finfo(torch.float32).eps)


# --- lipflow.evaluation.precision ---------------------------------------------------------------------

def test_linear_hooks_keep_the_largest_magnitude_over_every_call():
    """max_abs is a running maximum over every call of the Linear, not the last call's maximum."""
    from lipflow.evaluation.precision import linear_hooks
    net = nn.Sequential(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(2))
    with linear_hooks(net, None) as state, torch.no_grad():
        net(torch.tensor([[3.0, 0.0]]))
        net(torch.tensor([[1.0, -0.5]]))
    assert state.max_abs == {"0.input": 3.0, "0.output": 3.0}


def _tiny_lm(model="gpt", vocab=20, context=8):
    torch.manual_seed(0)
    cfg = run_defaults(model=model, d_model=16, n_layers=1, n_heads=2, context=context, mlp_ratio=2)
    return build_model(cfg, vocab).eval(), cfg


def test_block_maxima_are_running_maxima_over_the_batches():
    """loss_and_accuracy's block_max holds, per tensor, the largest value over every batch: the same
    as the maximum over the windows scored one at a time, whatever the batch size."""
    from lipflow.evaluation.precision import loss_and_accuracy
    model, _ = _tiny_lm()
    windows = torch.randint(0, 20, (6, 9), generator=torch.Generator().manual_seed(3))
    model.record_activations = True
    try:
        batched: dict[str, float] = {}
        loss_and_accuracy(model, windows, 1, torch.device("cpu"), batched)
        single = []
        for w in windows:
            one: dict[str, float] = {}
            loss_and_accuracy(model, w[None], 1, torch.device("cpu"), one)
            single.append(one)
    finally:
        model.record_activations = False
    assert batched and batched == {k: max(s[k] for s in single) for k in batched}
    assert any(single[-1][k] < batched[k] for k in batched)  # the last window alone is not the maximum


@pytest.mark.parametrize("where", ["weight", "bound"])
def test_a_weight_or_a_bound_exactly_at_the_format_max_is_proven_safe(monkeypatch, where):
    """format_max itself is representable: a weight of exactly 448 fits e4m3 (> not ≥), and so does an
    activation bound of exactly 448 (≤)."""
    from lipflow.evaluation import precision
    from lipflow.evaluation.number_formats import FORMATS
    fmt = FORMATS.get("fp8_e4m3")
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.5)
        if where == "weight":
            model.weight[0, 0] = fmt.max
    monkeypatch.setattr(precision, "cast_activation_bound", lambda m, f: f.max if where == "bound" else 1.0)
    value, status = precision.proven_safe(model, fmt)
    assert value == 1.0, status


def test_pad16_pads_to_the_next_multiple_of_sixteen_with_zeros():
    from lipflow.evaluation.precision import _pad16
    for n in (1, 15, 16, 17, 31, 33):
        t = torch.arange(1.0, 2 * n + 1).reshape(2, n)
        for dim in (0, 1):
            padded = _pad16(t, dim)
            assert padded.shape[dim] == 16 * math.ceil(t.shape[dim] / 16)
            assert padded.shape[1 - dim] == t.shape[1 - dim]
            assert torch.equal(padded.narrow(dim, 0, t.shape[dim]), t)
            assert padded.sum() == t.sum()


def test_simulated_fp8_linear_is_the_product_of_the_per_tensor_casts_rounded_to_bf16():
    """Fp8Linear (simulated) = (cast(s_x x) cast(s_w W)ᵀ)/(s_x s_w) rounded to bf16, s_x = 448/max|x| over
    the whole input (not a row of it). With max|x| = 56 (in the last row) and max|W| = 3.5 the scales
    8 and 128 are powers of two, so it equals simulate_cast(x)·simulate_cast(W)ᵀ; the result is a bf16 value."""
    from lipflow.evaluation.number_formats import FORMATS, simulate_cast
    from lipflow.evaluation.precision import Fp8Linear
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, generator=g).clamp(-3, 3)
    x[2, 5] = -56.0
    lin = nn.Linear(16, 5, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(5, 16, generator=g).clamp(-2, 2))
        lin.weight[1, 3] = 3.5
    e4m3 = FORMATS.get("fp8_e4m3")
    y = Fp8Linear(lin, "per_tensor", real=False, out_dtype=torch.bfloat16)(x)
    assert torch.equal(y.to(torch.bfloat16).float(), y)
    w_cast = simulate_cast(lin.weight.detach(), e4m3, "per_tensor").double()
    reference = simulate_cast(x, e4m3, "per_tensor").double() @ w_cast.T
    torch.testing.assert_close(y.double(), reference.to(torch.bfloat16).double(), rtol=2 ** -8, atol=1e-6)


def _precision_rows(model, cfg, **eval_cfg):
    windows = torch.randint(0, 20, (8, 9), generator=torch.Generator().manual_seed(3))
    ctx = EvalContext(model, lambda count: windows[:count], windows, evaluation_params("precision", **eval_cfg), cfg,
                      None, None, torch.device("cpu"), None)
    return EVALUATIONS.get("precision")(ctx)


def _rows(rows, metric, **columns):
    return [r for r in rows if r["metric"] == metric and all(r.get(k) == v for k, v in columns.items())]


def test_precision_rows_int8_error_and_ranges_over_format_max():
    """weight_max_abs_error is the largest |int8(W) − W| over every matrix; max_abs_over_format_max is
    max|x| / format_max per tensor, and 'matmul_operands' is the largest over every Linear's input and output."""
    from lipflow.evaluation.number_formats import quantize_int8_per_channel
    model, cfg = _tiny_lm()
    rows = _precision_rows(model, cfg, formats=["fp8_e4m3"], scalings=["none"], batch_size=4, int8=True)
    errors = [float((quantize_int8_per_channel(p.detach())[0] - p.detach()).abs().max())
              for p in model.parameters() if p.ndim == 2]
    assert len(errors) > 2 and len(set(errors)) > 1
    assert _rows(rows, "weight_max_abs_error")[0]["value"] == max(errors)
    observed = {r["tensor"]: r["value"] for r in _rows(rows, "max_abs_activation")}
    ratios = {r["tensor"]: r["value"] for r in _rows(rows, "max_abs_over_format_max", format="fp8_e4m3")}
    linear = [v for k, v in observed.items() if k.endswith((".input", ".output"))]
    assert len(linear) > 2 and min(linear) < max(linear)
    assert ratios.pop("matmul_operands") == max(linear) / 448.0
    assert ratios == {k: v / 448.0 for k, v in observed.items() if k in ratios} and len(ratios) > 0


def test_a_saturated_count_alone_makes_a_format_not_observed_safe(monkeypatch):
    """fp8_safe_observed needs no overflow and no saturation (e5m2 rounds 57 400 down to its max 57 344:
    saturated, not overflowed): a cast that only saturates is not observed safe."""
    from lipflow.evaluation import precision
    real = precision.cast_with_counts

    def saturating(x, fmt, scaling="none"):
        y, counts = real(x, fmt, scaling)
        counts.saturated += 1
        return y, counts

    monkeypatch.setattr(precision, "cast_with_counts", saturating)
    model, cfg = _tiny_lm()
    rows = _precision_rows(model, cfg, formats=["bf16"], scalings=["none"], batch_size=8, int8=False)
    assert _rows(rows, "activation_overflow", format="bf16")[0]["value"] == 0
    assert _rows(rows, "fp8_safe_observed", format="bf16")[0]["value"] == 0.0


# --- lipflow.evaluation.rank --------------------------------------------------------------------------

def test_numerical_rank_counts_strictly_above_the_tolerance():
    """#{σᵢ > tol}: a singular value equal to tol = rtol·σ₁ is not counted."""
    from lipflow.evaluation.rank import numerical_rank
    s = np.array([2.0, 1.0, 2.0 ** -9])
    assert numerical_rank(s, (3, 3), rtol=2.0 ** -10) == 2
    assert numerical_rank(s, (3, 3), rtol=2.0 ** -11) == 3


@pytest.mark.parametrize("shape", [(2, 8), (8, 2)])
def test_numerical_rank_default_tolerance_uses_the_long_side(shape):
    """tol = max(m, n)·eps_fp32·σ₁: on a 2 × 8 matrix σ₂ = 4·eps·σ₁ (above 2·eps, below 8·eps) is not
    counted; 16·eps is."""
    from lipflow.evaluation.rank import numerical_rank
    assert numerical_rank(np.array([1.0, 4 * FP32_EPS]), shape) == 1
    assert numerical_rank(np.array([1.0, 16 * FP32_EPS]), shape) == 2


def test_dudley_integral_of_a_term_that_ends_inside_the_range():
    """One term (P, c) with c ≪ D: ∫₀^D √(P ln₊(c/ε)) dε = √P·c·Γ(3/2) = √P·c·√π/2, the integrand
    vanishing beyond ε = c (the kink quad must be told about, or it samples only zeros)."""
    from lipflow.evaluation.rank import dudley_rademacher
    p, c, d, n = 7.0, 1e-3, 1.0, 25
    expected = 12.0 / math.sqrt(n) * math.sqrt(p) * c * math.sqrt(math.pi) / 2
    assert dudley_rademacher([(p, c)], d, n) == pytest.approx(expected, rel=1e-6)


def test_b3_terms_with_a_vector_readout_and_a_non_unit_activation_slope():
    """Readout w ∈ ℝᵏ: its term is (k, 9·‖w‖₂·L_σ·B_V·B_X) and D = ‖w‖₂·L_σ·B_V·B_X (ℓ2, not ℓ1;
    L_σ included)."""
    from lipflow.evaluation.rank import b3_terms
    d, k = 4, 3
    qk = torch.diag(torch.tensor([2.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    value = torch.zeros(d, k, dtype=torch.float64)
    value[0, 0], value[1, 1] = 3.0, 1.0                      # σ = (3, 1): B_V = 3, ‖W_V‖_F = √10
    readout = torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)  # ‖w‖₂ = 5, ‖w‖₁ = 7
    lip, bx = 2.0, 1.5
    terms, diameter = b3_terms(qk, value, readout, bx, activation_lipschitz=lip)
    assert terms[2] == (3.0, pytest.approx(9 * 5.0 * lip * 3.0 * bx, rel=1e-12))
    assert diameter == pytest.approx(5.0 * lip * 3.0 * bx, rel=1e-12)
    assert terms[0] == (float((2 * d + 1) * 2), pytest.approx(54 * math.sqrt(5) * 5.0 * lip * 3.0 * bx ** 3, rel=1e-12))


# --- lipflow.evaluation.sharpness ---------------------------------------------------------------------

def _diagonal_quadratic(diag):
    a = torch.tensor(diag, dtype=torch.float32)
    theta = torch.randn(len(diag), generator=torch.Generator().manual_seed(1), requires_grad=True)
    return (lambda: 0.5 * (a * theta * theta).sum()), [theta]


def _power_iteration_in_float64(diag, init, iters, tol):
    """The documented iteration v ← Hv/‖Hv‖, λ = vᵀHv, stop when |Δλ| < tol·(|λ| + 1e-6) (from step 2)."""
    a = torch.tensor(diag, dtype=torch.float64)
    v = init.double() / init.double().norm()
    previous, margins = None, []
    for step in range(1, iters + 1):
        hv = a * v
        new = float(v @ hv)
        v = hv / hv.norm()
        if previous is not None:
            margins.append(abs(new - previous) / (tol * (abs(new) + 1e-6)))
            if margins[-1] < 1:
                return new, step, True, margins
        previous = new
    return previous, iters, False, margins


def test_power_iteration_stops_at_the_documented_step_with_that_steps_rayleigh_quotient():
    """On H = diag(3, 2.7, 1, −0.5, …) from a fixed start, the run stops at the first step whose Rayleigh
    quotient moved by less than tol·(|λ| + 1e-6) (relative, not absolute) and returns that step's quotient
    and its index: the same as the iteration written out in float64."""
    from lipflow.evaluation.sharpness import power_iteration
    diag = [3.0, 2.7, 1.0, -0.5, 0.25, 0.1]
    init = torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    tol = 3e-3
    expected, steps, converged, margins = _power_iteration_in_float64(diag, init, 100, tol)
    assert converged and steps > 3 and all(abs(m - 1) > 0.01 for m in margins)  # no step is borderline
    loss, params = _diagonal_quadratic(diag)
    result = power_iteration(loss, params, iters=100, tol=tol, init=init)
    assert result.converged and result.iterations == steps
    assert result.eigenvalue == pytest.approx(expected, rel=1e-6)


def test_one_power_step_returns_the_rayleigh_quotient_of_the_normalized_start():
    """iters = 1 from an unnormalized start: λ = vᵀHv for v = init/‖init‖, reported though not converged."""
    from lipflow.evaluation.sharpness import power_iteration
    diag = [3.0, 1.0, -2.0]
    loss, params = _diagonal_quadratic(diag)
    init = torch.tensor([2.0, 4.0, 4.0])  # ‖init‖ = 6
    result = power_iteration(loss, params, iters=1, tol=1e-6, init=init)
    assert result.iterations == 1 and not result.converged
    assert result.eigenvalue == pytest.approx((3 * 4 + 1 * 16 - 2 * 16) / 36, rel=1e-6)


def test_power_iteration_from_the_null_space_returns_zero_at_once():
    """Hv = 0: the Rayleigh quotient 0 is exact; the run stops there (no division by ‖Hv‖ = 0)."""
    from lipflow.evaluation.sharpness import power_iteration
    loss, params = _diagonal_quadratic([2.0, 0.0, 0.0])
    result = power_iteration(loss, params, iters=20, tol=1e-6, init=torch.tensor([0.0, 1.0, 1.0]))
    assert (result.eigenvalue, result.iterations, result.converged) == (0.0, 1, True)


def test_hutchinson_standard_error_is_the_sample_standard_deviation_over_root_samples():
    """stderr = s/√n with s the sample standard deviation (n − 1 in the denominator) of the vᵢᵀHvᵢ, the
    vᵢ the Rademacher vectors drawn from the generator in turn."""
    from lipflow.evaluation.sharpness import hutchinson_trace
    g = torch.Generator().manual_seed(4)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    a = a + a.T
    theta = torch.randn(5, generator=g, requires_grad=True)
    a32 = a.float()
    samples = 4
    est = hutchinson_trace(lambda: 0.5 * theta @ a32 @ theta, [theta], samples,
                           generator=torch.Generator().manual_seed(7))
    draws = torch.Generator().manual_seed(7)
    values = []
    for _ in range(samples):
        v = (torch.randint(0, 2, (5,), generator=draws).float() * 2 - 1).double()
        values.append(float(v @ a @ v))
    values = torch.tensor(values, dtype=torch.float64)
    assert values.std() > 0
    assert est.mean == pytest.approx(float(values.mean()), rel=1e-5, abs=1e-5)
    assert est.stderr == pytest.approx(float(values.std(correction=1)) / math.sqrt(samples), rel=1e-5)


def test_lanczos_steps_are_capped_by_the_dimension():
    """In 4 dimensions at most 4 Lanczos steps exist: 10 iterations give H's exact eigenvalues (not
    Ritz values of a basis extended by round-off), and k = 5 > 4 eigenvalues is refused."""
    from lipflow.evaluation.sharpness import lanczos_topk
    diag = [5.0, 3.0, -1.0, 0.5]
    loss, params = _diagonal_quadratic(diag)
    top = lanczos_topk(loss, params, k=4, iters=10, generator=torch.Generator().manual_seed(0))
    assert top == pytest.approx([5.0, 3.0, 0.5, -1.0], abs=1e-5)
    with pytest.raises(ValueError, match="exceeds the number of Lanczos steps 4"):
        lanczos_topk(loss, params, k=5, iters=10, generator=torch.Generator().manual_seed(0))


def test_a_parameter_the_loss_is_linear_in_has_zero_hessian_rows():
    """½a·θ² + b·φ: H = diag(a, 0); φ's gradient b has no graph, and the products still run."""
    from lipflow.evaluation.sharpness import HessianOperator, power_iteration
    theta = torch.tensor([1.0, -2.0], requires_grad=True)
    phi = torch.tensor([0.5, 0.5], requires_grad=True)
    a = torch.tensor([4.0, 1.0])
    b = torch.tensor([3.0, -1.0])
    loss = lambda: 0.5 * (a * theta * theta).sum() + (b * phi).sum()  # noqa: E731
    op = HessianOperator(loss, [theta, phi])
    assert torch.equal(op(torch.tensor([1.0, 1.0, 1.0, 1.0])), torch.tensor([4.0, 1.0, 0.0, 0.0]))
    result = power_iteration(loss, [theta, phi], iters=100, tol=1e-7, init=torch.ones(4))
    assert result.eigenvalue == pytest.approx(4.0, rel=1e-5)


# --- lipflow.evaluation.robustness --------------------------------------------------------------------

def test_pgd_random_restarts_escape_a_start_with_zero_gradient():
    """margin objective ‖x + δ‖² − 1 at x = 0: its gradient vanishes at δ = 0, so restart 0 stays there;
    a later restart starts inside the ball and ascends to the sphere ‖δ‖ = ε."""
    from lipflow.evaluation.robustness import pgd_l2

    def score(z):
        z = z.flatten(1)
        return torch.stack([torch.zeros(z.shape[0]), z.pow(2).sum(1) - 1.0], dim=1)

    x, labels = torch.zeros(3, 2, 4), torch.zeros(3, dtype=torch.long)
    one = pgd_l2(score, x, labels, 0.5, steps=5, restarts=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(one, torch.zeros_like(x))
    two = pgd_l2(score, x, labels, 0.5, steps=5, restarts=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(two.flatten(1).norm(dim=1), torch.full((3,), 0.5), rtol=1e-5, atol=0)


def test_lipschitz_ascent_measures_on_the_sphere_of_its_radius():
    """F(x) = x ⊙ x at x = 0: on ‖δ‖ = r the ratio ‖δ ⊙ δ‖/‖δ‖ lies in [r/√D, r], and the ascent
    (on Σδ⁴) drives it to r — the ratio of the given radius, not of the unit sphere."""
    from lipflow.evaluation.robustness import lipschitz_ascent
    x = torch.zeros(2, 3, 4, dtype=torch.float64)
    ratios = lipschitz_ascent(lambda t: t * t, x, 0.1, 30, torch.Generator().manual_seed(0))
    assert ratios.shape == (2,)
    assert torch.all(ratios <= 0.1 * (1 + 1e-6)) and torch.all(ratios >= 0.099)


def test_tightness_leaves_out_inputs_with_a_zero_bound():
    from lipflow.evaluation.robustness import tightness
    ratios = tightness(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 4.0, 0.0]))
    assert torch.equal(ratios, torch.tensor([0.5], dtype=torch.float64))


def test_pair_ratios_skip_pairs_that_do_not_differ():
    from lipflow.evaluation.robustness import pair_ratios
    x = torch.ones(3, 2)
    other = x.clone()
    other[1] += torch.tensor([3.0, 4.0])
    ratios = pair_ratios(lambda t: 2.0 * t, x, other, batch_size=2)
    assert torch.equal(ratios, torch.tensor([2.0], dtype=torch.float64))


class _PositionwiseLinear(nn.Module):
    """Logits_t = W x_t over token embeddings (the robustness tests' linear model), certificate σ_max(W)."""

    def __init__(self, vocab=4, d=3, context=3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.vocab_size, self.context = vocab, context
        self.tok = nn.Parameter(torch.randn(vocab, d, generator=g))
        self.w = nn.Parameter(torch.randn(vocab, d, generator=g))

    def embed(self, idx):
        return self.tok[idx]

    def forward_embedded(self, x):
        return x @ self.w.T

    def forward(self, idx):
        return self.forward_embedded(self.embed(idx))

    def lipschitz_bound_l2(self):
        return float(torch.linalg.matrix_norm(self.w.detach(), 2))


def _robustness_rows(model, **cfg):
    windows = torch.randint(0, model.vocab_size, (8, model.context + 1), generator=torch.Generator().manual_seed(5))
    eval_cfg = evaluation_params("robustness", **{"epsilons": [0.3], "pgd_steps": 3, "k_values": [1, 2],
                                                  "random_trials": 2, "greedy_candidates": 2, "lipschitz_steps": 2,
                                                  "batch_size": 8, **cfg})
    ctx = EvalContext(model, lambda count: windows[:count], windows, eval_cfg, {}, None, None, torch.device("cpu"),
                      None)
    return EVALUATIONS.get("robustness")(ctx), windows


def test_greedy_rows_read_the_worst_sequence_of_their_own_budget(monkeypatch):
    """The greedy row at budget k is the k-th sequence greedy_substitution returns: here budget 1 leaves
    the windows unchanged (clean accuracy) and budget 2 replaces every token by one after which the
    model predicts another token than the label (accuracy 0)."""
    from lipflow.evaluation import robustness
    model = _PositionwiseLinear()

    def fake_greedy(score_tokens, idx, labels, k, *args, **kwargs):
        with torch.no_grad():
            predicted = model.forward_embedded(model.tok).argmax(1)  # the prediction after each token
        wrong = (predicted[None, :] != labels[:, None]).float().argmax(1)  # a token whose prediction is wrong
        return [idx.clone(), wrong[:, None].expand_as(idx).clone()][:k]

    monkeypatch.setattr(robustness, "greedy_substitution", fake_greedy)
    monkeypatch.setattr(robustness, "random_substitution", lambda score_tokens, idx, *a, **kw: idx.clone())
    rows, windows = _robustness_rows(model)
    value = {(r["metric"], r.get("attack"), r.get("k")): r["value"] for r in rows}
    clean = value[("clean_accuracy", None, None)]
    assert 0 < clean
    assert value[("robust_accuracy", "greedy", 1)] == clean
    assert value[("robust_accuracy", "greedy", 2)] == 0.0
    assert value[("robust_accuracy", "random", 2)] == clean


def test_within_100x_local_counts_a_ratio_of_exactly_one_hundredth(monkeypatch):
    """'at least 1/100': an attack reaching exactly 0.01 of the local bound counts."""
    from lipflow.evaluation import robustness

    class Local:
        def __init__(self, n):
            self.margin = torch.ones(n)

        def radius(self):
            return torch.full_like(self.margin, 0.5)

        def margin_drop(self, eps):
            return eps.double()

    monkeypatch.setattr(robustness, "local_certificate", lambda m, x, y, cert: Local(x.shape[0]))
    monkeypatch.setattr(robustness, "tightness",
                        lambda attack, bound: torch.full((len(bound),), 0.01, dtype=torch.float64))
    rows, _ = _robustness_rows(_PositionwiseLinear(), k_values=[])
    within = [r["value"] for r in rows if r["metric"] == "within_100x_local"]
    assert within == [1.0]


# --- lipflow.evaluation.val ---------------------------------------------------------------------------

def test_val_rows_are_the_val_windows_next_token_loss_accuracy_and_perplexity():
    """Scored on the val windows (not the train ones): mean cross-entropy over every target, accuracy,
    exp(loss) and the number of targets, each computed here directly."""
    model, cfg = _tiny_lm()
    g = torch.Generator().manual_seed(8)
    val = torch.randint(0, 20, (5, 9), generator=g)
    train = torch.randint(0, 20, (5, 9), generator=g)
    ctx = EvalContext(model, lambda count: train[:count], val, evaluation_params("val", batch_size=2), cfg, None, None,
                      torch.device("cpu"), None)
    rows = {r["metric"]: r["value"] for r in EVALUATIONS.get("val")(ctx)}
    with torch.no_grad():
        logits = model(val[:, :-1]).double()
    targets = val[:, 1:]
    loss = float(nn.functional.cross_entropy(logits.reshape(-1, 20), targets.reshape(-1)))
    assert set(rows) == {"loss", "accuracy", "perplexity", "tokens"}
    assert rows["loss"] == pytest.approx(loss, rel=1e-5)
    assert rows["accuracy"] == float((logits.argmax(-1) == targets).double().mean())
    assert rows["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert rows["tokens"] == 40.0


def test_real_fp8_max_logit_difference_is_the_largest_over_every_batch():
    """max_logit_difference is the largest |real − simulated| logit over all batches, so it equals the
    largest of the batches' own values (fp32 results, where torch's CPU kernel and the simulation differ
    by their summation order), whichever batch holds it."""
    from lipflow.evaluation.precision import real_fp8_accuracy
    torch.manual_seed(0)
    net = build_model(run_defaults(model="lipschitz_gpt", d_model=32, n_layers=1, n_heads=2, context=8), 20).eval()
    with torch.no_grad():
        for block in net.blocks:
            block.attn.o.weight.normal_(0, 0.3)
            block.mlp.down.weight.normal_(0, 0.1)
    windows = torch.randint(0, 20, (8, 9), generator=torch.Generator().manual_seed(4))
    batches = [windows[:4], windows[4:]]
    alone = [real_fp8_accuracy(net, b, 4, "per_tensor", torch.float32)["max_logit_difference"] for b in batches]
    if alone[0] == alone[1]:
        pytest.skip("both batches give the same difference: nothing tells the largest from the last")
    ordered = sorted(zip(alone, batches), key=lambda pair: -pair[0])  # the larger first, then the smaller
    together = real_fp8_accuracy(net, torch.cat([b for _, b in ordered]), 4, "per_tensor", torch.float32)
    assert together["max_logit_difference"] == max(alone)


# --- lipflow.evaluation.local_certificate / local_attention -------------------------------------------

def test_gelu_layer_constants_are_the_documented_closed_forms():
    """x ↦ W_out·s·GELU(W_in x): L = s·max GELU′·σ(W_out)·σ(W_in) and β = s·max|GELU″|·max_i‖W_in[i]‖·
    σ(W_out)·σ(W_in), max|GELU″| = 2/√(2π). W_in with two equal rows (1, 1): σ = 2, largest row √2;
    σ(W_out) = 2. max GELU′ is found here on a grid."""
    import lipflow.evaluation.local_certificate as lc
    grid = torch.linspace(0.0, 3.0, 300001, dtype=torch.float64, requires_grad=True)
    slope, = torch.autograd.grad(nn.functional.gelu(grid).sum(), grid)
    max_slope = float(slope.max())
    w_in = torch.ones(2, 2, dtype=torch.float64)
    w_out = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    lip, curv = lc.gelu_layer(1.5, w_in, w_out).bounds(torch.tensor([0.3], dtype=torch.float64))
    assert float(lip) == pytest.approx(1.5 * max_slope * 2.0 * 2.0, rel=1e-9)
    assert float(curv) == pytest.approx(1.5 * 2 / math.sqrt(2 * math.pi) * math.sqrt(2.0) * 2.0 * 2.0, rel=1e-12)


def test_a_residual_layer_passes_its_branchs_jacobian_bound_on():
    """keep·x + weight·F(x) has ‖J‖ ≤ keep + weight·‖J_F‖; its L(0) is the smaller of that and the ball's."""
    import lipflow.evaluation.local_certificate as lc
    branch = lc.SmoothLayer(lambda r: (torch.full_like(r, 5.0), torch.zeros_like(r)),
                            jacobian_norm=lambda: torch.tensor([2.0], dtype=torch.float64))
    layer = lc.residual_layer(0.5, 0.25, branch)
    assert float(lc.nominal_lip(layer, torch.zeros(1, dtype=torch.float64))) == 0.5 + 0.25 * 2.0


def _random_mlp(n_layers, n_classes=12, in_features=6, width=8, seed=0):
    torch.manual_seed(seed)
    model = build_model(run_defaults(model="mlp", in_features=in_features, d_model=width, n_layers=n_layers,
                                     n_classes=n_classes), n_classes)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):  # σ_max 1, 1.5, 2, …
            p.normal_().mul_((1.0 + 0.5 * i) / torch.linalg.matrix_norm(p, 2))
    return model.eval()


def test_a_wrong_prediction_has_local_radius_zero():
    """Where the label is not the prediction (margin < 0) the local radius is 0, not RADIUS_RANGE's floor."""
    from lipflow.evaluation.local_certificate import local_certificate
    model = _random_mlp(3)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        labels = model.forward_embedded(x).argmin(1)
    cert = local_certificate(model, x, labels, None)
    assert torch.all(cert.margin < 0)
    assert torch.equal(cert.radius(), torch.zeros(4, dtype=torch.float64))


def test_margin_gradient_norms_exact_for_the_nearest_classes_and_suffix_bounds_for_the_rest():
    """The GRADIENT_CLASSES classes of smallest margin get ‖∇(z_y − z_j)‖·(1 + GRADIENT_SLACK) (autograd
    on a float64 copy here); the others ‖w_j‖·Π_k L_k(0), and at stage k ‖w_j‖·Π_{i>k} L_i(0) (the
    layers after k, not before)."""
    import copy

    import lipflow.evaluation.local_certificate as lc
    model = _random_mlp(3)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        labels = model.forward_embedded(x).argmax(1)
    cert = lc.local_certificate(model, x, labels, None)
    lips = cert.nominal_lips                                     # (K, B), K = 2 GELU layers
    assert lips.shape == (2, 3) and not torch.allclose(lips[0], lips[1])
    exact = copy.deepcopy(model).double()
    nearest = cert.pair_margins.argsort(dim=1)[:, :lc.GRADIENT_CLASSES]
    for b in range(3):
        for j in range(12):
            if j == labels[b]:
                continue
            if j in nearest[b]:
                xb = x[b:b + 1].double().requires_grad_(True)
                logits = exact.forward_embedded(xb)[0]
                grad, = torch.autograd.grad(logits[labels[b]] - logits[j], xb)
                assert float(cert.gradient_norms[b, j]) == pytest.approx(
                    float(grad.norm()) * (1 + lc.GRADIENT_SLACK), rel=1e-9)
            else:
                w = float(cert.head_norms[b, j])
                assert float(cert.gradient_norms[b, j]) == pytest.approx(w * float(lips[0, b] * lips[1, b]), rel=1e-12)
                assert float(cert.stage_gradient_norms[b, j, 0]) == pytest.approx(w * float(lips[1, b]), rel=1e-12)
                assert float(cert.stage_gradient_norms[b, j, 1]) == pytest.approx(w, rel=1e-12)


def test_a_single_linear_layers_stage_gradient_is_its_head_row_difference():
    """One Linear: the only stage's output gradient is w_j itself, so its norm is ‖w_j‖ = the bound
    ‖w_j‖·(empty product), which the slack-enlarged autograd norm does not exceed."""
    from lipflow.evaluation.local_certificate import local_certificate
    model = _random_mlp(1)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        labels = model.forward_embedded(x).argmax(1)
    cert = local_certificate(model, x, labels, None)
    assert torch.equal(cert.stage_gradient_norms, cert.head_norms[:, :, None])


def test_the_readout_curvature_never_loosens_the_last_stage():
    """The last GELU stage's remainder term is the smaller of the generic ‖g_{j,K}‖·½β·ρ² and ½κ(w_j)ρ²:
    with W_in's rows all equal (σ(W_in) = √h·max row) κ is the larger one, and the drops are those
    computed without it."""
    from lipflow.evaluation.local_certificate import local_certificate
    model = _random_mlp(2)
    with torch.no_grad():
        model.layers[0].weight.copy_(model.layers[0].weight[:1].expand_as(model.layers[0].weight))
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        labels = model.forward_embedded(x).argmax(1)
    cert = local_certificate(model, x, labels, None)
    assert cert.readout_curvature is not None
    for eps in (0.01, 0.1, 0.5):
        e = torch.full((4,), eps, dtype=torch.float64)
        with_readout = cert.pair_drops(e)
        cert_readout, cert.readout_curvature = cert.readout_curvature, None
        without = cert.pair_drops(e)
        cert.readout_curvature = cert_readout
        assert torch.all(with_readout <= without)


def _two_block_gpt(n_layers=2):
    from lipflow.evaluation.local_certificate import local_certificate
    torch.manual_seed(0)
    model = build_model(run_defaults(model="lipschitz_gpt", d_model=16, n_layers=n_layers, n_heads=2, context=6), 20)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and not name.startswith("tok"):
                p.normal_().mul_(2.0 / torch.linalg.matrix_norm(p, 2))
    model.eval()
    idx = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(1))
    x = model.embed(idx).detach()
    with torch.no_grad():
        labels = model.forward_embedded(x)[:, -1].argmax(1)
    return model, x, labels, local_certificate(model, x, labels, None)


def test_the_last_attention_layers_constants_are_those_of_its_last_query():
    """After the last attention layer only the last position reaches the margin: that layer's (L, β) are
    attention_bounds of last_query(record), in the residual keep + weight·(·)."""
    import lipflow.evaluation.local_certificate as lc
    from lipflow.evaluation.local_attention import attention_at, attention_bounds, last_query
    model, x, labels, cert = _two_block_gpt(n_layers=1)
    block = model.blocks[0]
    _, rec = attention_at(block.attn, lc.local_model(model).prepare(x))
    r = torch.tensor([0.05, 0.2], dtype=torch.float64)
    lip, curv = attention_bounds(last_query(rec), r)
    got_lip, got_curv = cert.layers[0].bounds(r)
    torch.testing.assert_close(got_lip, block.keep + block.weight * lip, rtol=1e-12, atol=0)
    torch.testing.assert_close(got_curv, block.weight * curv, rtol=1e-12, atol=0)


def test_per_token_stage_gradients_are_the_largest_tokens_norm():
    """For a per-token layer (the MLP) ‖g_{j,k}‖ is max_t ‖∂(z_y − z_j)/∂h_k[t]‖ (times the slack), not
    the norm over the whole sequence: checked at block 0's MLP output of a two-block model, where the
    gradient spreads over the tokens through block 1's attention."""
    import lipflow.evaluation.local_certificate as lc
    model, x, labels, cert = _two_block_gpt()
    local = lc.local_model(model)
    x0 = local.prepare(x).detach().requires_grad_(True)
    features, layers, outputs = local.body(x0)
    logits = features @ local.head.T
    assert layers[1].per_token
    nearest = cert.pair_margins.argsort(dim=1)[:, :lc.GRADIENT_CLASSES]
    for b in range(2):
        for j in nearest[b].tolist():
            grad, = torch.autograd.grad(logits[b, labels[b]] - logits[b, j], outputs[1], retain_graph=True)
            per_token = grad[b].norm(dim=-1)
            assert per_token.max() < grad[b].norm()
            assert float(cert.stage_gradient_norms[b, j, 1]) == pytest.approx(
                float(per_token.max()) * (1 + lc.GRADIENT_SLACK), rel=1e-9)


# --- batch 2: further survivors -----------------------------------------------------------------------

@pytest.mark.parametrize("capability, available", [((8, 9), True), ((9, 0), True), ((8, 6), False)])
def test_the_fp8_kernel_needs_compute_capability_8_9_or_later(monkeypatch, capability, available):
    from lipflow.evaluation.precision import fp8_kernel_available
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert fp8_kernel_available("cuda") is available
    assert fp8_kernel_available("cpu") is False


def test_the_cast_covers_every_floating_parameter_vectors_included():
    """The simulated casts apply to every floating parameter (LayerNorm gains and biases too): the
    weight_elements row counts them all."""
    model, cfg = _tiny_lm()
    rows = _precision_rows(model, cfg, formats=["bf16"], scalings=["none"], batch_size=8, int8=False)
    total = sum(p.numel() for p in model.parameters() if p.is_floating_point())
    assert any(p.ndim == 1 for p in model.parameters())
    assert _rows(rows, "weight_elements", format="bf16")[0]["value"] == total


def test_a_large_negative_weight_is_not_proven_safe(monkeypatch):
    """The weight check reads |W|: a weight of −500 does not fit e4m3 (max 448) whatever the bounds say."""
    from lipflow.evaluation import precision
    from lipflow.evaluation.number_formats import FORMATS
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.5)
        model.weight[1, 0] = -500.0
    monkeypatch.setattr(precision, "cast_activation_bound", lambda m, f: 1.0)
    value, status = precision.proven_safe(model, FORMATS.get("fp8_e4m3"))
    assert value == 0.0 and status.startswith("weights reach 500")


def test_edelman_proxy_of_a_layer_without_mlp_counts_its_attention():
    """A layer without MLP contributes C₂ = 1 for M_in and M_out: one layer (α = 1) with QK = diag(2, 1)
    and Ṽ = diag(3, 0) gives ξ = (C₂(Ṽ)·‖QK‖_{2,1})^{2/3} + ‖Ṽ‖_{2,1}^{2/3} = 9^{2/3} + 3^{2/3} and
    B_Ed = (1 + ξ)^{3/2}."""
    from lipflow.evaluation.rank import LayerMatrices, edelman_norm_proxy
    layer = LayerMatrices([np.diag([2.0, 1.0])], [np.diag([3.0, 0.0])], None, None)
    xi = 9.0 ** (2 / 3) + 3.0 ** (2 / 3)
    assert edelman_norm_proxy([layer], 1.13) == pytest.approx((1 + xi) ** 1.5, rel=1e-12)


def test_the_models_own_certificate_comes_before_the_fallback():
    from lipflow.evaluation.robustness import certificate_l2
    model = _PositionwiseLinear()
    assert certificate_l2(model, 99.0) == model.lipschitz_bound_l2() != 99.0
    assert certificate_l2(nn.Linear(2, 2), 99.0) == 99.0


def test_the_clean_loss_row_is_the_mean_cross_entropy_of_the_last_prediction():
    model = _PositionwiseLinear()
    rows, windows = _robustness_rows(model, k_values=[])
    with torch.no_grad():
        logits = model(windows[:, :-1])[:, -1]
    expected = float(nn.functional.cross_entropy(logits, windows[:, -1]))
    clean = next(r["value"] for r in rows if r["metric"] == "clean_loss")
    assert clean == pytest.approx(expected, rel=1e-6)


def test_pair_drops_follow_the_documented_telescoped_formula():
    """drop_j(ε) = min(‖∇m_j‖ε + Σ_k ‖g_{j,k}‖·r_k with the last stage's term at most ½κ(w_j)ρ_{K−1}²
    (ρ_{K−1} the last layer's input radius, not ε), ‖w_j‖·ρ_K), written out here from the certificate's
    parts and ``propagate``, on a three-layer mlp whose layers expand (ρ_{K−1} > ε)."""
    import lipflow.evaluation.local_certificate as lc
    model = _random_mlp(3)
    with torch.no_grad():
        for layer in model.layers[:-1]:
            layer.weight.mul_(3.0)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        labels = model.forward_embedded(x).argmax(1)
    cert = lc.local_certificate(model, x, labels, None)
    for eps in (0.003, 0.03, 0.3):
        e = torch.full((4,), eps, dtype=torch.float64)
        prop = lc.propagate(cert.layers, cert.nominal_lips, e)
        assert torch.all(prop.input_radii[-1] > 1.5 * e)
        stages = cert.stage_gradient_norms * prop.remainders.T[:, None, :]
        last = 0.5 * cert.readout_curvature * prop.input_radii[-1][:, None] ** 2
        stages[..., -1] = torch.minimum(stages[..., -1], last)
        expected = torch.minimum(cert.gradient_norms * eps + stages.sum(-1), cert.head_norms * prop.radius[:, None])
        torch.testing.assert_close(cert.pair_drops(e), expected, rtol=1e-12, atol=0)


def test_attention_records_hold_each_heads_own_spectral_norms():
    """σ_q, σ_k, σ_v per head are σ_max of that head's rows of W_q, W_k, W_v (exact SVDs here), and the
    whole matrices' σ_max beside them."""
    from lipflow.evaluation.local_attention import attention_at
    model, x, _, _ = _two_block_gpt(n_layers=1)
    attn = model.blocks[0].attn
    _, rec = attention_at(attn, x.double())
    for sigma, whole, m in zip((rec.sigma_q, rec.sigma_k, rec.sigma_v), rec.sigma_whole, (attn.q, attn.k, attn.v)):
        w = m.weight.detach().double()
        heads = [torch.linalg.svdvals(w[h * 8:(h + 1) * 8])[0] for h in range(2)]
        torch.testing.assert_close(sigma, torch.stack(heads), rtol=1e-12, atol=0)
        assert whole == pytest.approx(float(torch.linalg.svdvals(w)[0]), rel=1e-12)
        assert float(sigma.max()) <= whole


# --- batch 3 ------------------------------------------------------------------------------------------

def test_last_query_keeps_the_last_row_of_every_query_indexed_field():
    """last_query restricts q, probs and both spreads to the last query position (keys and values kept)."""
    from lipflow.evaluation.local_attention import attention_at, last_query
    model, x, _, _ = _two_block_gpt(n_layers=1)
    _, rec = attention_at(model.blocks[0].attn, x.double())
    last = last_query(rec)
    for name in ("q", "probs", "k_spread", "v_spread"):
        assert torch.equal(getattr(last, name), getattr(rec, name)[..., -1:, :]), name
    assert torch.equal(last.k, rec.k) and torch.equal(last.v, rec.v)


def test_local_logits_are_the_models_for_inputs_outside_the_domain_and_a_non_unit_output_multiplier():
    """The local form's nominal logits are the model's own: the input projected onto the RMS ball first
    (inputs scaled ×3 lie outside it) and the head scaled by logit_scale·output_mult."""
    from lipflow.evaluation.local_certificate import local_certificate
    model, x, labels, _ = _two_block_gpt(n_layers=1)
    model.output_mult = 0.5
    x = 3.0 * x
    with torch.no_grad():
        expected = model.double().forward_embedded(x.double())[:, -1]
    model.float()
    cert = local_certificate(model, x, labels, None)
    torch.testing.assert_close(cert.logits, expected, rtol=1e-9, atol=1e-12)


def test_rank_rows_leave_out_the_embeddings_unless_asked():
    model, cfg = _tiny_lm(model="lipschitz_gpt")
    windows = torch.randint(0, 20, (4, 9), generator=torch.Generator().manual_seed(2))
    embed = {n for n, _ in model.param_roles()["embed"]}
    assert embed
    for include in (False, True):
        params = evaluation_params("rank", rtols=[1e-3], n_train=4, include_embeddings=include)
        ctx = EvalContext(model, lambda count: windows[:count], windows, params, cfg, 3.0, 3.25, torch.device("cpu"),
                          None)
        matrices = {r.get("matrix") for r in EVALUATIONS.get("rank")(ctx)}
        assert (embed <= matrices) is include and (embed & matrices == set()) is not include


def test_each_radius_attacks_with_its_own_stream(monkeypatch):
    """PGD at ε draws its restarts from a generator seeded with stream_seed(seed, ε)."""
    from lipflow.evaluation import robustness
    from lipflow.provenance import stream_seed
    seen = []
    real = robustness.pgd_l2

    def spy(score, x, labels, epsilon, steps, restarts, generator, objective):
        seen.append((float(epsilon), generator.initial_seed()))
        return real(score, x, labels, epsilon, steps, restarts, generator, objective)

    monkeypatch.setattr(robustness, "pgd_l2", spy)
    _robustness_rows(_PositionwiseLinear(), epsilons=[0.1, 0.3], k_values=[], seed=7)
    assert seen == [(e, stream_seed(7, e)) for e in (0.1, 0.3)]
    assert seen[0][1] != seen[1][1]


def test_the_sharpness_row_says_when_power_iteration_did_not_converge():
    model, cfg = _tiny_lm()
    windows = torch.randint(0, 20, (4, 9), generator=torch.Generator().manual_seed(2))
    params = evaluation_params("sharpness", batch_size=4, iters=2, tol=1e-12, lanczos_k=0, hutchinson_samples=0)
    ctx = EvalContext(model, lambda count: windows[:count], windows, params, cfg, None, None, torch.device("cpu"), None)
    rows = {r["metric"]: r["value"] for r in EVALUATIONS.get("sharpness")(ctx)}
    assert rows["power_iterations"] == 2.0 and rows["power_iteration_converged"] == 0.0


def test_the_overall_lipschitz_lower_bound_is_the_largest_over_every_source(monkeypatch):
    """The 'all' row is the largest ratio over PGD, the substitutions and the ascent, not the last
    source's (here the ascent, made to find only tiny ratios)."""
    from lipflow.evaluation import robustness
    monkeypatch.setattr(robustness, "lipschitz_ascent", lambda forward, x, *a: torch.full((x.shape[0],), 1e-3,
                                                                                          dtype=torch.float64))
    rows, _ = _robustness_rows(_PositionwiseLinear())
    lower = {r["attack"]: r["value"] for r in rows if r["metric"] == "lipschitz_lower_bound"}
    assert set(lower) == {"pgd", "random", "greedy", "lipschitz_ascent", "all"}
    assert lower["lipschitz_ascent"] == 1e-3 < lower["all"]
    assert lower["all"] == max(v for k, v in lower.items() if k != "all")
