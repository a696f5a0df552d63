"""Weight constraints against exact SVD (torch.linalg.svd in float64) and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from lipflow.constraints import (CONSTRAINTS, StepContext, constrain_, msign, soft_cap_alpha,
                                 spectral_norm_bound, top_singular_triplet)
from lipflow.registry import UnknownNameError

SHAPES = [(48, 48), (96, 32), (32, 96)]
KINDS = ["random", "low_rank", "ill_conditioned", "gapped", "orthogonal"]
TOP = 3.0  # σ₁ of every test matrix


def make_matrix(kind: str, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """A float32 matrix of the given kind with σ₁ = TOP."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    r = min(m, n)
    if kind == "random":
        x = torch.randn(m, n, generator=gen, dtype=torch.float64)
        return (x * TOP / torch.linalg.matrix_norm(x, ord=2)).float()
    u = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))[0]
    spectra = {
        "low_rank": torch.cat([torch.tensor([1.0, 0.6, 0.3], dtype=torch.float64), torch.zeros(r - 3, dtype=torch.float64)]),
        "ill_conditioned": torch.logspace(0, -6, r, dtype=torch.float64),
        "gapped": torch.cat([torch.ones(1, dtype=torch.float64), torch.linspace(0.5, 0.01, r - 1, dtype=torch.float64)]),
        "orthogonal": torch.ones(r, dtype=torch.float64),
    }
    return ((u * (TOP * spectra[kind])) @ v.T).float()


def svdvals(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.double())


def spectral_cap_reference(x: torch.Tensor, sigma_max: float) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return (u * s.clamp(max=sigma_max)) @ vh


def apply(name: str, x: torch.Tensor, sigma_max: float, **step) -> torch.Tensor:
    return CONSTRAINTS.get(name)(x, sigma_max, step=StepContext(**step))


ALL_CASES = [(kind, shape) for kind in KINDS for shape in SHAPES]


def test_registry_names():
    assert {"none", "weight_decay", "spectral_weight_decay", "spectral_normalize", "spectral_hammer",
            "spectral_soft_cap", "spectral_hard_cap", "stiefel"} <= set(CONSTRAINTS.names())  # one more: one function
    with pytest.raises(UnknownNameError, match="did you mean 'stiefel'"):
        CONSTRAINTS.get("stiefl")


def test_the_constraints_that_read_sigma_max_are_the_configs_list_of_them():
    """lipflow.config's SIGMA_MAX_CONSTRAINTS (the pareto view shows sigma_max for these only) is the set of
    registered constraints whose output changes with sigma_max, and the set the schema's description names."""
    import re

    from lipflow.config import SCHEMA_PATH, SIGMA_MAX_CONSTRAINTS, load_schema

    x = make_matrix("gapped", (48, 48))
    step = StepContext(lr=0.1, update_norm=0.5, spectral_wd=0.2)
    reads = {name for name in CONSTRAINTS.names()
             if not torch.equal(CONSTRAINTS.get(name)(x, 1.0, step=step), CONSTRAINTS.get(name)(x, 2.0, step=step))}
    assert {"spectral_normalize", "spectral_soft_cap", "stiefel"} <= reads  # the check can fail
    assert sorted(SIGMA_MAX_CONSTRAINTS) == sorted(reads), ("lipflow/config/runs.py's SIGMA_MAX_CONSTRAINTS must "
                                                            f"name exactly the constraints that read sigma_max: {sorted(reads)}")
    described = load_schema(SCHEMA_PATH)["$defs"]["run"]["properties"]["sigma_max"]["description"]
    assert set(re.search(r"\(([a-z_, ]+)\)$", described).group(1).split(", ")) == reads, (
        f"sigma_max's description in {SCHEMA_PATH} must end with the constraints that read it: ({', '.join(sorted(reads))})")


# ----------------------------------------------------------------------------- spectral estimates


@pytest.mark.parametrize("kind,shape", ALL_CASES)
def test_spectral_norm_bound_is_a_tight_upper_bound(kind, shape):
    x = make_matrix(kind, shape)
    sigma = torch.linalg.matrix_norm(x.double(), ord=2).item()
    bound = spectral_norm_bound(x)
    assert bound.dtype == x.dtype and sigma <= bound.item() <= sigma * (1 + 1e-3)


def test_spectral_norm_bound_is_never_below_the_float64_sigma_max():
    """On 300 seeded Gaussian matrices the float32 bound is ≥ σ₁ from a float64 SVD of the same float32
    matrix, in every case: computed in float32 it fell below in 139 of 300 (by up to 6e-7 relative),
    which the soft cap's measured step and spectral_normalize's "σ₁ ≤ σmax afterwards" then inherited."""
    generator = torch.Generator().manual_seed(0)
    xs = torch.randn(300, 64, 16, generator=generator)
    bounds = spectral_norm_bound(xs)
    sigmas = torch.linalg.matrix_norm(xs.double(), ord=2)
    assert bounds.dtype == torch.float32 and bool((bounds.double() >= sigmas).all())
    assert bool((bounds.double() <= sigmas * (1 + 1e-3)).all())


def test_spectral_norm_bound_of_zero_and_vectors():
    assert spectral_norm_bound(torch.zeros(5, 7)).item() == 0.0
    row = torch.randn(1, 9)
    assert spectral_norm_bound(row).item() == pytest.approx(row.norm().item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["random", "low_rank", "ill_conditioned", "gapped"])
@pytest.mark.parametrize("shape", SHAPES)
def test_top_singular_triplet_matches_svd(kind, shape):
    x = make_matrix(kind, shape)
    u_ref, s_ref, vh_ref = torch.linalg.svd(x.double())
    sigma, u, v = top_singular_triplet(x)
    assert sigma.item() == pytest.approx(s_ref[0].item(), rel=1e-5)
    assert abs(torch.dot(u.double(), u_ref[:, 0]).item()) == pytest.approx(1.0, abs=1e-4)
    assert abs(torch.dot(v.double(), vh_ref[0]).item()) == pytest.approx(1.0, abs=1e-4)
    assert torch.dot(x.double() @ v.double(), u.double()).item() == pytest.approx(s_ref[0].item(), rel=1e-5)


@pytest.mark.parametrize("shape", [(5, 5), (7, 4), (4, 7)])
def test_top_singular_triplet_finds_a_top_direction_orthogonal_to_the_first_basis_vector(shape):
    """X = diag(1, 3, 2) (padded): v₁ = e₂ ⟂ e₁, so power iteration started from P's first column (which
    never leaves span(e₁)) would return σ = 1; starting from P's largest-diagonal column gives σ₁ = 3."""
    x = torch.zeros(shape)
    x[0, 0], x[1, 1], x[2, 2] = 1.0, 3.0, 2.0
    sigma, u, v = top_singular_triplet(x)
    e = torch.zeros(max(shape))
    e[1] = 1.0
    assert sigma.item() == pytest.approx(3.0, rel=1e-6)
    assert abs(torch.dot(u, e[:shape[0]]).item()) == pytest.approx(1.0, abs=1e-6)
    assert abs(torch.dot(v, e[:shape[1]]).item()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_msign_and_stiefel_of_a_non_finite_matrix_are_nan(bad):
    """A diverged step stays diverged: msign of a matrix with a non-finite entry is NaN everywhere (its SVD
    is taken of the zero matrix instead, which alone would give 0), and only that matrix of a stack."""
    x = make_matrix("random", (6, 4))
    broken = x.clone()
    broken[2, 1] = bad
    stack = torch.stack([x, broken])
    out = msign(stack)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()
    torch.testing.assert_close(out[0], msign(x))
    assert torch.isnan(apply("stiefel", broken, 2.0)).all()


def test_msign_is_the_polar_factor():
    for kind, shape in ALL_CASES:
        x = make_matrix(kind, shape)
        u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
        q = msign(x).double()
        # attains the nuclear norm with spectral norm 1 (robust even where float32 cannot resolve tiny σ)
        assert (q * x.double()).sum().item() == pytest.approx(s.sum().item(), rel=1e-5)
        assert svdvals(q)[0].item() <= 1 + 1e-5
        if kind != "ill_conditioned":  # singular vectors well determined: compare entrywise
            rank = int((s > s[0] * 1e-4).sum())
            torch.testing.assert_close(q, u[:, :rank] @ vh[:rank], atol=1e-4, rtol=0)
    assert torch.count_nonzero(msign(torch.zeros(4, 6))) == 0


# ----------------------------------------------------------------------------- guaranteed caps


@pytest.mark.parametrize("kind,shape", ALL_CASES)
@pytest.mark.parametrize("sigma_max", [0.5, 1.0, 2.0])
def test_spectral_normalize_scales_to_sigma_max(kind, shape, sigma_max):
    x = make_matrix(kind, shape)
    y = apply("spectral_normalize", x, sigma_max)
    top = svdvals(y)[0].item()
    assert top <= sigma_max * (1 + 1e-5)  # certified bound: never above, up to float rounding
    assert top >= sigma_max / (1 + 1e-3)
    ratio = (y.double() * x.double()).sum() / (x.double() ** 2).sum()  # y is a multiple of x
    torch.testing.assert_close(y.double(), ratio * x.double(), atol=1e-6, rtol=0)


def test_spectral_normalize_leaves_small_matrices_alone():
    x = make_matrix("random", (40, 24))
    assert torch.equal(apply("spectral_normalize", x, TOP * 1.002), x)


@pytest.mark.parametrize("kind,shape", ALL_CASES)
@pytest.mark.parametrize("sigma_max", [0.1, 1.0, 2.5])
def test_hard_cap_is_exact(kind, shape, sigma_max):
    x = make_matrix(kind, shape)
    y = apply("spectral_hard_cap", x, sigma_max)
    assert svdvals(y)[0].item() <= sigma_max * (1 + 1e-4)  # float32 rounding is ~1e-6·‖X‖
    # min(σ, σmax) with the same singular vectors, also for σ ≫ 3.5·σmax where the quintic fails
    torch.testing.assert_close(y.double(), spectral_cap_reference(x, sigma_max), atol=1e-5 * TOP, rtol=0)
    torch.testing.assert_close(svdvals(y), svdvals(x).clamp(max=sigma_max), atol=1e-5 * TOP, rtol=0)


@pytest.mark.parametrize("kind,shape", ALL_CASES)
def test_stiefel_sets_every_singular_value(kind, shape):
    sigma_max = 1.5
    x = make_matrix(kind, shape)
    s_in, s_out = svdvals(x), svdvals(apply("stiefel", x, sigma_max))
    cutoff = max(shape) * torch.finfo(torch.float32).eps * TOP  # msign's numerical-rank threshold
    assert s_out[0].item() <= sigma_max * (1 + 1e-5)
    kept, dropped = s_in > 2 * cutoff, s_in < cutoff / 2
    torch.testing.assert_close(s_out[kept], torch.full_like(s_out[kept], sigma_max), atol=1e-4, rtol=0)
    assert (s_out[dropped] < 1e-4).all()


# ----------------------------------------------------------------------------- rank-one maps


@pytest.mark.parametrize("kind", ["random", "low_rank", "ill_conditioned", "gapped", "orthogonal"])
@pytest.mark.parametrize("shape", SHAPES)
def test_spectral_hammer_replaces_the_top_singular_value(kind, shape):
    sigma_max = 2.0
    x = make_matrix(kind, shape)
    s = svdvals(x)
    expected = torch.sort(torch.cat([torch.tensor([sigma_max], dtype=torch.float64), s[1:]]), descending=True).values
    torch.testing.assert_close(svdvals(apply("spectral_hammer", x, sigma_max)), expected, atol=2e-5 * TOP, rtol=0)


@pytest.mark.parametrize("kind", ["random", "low_rank", "ill_conditioned", "gapped"])
@pytest.mark.parametrize("shape", SHAPES)
def test_spectral_weight_decay_shrinks_the_top_singular_value(kind, shape):
    lam = 0.1
    x = make_matrix(kind, shape)
    s = svdvals(x)
    expected = torch.sort(torch.cat([s[:1] * (1 - lam), s[1:]]), descending=True).values
    torch.testing.assert_close(svdvals(apply("spectral_weight_decay", x, 1.0, spectral_wd=lam)), expected,
                               atol=2e-5 * TOP, rtol=0)


# ----------------------------------------------------------------------------- soft cap


def soft_cap_scalar(sigma: torch.Tensor, alpha: float) -> torch.Tensor:
    y = sigma - alpha * sigma ** 3
    return y + alpha * y ** 3


def test_soft_cap_alpha_matches_the_paper_numbers():
    assert soft_cap_alpha(1.0, 1.05) == pytest.approx(0.1224, abs=1e-4)  # lipschitz.md: σmax=1, update 0.05
    assert soft_cap_alpha(6.0, 6.033) == pytest.approx(0.0012, abs=5e-5)  # σmax=6, update 0.033
    alpha = soft_cap_alpha(1.0, 1.05)
    assert soft_cap_scalar(torch.tensor(1.0, dtype=torch.float64), alpha).item() == pytest.approx(0.960, abs=1e-3)
    assert soft_cap_scalar(torch.tensor(0.5, dtype=torch.float64), alpha).item() == pytest.approx(0.4986, abs=1e-4)


@pytest.mark.parametrize("sigma_max,k", [(1.0, 1.05), (6.0, 6.033), (2.0, 2.6), (0.3, 0.3001), (1.0, 5.0)])
def test_soft_cap_alpha_solves_the_quartic(sigma_max, k):
    alpha = soft_cap_alpha(sigma_max, k)
    assert alpha > 0
    residual = -k ** 9 * alpha ** 4 + 3 * k ** 7 * alpha ** 3 - 3 * k ** 5 * alpha ** 2 + (k - sigma_max)
    assert abs(residual) <= 1e-12 * k ** 9 + 1e-12
    assert soft_cap_scalar(torch.tensor(k, dtype=torch.float64), alpha).item() == pytest.approx(sigma_max, rel=1e-12)
    # smallest non-negative root: no root of the quartic in [0, α)
    grid = torch.linspace(0, alpha, 2001, dtype=torch.float64)[:-1]
    assert (soft_cap_scalar(torch.tensor(k, dtype=torch.float64), grid) > sigma_max).all()


def test_soft_cap_alpha_is_zero_without_growth():
    assert soft_cap_alpha(1.0, 1.0) == 0.0
    assert soft_cap_alpha(1.0, 0.9) == 0.0


def test_soft_cap_of_a_step_that_decays_the_weights_to_zero():
    """λη = 1 and u = 0 (a step measured as zero) give k = 0: α is 0 (nothing can exceed σmax), in Python
    floats as on tensors, not a ZeroDivisionError; the decayed weights are zero and stay zero."""
    assert soft_cap_alpha(1.0, 0.0) == 0.0
    assert soft_cap_alpha(1.0, torch.zeros(2, dtype=torch.float64)).tolist() == [0.0, 0.0]
    w = torch.randn(6, 4)
    constrain_(w, "spectral_soft_cap", 1.0, lr=0.5, weight_decay=2.0, update_norm=0.0, spectral_wd=0.0)
    assert torch.count_nonzero(w) == 0


@pytest.mark.parametrize("kind,shape", ALL_CASES)
def test_soft_cap_acts_on_singular_values(kind, shape):
    step = dict(lr=0.1, weight_decay=0.0, update_norm=0.5)
    x = make_matrix(kind, shape)
    alpha = soft_cap_alpha(TOP, TOP + 0.5)
    y = apply("spectral_soft_cap", x, TOP, **step)
    torch.testing.assert_close(svdvals(y), soft_cap_scalar(svdvals(x), alpha), atol=1e-5 * TOP, rtol=0)
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    torch.testing.assert_close(y.double(), (u * soft_cap_scalar(s, alpha)) @ vh, atol=1e-5 * TOP, rtol=0)


@pytest.mark.parametrize("shape", [(96, 8), (8, 96), (3, 96, 8), (24, 24)])
def test_soft_cap_multiplies_the_long_side_twice(shape):
    """X·r(αXᵀX) over the smaller Gram matrix: 2 matmuls with X (2·m·n·s FLOPs each, s = min(m, n))
    and 2 of the Gram's size (2s³ each) per matrix, where the paper's two steps take 4 with X."""
    from torch.utils.flop_counter import FlopCounterMode

    x = make_matrix("random", shape[-2:]).expand(*shape).contiguous()
    *stack, m, n = shape
    count = math.prod(stack)
    with FlopCounterMode(display=False) as counter:
        apply("spectral_soft_cap", x, TOP, lr=0.1, weight_decay=0.0, update_norm=0.5)
    small = min(m, n)
    assert counter.get_total_flops() == count * (2 * (2 * m * n * small) + 2 * (2 * small ** 3))


def test_compiled_soft_cap_is_one_graph_for_every_alpha(monkeypatch):
    """compile: α enters the compiled polynomial as a tensor, so a new lr (a new α every step of a
    schedule) reuses the graph instead of recompiling; the result is the eager one. Backend aot_eager
    (the graph Dynamo captures, run by eager kernels; inductor's C++ build takes minutes here)."""
    import functools

    from lipflow.constraints import _compiled_soft_cap_polynomial

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    _compiled_soft_cap_polynomial.cache_clear()  # the wrapper is made once per process: with this backend
    x = torch.stack([make_matrix("random", (24, 8), seed) for seed in range(3)])
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for lr in (0.01, 0.02, 0.05, 0.1):
        step = dict(lr=lr, weight_decay=0.0, update_norm=lr)
        eager = apply("spectral_soft_cap", x, TOP, **step)
        compiled = apply("spectral_soft_cap", x, TOP, compiled=True, **step)
        torch.testing.assert_close(compiled, eager, atol=1e-6 * TOP, rtol=0)
        assert not torch.equal(eager, x)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before == 1
    torch._dynamo.reset()
    _compiled_soft_cap_polynomial.cache_clear()


def rms_operator_norm(w: torch.Tensor) -> float:
    fan_out, fan_in = w.shape
    return svdvals(w)[0].item() / math.sqrt(fan_out / fan_in)


@pytest.mark.parametrize("shape", SHAPES + [(64, 16)])
@pytest.mark.parametrize("sigma_max", [1.0, 2.0])
def test_soft_cap_fixed_point_under_aligned_update(shape, sigma_max):
    """A matrix at exactly σmax pushed along its own polar factor by u returns to σmax."""
    lr = update = 0.05
    scale = math.sqrt(shape[0] / shape[1])
    w = sigma_max * scale * msign(make_matrix("random", shape))
    w = w + lr * scale * msign(w)  # ΔX = u·msign(X): every singular value σmax → σmax + u
    assert rms_operator_norm(w) == pytest.approx(sigma_max + update, rel=1e-5)
    constrain_(w, "spectral_soft_cap", sigma_max, lr=lr, weight_decay=0.0, update_norm=update, spectral_wd=0.0)
    s = svdvals(w) / scale
    torch.testing.assert_close(s, torch.full_like(s, sigma_max), atol=1e-5 * sigma_max, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_soft_cap_keeps_sigma_max_over_50_steps(shape, weight_decay):
    """W ← W − η·s·msign(G) (RMS→RMS norm η) followed by the coupled soft cap stays ≤ σmax."""
    sigma_max, lr = 1.0, 0.05
    scale = math.sqrt(shape[0] / shape[1])
    gen = torch.Generator().manual_seed(1)
    w = sigma_max * scale * msign(torch.randn(shape, generator=gen))
    exceeded_before_cap = False
    for step in range(50):
        # gradients partly anti-aligned with W so the updates push the spectrum outwards
        g = torch.randn(shape, generator=gen) - (0.5 if step % 2 else 0.0) * w
        w = w - lr * scale * msign(g)
        exceeded_before_cap |= rms_operator_norm(w * (1 - lr * weight_decay)) > sigma_max * (1 + 1e-3)
        constrain_(w, "spectral_soft_cap", sigma_max, lr=lr, weight_decay=weight_decay, update_norm=lr,
                   spectral_wd=0.0)
        assert rms_operator_norm(w) <= sigma_max * (1 + 1e-3), f"step {step}"
    assert exceeded_before_cap  # the cap had work to do


# ----------------------------------------------------------------------------- constrain_


def test_constrain_applies_the_constraint_to_the_normalized_matrix():
    w = make_matrix("random", (96, 24)) * 5
    scale = math.sqrt(96 / 24)
    expected = spectral_cap_reference(w / scale, 1.5) * scale
    constrain_(w, "spectral_hard_cap", 1.5, lr=0.1, weight_decay=0.0, update_norm=0.0, spectral_wd=0.0)
    torch.testing.assert_close(w.double(), expected, atol=1e-5, rtol=0)
    assert rms_operator_norm(w) == pytest.approx(1.5, rel=1e-5)


def test_constrain_decays_before_projecting():
    w = make_matrix("gapped", (32, 96))
    lr, lam = 0.1, 0.5
    expected = spectral_cap_reference(w * (1 - lr * lam) / math.sqrt(32 / 96), 0.9) * math.sqrt(32 / 96)
    constrain_(w, "spectral_hard_cap", 0.9, lr=lr, weight_decay=lam, update_norm=0.0, spectral_wd=0.0)
    torch.testing.assert_close(w.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["none", "weight_decay"])
def test_identity_constraints_only_decay(name):
    w = make_matrix("random", (24, 40))
    original = w.clone()
    constrain_(w, name, 1.0, lr=0.1, weight_decay=0.0, update_norm=0.3, spectral_wd=0.2)
    assert torch.equal(w, original)
    constrain_(w, name, 1.0, lr=0.1, weight_decay=0.3, update_norm=0.3, spectral_wd=0.2)
    assert torch.equal(w, original * (1 - 0.1 * 0.3))


@pytest.mark.parametrize("name", ["spectral_soft_cap", "spectral_hard_cap", "spectral_normalize", "stiefel"])
def test_constrain_computes_in_float32_for_bf16_weights(name):
    w32 = (make_matrix("random", (48, 32)) * 2).bfloat16().float()
    w16 = w32.bfloat16()
    kwargs = dict(lr=0.05, weight_decay=0.1, update_norm=0.05, spectral_wd=0.0)
    constrain_(w32, name, 1.0, **kwargs)
    constrain_(w16, name, 1.0, **kwargs)
    assert w16.dtype == torch.bfloat16
    assert torch.equal(w16, w32.bfloat16())


def test_constrain_rejects_bad_input():
    w = torch.randn(8, 8)
    kwargs = dict(lr=0.1, weight_decay=0.0, update_norm=0.0, spectral_wd=0.0)
    with pytest.raises(UnknownNameError, match="did you mean 'spectral_soft_cap'"):
        constrain_(w, "spectral_softcap", 1.0, **kwargs)
    with pytest.raises(ValueError, match="sigma_max must be > 0"):
        constrain_(w, "stiefel", 0.0, **kwargs)
    with pytest.raises(ValueError, match="2-D weight"):
        constrain_(torch.randn(8), "stiefel", 1.0, **kwargs)


def test_constrain_works_inside_autograd_and_on_parameters():
    layer = torch.nn.Linear(16, 48, bias=False)
    with torch.no_grad():
        layer.weight.mul_(50)
    constrain_(layer.weight, "spectral_normalize", 1.0, lr=0.0, weight_decay=0.0, update_norm=0.0, spectral_wd=0.0)
    assert layer.weight.requires_grad
    assert rms_operator_norm(layer.weight.detach()) <= 1.0 + 1e-5


def test_soft_cap_alpha_is_the_same_number_for_a_float_and_a_tensor():
    ks = [0.5, 1.0, 1.0001, 1.05, 1.3, 2.0, 5.0]
    from_tensor = soft_cap_alpha(1.0, torch.tensor(ks, dtype=torch.float64))
    assert from_tensor.tolist() == [soft_cap_alpha(1.0, k) for k in ks]  # bit for bit: one bisection


def test_soft_cap_maps_the_decayed_reachable_sigma_exactly_to_sigma_max():
    """With weight decay, the soft cap's k is σmax(1 − λη) + u (its docstring): a singular value equal
    to that k ends at exactly σmax, and one at σmax + u (the no-decay k) is not the fixed point."""
    sigma_max, lr, wd, u = 1.0, 0.5, 0.2, 0.3  # λη = 0.1 → k = 0.9 + 0.3 = 1.2
    k = sigma_max * (1.0 - lr * wd) + u
    x = torch.diag(torch.tensor([k, 0.5], dtype=torch.float64))
    out = apply("spectral_soft_cap", x, sigma_max, lr=lr, weight_decay=wd, update_norm=u)
    s = svdvals(out)
    assert s[0].item() == pytest.approx(sigma_max, abs=1e-9)
    # closed form on the other singular value: σ(1 − 3t² + 3t³ − t⁴), t = ασ², α from k
    alpha = soft_cap_alpha(sigma_max, k)
    t = alpha * 0.5 ** 2
    assert s[1].item() == pytest.approx(0.5 * (1 - 3 * t ** 2 + 3 * t ** 3 - t ** 4), abs=1e-12)
