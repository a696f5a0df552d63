"""Mutation-testing round 8: the numerical core — the one-step update (lipflow.train.update), the weight
constraints (lipflow.constraints), Muon and Scion (lipflow.optimizers.muon / .scion), the parametrizations
(lipflow.parametrization), the certified bounds of lipschitz_gpt and the lr schedules (lipflow.schedules).
Each test here holds a property (a closed form, an exact SVD, the paper's formula) that a plausible wrong
version of the code, which the rest of the suite let through, breaks."""

from __future__ import annotations

import math

import pytest
import torch

from lipflow.constraints import StepContext, msign, spectral_hard_cap


# --- lipflow.constraints ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 8), (8, 2)])
def test_msign_drops_directions_below_the_long_side_times_eps(shape):
    """A direction is numerically zero when σ ≤ max(m, n)·eps·σ₁ (the long side, not the short one): on
    a 2 × 8 matrix with exact singular values 1 and 4·eps (above 2·eps, below 8·eps) msign keeps only the
    first; at 16·eps it keeps both."""
    eps = torch.finfo(torch.float32).eps
    for factor, kept in ((4.0, 0.0), (16.0, 1.0)):
        x = torch.zeros(2, 8)
        x[0, 0], x[1, 1] = 1.0, factor * eps
        x = x if shape == (2, 8) else x.T.contiguous()
        expected = torch.zeros_like(x)
        expected[0, 0], expected[1, 1] = 1.0, kept
        assert torch.equal(msign(x), expected)


def test_hard_cap_returns_a_matrix_exactly_at_the_cap_untouched():
    """σ₁ = σmax is within the cap (≤, not <): the matrix comes back bit for bit, not rebuilt from its
    SVD (which moves its entries by rounding)."""
    torch.manual_seed(0)
    x = torch.randn(5, 3)
    sigma_1 = torch.linalg.svd(x, full_matrices=False)[1][0].item()
    assert torch.equal(spectral_hard_cap(x, sigma_1, step=StepContext()), x)
    assert torch.equal(spectral_hard_cap(x.mT.contiguous(), sigma_1, step=StepContext()), x.mT)


def test_top_singular_triplet_is_the_power_iterate_it_documents():
    """v₁ is P·P e_k normalized, P ∝ (XᵀX)^(2^J), k the largest diagonal entry of P: one more application
    of P than P's own column. In closed form for X = U diag(σ) Vᵀ (float64, σ₂/σ₁ = 0.999, where one
    application less leaves v 0.027 off): v = V diag(σ^(2^(J+2))) Vᵀ e_k / ‖·‖, u = Xv/σ₁, σ₁ = ‖Xv‖."""
    from lipflow.constraints import _gram_squarings, top_singular_triplet
    generator = torch.Generator().manual_seed(0)
    v_basis = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=generator))[0]
    u_basis = torch.linalg.qr(torch.randn(6, 4, dtype=torch.float64, generator=generator))[0]
    s = torch.tensor([1.0, 0.999, 0.5, 0.25], dtype=torch.float64)
    x = (u_basis * s) @ v_basis.T
    p = (v_basis * s ** (2 ** (_gram_squarings(4) + 1))) @ v_basis.T
    expected = p @ p[:, torch.argmax(torch.diagonal(p))]
    expected = expected / expected.norm()
    sigma, u, v = top_singular_triplet(x)
    torch.testing.assert_close(v, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(sigma, (x @ expected).norm(), rtol=1e-12, atol=0)
    torch.testing.assert_close(u, x @ expected / sigma, rtol=0, atol=1e-10)


# --- lipflow.optimizers.muon --------------------------------------------------------------------------

def _matrices_at_the_newton_schulz_peak(count: int, n: int = 16) -> torch.Tensor:
    """``count`` n × n matrices of unit Frobenius norm whose smallest singular value σ₀ is one that five of
    Jordan's Newton–Schulz steps send to (within 1e-4 of) their peak 1.2024, the others equal."""
    from lipflow.optimizers.muon import MUON_NS_COEFFICIENTS, newton_schulz_peak
    a, b, c = MUON_NS_COEFFICIENTS
    xs = torch.linspace(1e-4, 1.0, 200001, dtype=torch.float64)
    ys = xs.clone()
    for _ in range(5):
        ys = a * ys + b * ys ** 3 + c * ys ** 5
    near_peak = xs[ys > newton_schulz_peak(5) - 1e-4]
    generator = torch.Generator().manual_seed(0)
    s0 = near_peak[torch.randint(len(near_peak), (count,), generator=generator)]
    rest = torch.sqrt((1 - s0 ** 2) / (n - 1))
    s = torch.cat([s0[:, None], rest[:, None].expand(count, n - 1)], 1)
    q1 = torch.linalg.qr(torch.randn(count, n, n, dtype=torch.float64, generator=generator))[0]
    q2 = torch.linalg.qr(torch.randn(count, n, n, dtype=torch.float64, generator=generator))[0]
    return ((q1 * s[:, None, :]) @ q2.mT).float()


def test_muons_recorded_bound_covers_bf16_newton_schulz_rounding(monkeypatch):
    """On CUDA Newton–Schulz runs in bf16, whose rounding lifts σ₁ of its output above the float64 peak
    (by 0.3 % on matrices at the peak, on CPU): the recorded update bound η·peak·NS_ROUNDING_MARGIN must
    still hold for every step, so the bf16 margin must exceed 1."""
    import lipflow.optimizers.muon as muon
    monkeypatch.setattr(muon, "_ns_dtype", lambda device: torch.bfloat16)
    grads = _matrices_at_the_newton_schulz_peak(64)
    params = [torch.nn.Parameter(torch.zeros(16, 16)) for _ in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    optimizer = muon.Muon(params, lr=1.0, momentum=0.0)
    optimizer.step()
    steps = torch.linalg.matrix_norm(torch.stack([p.detach() for p in params]).double(), ord=2)
    peak = muon.newton_schulz_peak(5)
    assert steps.max() > peak  # bf16 does overshoot here
    bound = optimizer.state[params[0]]["update_norm"]
    assert bound == pytest.approx(peak * muon.NS_ROUNDING_MARGIN[torch.bfloat16], rel=1e-12)
    assert steps.max() <= bound


# --- lipflow.train.update -----------------------------------------------------------------------------

def test_check_coupling_skips_a_group_at_lr_zero():
    """A Muon group at lr 0 (a frozen part) takes no step: check_coupling passes over it (its bound 0/0
    per unit lr is no limit) and still refuses the other group's lr when that is out of range."""
    from lipflow.optimizers.muon import Muon
    from lipflow.train.update import ConstraintSettings, check_coupling
    frozen, trained = [torch.nn.Parameter(torch.zeros(4, 4))], [torch.nn.Parameter(torch.zeros(4, 4))]
    settings = ConstraintSettings("spectral_soft_cap", 1.0, 0.0, 0.0, False)
    check_coupling(Muon([{"params": frozen, "lr": 0.0}, {"params": trained}], lr=0.1), frozen + trained, settings)
    with pytest.raises(ValueError, match=r"^lr: at lr 0.4 "):
        check_coupling(Muon([{"params": frozen, "lr": 0.0}, {"params": trained}], lr=0.4), frozen + trained, settings)


@pytest.mark.parametrize("shape", [(4, 64), (64, 4)])
def test_soft_cap_start_slack_grows_with_the_long_side(shape):
    """fit_within_cap_ leaves a matrix within σmax·(1 + 4·eps·√max(fan_out, fan_in)) bit for bit: at
    4 × 64 a RMS→RMS norm of exactly 1 + 16·eps (inside 1 + 32·eps, outside the short side's 1 + 8·eps)
    is untouched; 1 + 64·eps is scaled onto σmax."""
    from lipflow.train.update import ConstraintSettings, fit_within_cap_
    eps = torch.finfo(torch.float32).eps
    fan_out, fan_in = shape
    scale = math.sqrt(fan_out / fan_in)
    settings = ConstraintSettings("spectral_soft_cap", 1.0, 0.0, 0.0, False)
    for factor, untouched in ((16, True), (64, False)):
        w = torch.zeros(shape)
        for i in range(min(shape)):
            w[i, i] = scale * (1 + factor * eps)  # exact in fp32: a power of 2 times 1 + 2^-19 or 2^-17
        before = w.clone()
        fit_within_cap_([w], settings)
        assert torch.equal(w, before) is untouched
        norm = torch.linalg.matrix_norm(w.double(), ord=2).item() / scale
        assert norm == pytest.approx(1.0, abs=2 * eps) if not untouched else norm == 1 + factor * eps


@pytest.mark.parametrize("shape", [(300, 40), (40, 300), (64, 64), (1, 50), (50, 1)])
def test_the_gram_spectral_norm_equals_the_svds(shape):
    """spectral_norm_f64 (λ_max of the short side's Gram matrix) against float64 singular values, on a
    Gaussian, a rank-one matrix, one with a repeated top singular value and zero."""
    from lipflow.train.update import spectral_norm_f64

    generator = torch.Generator().manual_seed(sum(shape))
    gaussian = torch.randn(shape, generator=generator)
    u, v = torch.randn(shape[0], 1, generator=generator), torch.randn(1, shape[1], generator=generator)
    k = min(shape)
    repeated = torch.zeros(shape)
    repeated[range(k), range(k)] = 3.0
    for w in (gaussian, u @ v, repeated, 1e-20 * gaussian):
        exact = torch.linalg.svdvals(w.double())[0].item()
        assert spectral_norm_f64(w).item() == pytest.approx(exact, rel=1e-13)
    assert spectral_norm_f64(torch.zeros(shape)).item() == 0.0
    assert spectral_norm_f64(repeated).item() == 3.0  # an exact Gram (9·I) has the exact eigenvalue


# --- lipflow.model.lipschitz_gpt ----------------------------------------------------------------------

def test_l2_bound_is_the_rms_bound_times_root_t_v_over_d():
    """L₂ = √T·|logit_scale·output_mult|·σ_max(W_head)·L_body = √(T·V/d)·L_∞RMS: the head's ℓ2 constant is
    its spectral norm (not its RMS→RMS norm, smaller by √(V/d)); checked at V = 40 ≠ d = 8, T = 3."""
    from lipflow.config import run_defaults
    from lipflow.model import build_model
    torch.manual_seed(0)
    model = build_model(run_defaults(model="lipschitz_gpt", d_model=8, n_layers=1, n_heads=2, context=4,
                                     logit_scale=2.0), 40)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert model.lipschitz_bound_l2(3) == pytest.approx(math.sqrt(3 * 40 / 8) * model.lipschitz_bound(), rel=1e-6)


# --- lipflow.schedules --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_a_decay_stays_at_zero_past_its_end(name):
    """The decays reach 0 after the last step and stay there: a step past ``total`` (a schedule called
    beyond its run) gets 0, not a cosine that rises again (½(1 + cos(1.5π)) = ½ at 1.5·total)."""
    from lipflow.schedules import SCHEDULES
    schedule = SCHEDULES.get(name)
    assert schedule(10, 10) == pytest.approx(0.0, abs=1e-15)
    for step in (11, 15, 20, 35):
        assert schedule(step, 10) == pytest.approx(0.0, abs=1e-15)
