"""Weight constraints (registry ``constraint``), applied after every optimizer step.

Source: Newhouse, Hess, Cesista, Zahorodnii, Bernstein, Isola 2025, "Training Transformers with
Enforced Lipschitz Bounds" and Modula's ``Linear.project``. A constraint is a pure map on the
normalized matrix X = W/s, s = √(fan_out/fan_in), for W of shape (fan_out, fan_in), so the
spectral norm of X is the RMS→RMS operator norm of W and σ_max is a bound on that norm:

    constraint(X, sigma_max, step=StepContext(...)) -> new X

``constrain_all_`` runs right after the optimizer's step: decay, then project — dividing by s
before and multiplying by s after, in float32. (Modula decays before the step; the two orders differ
by O(λη²), see ``constrain_all_``.)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from lipflow.registry import Registry


@dataclass(frozen=True)
class StepContext:
    """What a constraint may need to know about the optimizer step it follows.

    lr: η of this parameter's step; weight_decay: λ of the decoupled decay (1 − λη);
    update_norm: u, a bound on the step's RMS→RMS norm (= the spectral norm of ΔX);
    spectral_wd: λ of spectral weight decay; compiled: run the matmul chain compiled.
    """

    lr: float = 0.0
    weight_decay: float = 0.0
    update_norm: float | Tensor = 0.0
    spectral_wd: float = 0.0
    compiled: bool = False  # the soft cap's matmul chain through torch.compile (config key compile)


Constraint = Callable[..., Tensor]  # (X, sigma_max, *, step: StepContext) -> X
CONSTRAINTS: Registry[Constraint] = Registry("constraint")

SPECTRAL_NORM_RTOL = 1e-3  # relative accuracy of spectral_norm_bound


# ----------------------------------------------------------------------------- linear algebra


def squaring_divisor(g: Tensor, dim: int | None = None) -> Tensor:
    """Per slice of ``g`` along ``dim`` (all of g when None): its largest |entry| where that lies outside
    [tiny^¼, max^¼] of g's dtype, else 1, so that g/divisor is g bit for bit in that range.

    Norms are scale-covariant, ‖g‖₂ = s·‖g/s‖₂, but torch squares the entries unscaled: in float32 the
    squares of entries ≤ 2.6e-23 (a momentum decayed a few hundred steps without gradient) underflow and
    ‖g‖₂ = 0; those of entries ≥ 1.8e19 overflow and ‖g‖₂ = inf, so g/‖g‖₂ is 0. Within the range every
    square and every sum of up to 1/√tiny of them is a normal number."""
    if g.numel() == 0:
        return g.new_ones(())
    finfo = torch.finfo(g.dtype)
    peak = g.abs().amax() if dim is None else g.abs().amax(dim=dim, keepdim=True)
    within = (peak >= finfo.tiny ** 0.25) & (peak <= finfo.max ** 0.25)
    return torch.where(within | (peak == 0), torch.ones_like(peak), peak)


def _svd_of_finite(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(U, Σ, Vᵀ, finite): the thin SVD of each matrix of a stack (…, m, n), a matrix with a non-finite
    entry decomposed as the zero matrix (torch's SVD of it raises), and ``finite`` (…, 1, 1) saying
    which matrices had none, so that a caller returns NaN (or X itself) for the others: a diverged
    step stays non-finite and the run ends as diverged instead of raising. No host sync."""
    finite = torch.isfinite(x).all(dim=-1, keepdim=True).all(dim=-2, keepdim=True)
    u, s, vh = torch.linalg.svd(torch.where(finite, x, 0.0), full_matrices=False)
    return u, s, vh, finite


def msign(x: Tensor) -> Tensor:
    """Exact matrix sign (polar factor) U Vᵀ of X = U Σ Vᵀ, by SVD (X may be a stack (…, m, n)).

    Directions with σ ≤ max(m, n)·eps·σ₁ (numerically zero) map to 0, as Newton–Schulz would,
    so a zero or low-rank input gives a zero or low-rank output; a non-finite input gives NaN.
    """
    u, s, vh, finite = _svd_of_finite(x)
    keep = s > s[..., :1] * (max(x.shape[-2:]) * torch.finfo(x.dtype).eps)
    return torch.where(finite, (u * keep.unsqueeze(-2).to(u.dtype)) @ vh, math.nan)


def _gram_squarings(n: int) -> int:
    """Squarings J with n^(1/2^(J+1)) ≤ 1 + SPECTRAL_NORM_RTOL (the Schatten bound's worst slack)."""
    if n == 1:
        return 0
    return max(0, math.ceil(math.log2(math.log(n) / math.log1p(SPECTRAL_NORM_RTOL))) - 1)


def _gram_power(x: Tensor) -> tuple[Tensor, Tensor]:
    """Block power iteration from the identity: P ∝ G^(2^J) for the smaller Gram matrix G of X.

    Returns (P, log B) with P = G^(2^J) normalized to a bounded scale and
    B = tr(G^(2^J))^(1/2^(J+1)) = ‖X‖_{S_p}, the Schatten-p norm of X for p = 2^(J+1).
    σ₁ ≤ B ≤ n^(1/p)·σ₁, so B is a certified upper bound on σ₁ within SPECTRAL_NORM_RTOL.
    Each squaring is divided by its trace t_j, and log B = log tr(G_J)/2^(J+1) + Σ_j log t_j/2^(j+1),
    so nothing overflows and every trace stays ≥ 1/n.
    """
    g = x.mT @ x if x.shape[-2] >= x.shape[-1] else x @ x.mT
    squarings = _gram_squarings(g.shape[-1])
    tiny = torch.finfo(g.dtype).tiny
    log_bound = torch.zeros(g.shape[:-2], dtype=g.dtype, device=g.device)
    for j in range(squarings):
        trace = _trace(g).clamp_min(tiny)
        log_bound = log_bound + torch.log(trace) / 2 ** (j + 1)
        h = g / trace[..., None, None]
        g = h @ h
    log_bound = log_bound + torch.log(_trace(g)) / 2 ** (squarings + 1)
    return g, log_bound


def _trace(g: Tensor) -> Tensor:
    return torch.diagonal(g, dim1=-2, dim2=-1).sum(-1)


def spectral_norm_bound(x: Tensor) -> Tensor:
    """Upper bound B on σ₁(X) with σ₁ ≤ B ≤ (1 + 1e-3)·σ₁ (Schatten norm via block power iteration);
    one per matrix of a stack (…, m, n), in X's dtype. The iteration runs in float64 and B is rounded
    up into X's dtype: in float32 arithmetic B fell below σ₁ by up to 6e-7 relative."""
    exact = torch.exp(_gram_power(x.double())[1])
    bound = exact.to(x.dtype)
    return torch.where(bound.double() < exact, torch.nextafter(bound, torch.full_like(bound, math.inf)), bound)


def top_singular_triplet(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(σ₁, u₁, v₁) by power iteration.

    Starts from the column of P ∝ (XᵀX)^(2^J) with the largest diagonal entry (P's columns are
    2^J power-iteration steps from every basis vector; that one has |⟨e_k, v₁⟩| ≥ 1/√n up to
    the gap) and applies P once more; σ₁ = ‖Xv₁‖ is the Rayleigh quotient. A zero matrix gives zeros.
    """
    tiny = torch.finfo(x.dtype).tiny
    p, _ = _gram_power(x)
    w = p @ p[:, torch.argmax(torch.diagonal(p))]
    w = w / w.norm().clamp_min(tiny)
    if x.shape[0] >= x.shape[1]:  # P came from XᵀX: w is a right singular vector
        xv = x @ w
        sigma = xv.norm()
        return sigma, xv / sigma.clamp_min(tiny), w
    xtu = x.mT @ w
    sigma = xtu.norm()
    return sigma, w, xtu / sigma.clamp_min(tiny)


SOFT_CAP_MAX_GROWTH = 81.0 / 62.0  # k/σmax up to which the soft cap's guarantee holds (t ≤ 1/3)


def soft_cap_alpha(sigma_max: float, k: float | Tensor) -> float | Tensor:
    """Smallest α ≥ 0 with p₂(p₁(k)) = σmax for p₁(x) = x − αx³, p₂(x) = x + αx³.

    Newhouse et al. 2025, Thm 3.1: α is a root of −k⁹α⁴ + 3k⁷α³ − 3k⁵α² + (k − σmax) = 0.
    With t = αk² this reads t⁴ − 3t³ + 3t² = 1 − σmax/k, whose left side increases from 0 to 1
    on [0, 1]; so for k > σmax the root is unique in (0, 1) and found by bisection (60 halvings,
    float64). For k ≤ σmax nothing can exceed σmax and α = 0. For k = σmax(1−λη) + u, the largest
    singular value one step can reach, σmax is a fixed point; p₂∘p₁ is increasing on [0, k] while
    t ≤ 1/3, i.e. k ≤ (81/62)·σmax = 1.3065·σmax (``SOFT_CAP_MAX_GROWTH``), so then every singular
    value ≤ k ends ≤ σmax. ``k`` may be a tensor (one α per entry, computed where it lives).
    """
    if isinstance(k, Tensor):
        k = k.double()
        target = (1.0 - sigma_max / k).clamp_min(0.0)
        lo, hi, select = torch.zeros_like(k), torch.ones_like(k), torch.where
    elif k <= sigma_max:  # also k = 0 (λη = 1, u = 0), where σmax/k would divide by zero
        return 0.0
    else:  # Python floats (also float64): no tensor work per step
        target = 1.0 - sigma_max / k
        lo, hi, select = 0.0, 1.0, lambda below, a, b: a if below else b
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        below = mid * mid * (3.0 - 3.0 * mid + mid * mid) < target
        lo, hi = select(below, mid, lo), select(below, hi, mid)
    alpha = 0.5 * (lo + hi) / (k * k)
    return select(k > sigma_max, alpha, torch.zeros_like(k) if isinstance(k, Tensor) else 0.0)


def _per_matrix(constraint: Constraint) -> Constraint:
    """Apply a constraint written for one matrix to each matrix of a stack (…, m, n)."""
    @functools.wraps(constraint)
    def each(x: Tensor, sigma_max: float, *, step: StepContext) -> Tensor:
        if x.ndim == 2:
            return constraint(x, sigma_max, step=step)
        return torch.stack([each(m, sigma_max, step=step) for m in x.unbind(0)])
    return each


# ----------------------------------------------------------------------------- constraints


@CONSTRAINTS.register("none")
@CONSTRAINTS.register("weight_decay")
def unconstrained(x: Tensor, sigma_max: float, *, step: StepContext) -> Tensor:
    """Identity. ``weight_decay`` is this map plus the decoupled decay that ``constrain_`` applies
    for every constraint whenever weight_decay > 0. Under Muon with update_scale sqrt_fan_ratio, whose
    steps have RMS→RMS norm ≤ η·peak (Newton–Schulz's peak: 1.2024 for Jordan's coefficients, 0.99933
    for You's; the speedrun scale multiplies it by max(1, √(fan_in/fan_out))), step then decay
    leaves ‖W‖_RMS→RMS ≤ x* = (1 − λη)·peak/λ in equilibrium (x* = (1 − λη)(x* + η·peak))."""
    return x


@CONSTRAINTS.register("spectral_weight_decay")
@_per_matrix
def spectral_weight_decay(x: Tensor, sigma_max: float, *, step: StepContext) -> Tensor:
    """X − λσ₁u₁v₁ᵀ with λ = spectral_wd (not coupled to η, as in the reference code)."""
    sigma, u, v = top_singular_triplet(x)
    return x - (step.spectral_wd * sigma) * torch.outer(u, v)


@CONSTRAINTS.register("spectral_normalize")
def spectral_normalize(x: Tensor, sigma_max: float, *, step: StepContext) -> Tensor:
    """X / max(1, σ₁/σmax), with σ₁ from the certified bound: afterwards σ₁ ≤ σmax, and ≥ σmax/(1+1e-3)
    when X was scaled down."""
    return x / torch.clamp(spectral_norm_bound(x) / sigma_max, min=1.0)[..., None, None]


@CONSTRAINTS.register("spectral_hammer")
@_per_matrix
def spectral_hammer(x: Tensor, sigma_max: float, *, step: StepContext) -> Tensor:
    """X + (σmax − σ₁)u₁v₁ᵀ: sets the top singular value to σmax (Hess & Hutchison; no guarantee,
    the other singular values may exceed σmax)."""
    sigma, u, v = top_singular_triplet(x)
    return x + (sigma_max - sigma) * torch.outer(u, v)


def soft_cap_polynomial(x: Tensor, alpha: Tensor) -> Tensor:
    """X − X·E, E = H²(3I − 3H + H²), H = αXᵀX (E·X and H = αXXᵀ for a wide X): σ ↦ σ(1 − 3t² + 3t³ − t⁴),
    t = ασ², on every singular value. ``alpha`` is a tensor in x's dtype (0-d, or (…, 1, 1) for one α
    per matrix of a stack), so a compiled form serves every step whatever α."""
    tall = x.shape[-2] >= x.shape[-1]
    h = alpha * (x.mT @ x if tall else x @ x.mT)
    h2 = h @ h
    e = 3.0 * h2 + h2 @ (h2 - 3.0 * h)
    return x - (x @ e if tall else e @ x)


@functools.cache
def _compiled_soft_cap_polynomial() -> Callable[[Tensor, Tensor], Tensor]:
    """``soft_cap_polynomial`` through torch.compile, wrapped once per process (a graph per stack shape)."""
    return torch.compile(soft_cap_polynomial, dynamic=False)


@CONSTRAINTS.register("spectral_soft_cap")
def spectral_soft_cap(x: Tensor, sigma_max: float, *, step: StepContext) -> Tensor:
    """σ ↦ p₂(p₁(σ)) on every singular value, p₁(σ) = σ − ασ³, p₂(σ) = σ + ασ³ (Newhouse et al. 2025,
    Thm 3.1: M ← M(I − αMᵀM), then M ← M(I + αMᵀM)).

    α = soft_cap_alpha(σmax, k) with k = σmax(1 − λη) + u, so σmax is a fixed point of one
    decay-step-project. The two steps compose to one polynomial of the Gram matrix: with t = ασ²,
    p₂(p₁(σ)) = σ(1 − 3t² + 3t³ − t⁴) (``soft_cap_polynomial``). Two matmuls with X itself and two of
    the smaller Gram's size, where the two steps take four with X: about half the work on a very tall
    matrix (GPT-2's head: 0.51×), 0.62× on a 4:1 MLP matrix, the same on a square one.
    ``step.update_norm`` may be a tensor with one u per matrix of the stack (α is then solved on the
    device, per matrix).
    """
    k = sigma_max * (1.0 - step.lr * step.weight_decay) + step.update_norm
    alpha = soft_cap_alpha(sigma_max, k)
    if isinstance(alpha, Tensor):
        alpha = alpha.to(x.dtype)[..., None, None]
    elif alpha == 0.0:
        return x
    else:  # a fill on the device, no host→device copy
        alpha = torch.full((), alpha, dtype=x.dtype, device=x.device)
    polynomial = _compiled_soft_cap_polynomial() if step.compiled else soft_cap_polynomial
    return polynomial(x, alpha)


@CONSTRAINTS.register("spectral_hard_cap")
def spectral_hard_cap(x: Tensor, sigma_max: float, *, step: StepContext) -> Tensor:
    """U min(Σ, σmax) Vᵀ exactly (SVD), rebuilt from the clamped spectrum so σ₁ ends at σmax to
    rounding whatever σ₁ was (subtracting U relu(Σ − σmax) Vᵀ instead leaves a cancellation error
    ∝ σ₁: 1.008·σmax at σ₁ = 10⁴·σmax in fp32); matrices already within the cap are returned
    untouched, and so are non-finite ones (a diverged step stays diverged). Replaces the paper's
    four-quintic approximation, which fails for σ > 3.5·σmax."""
    u, s, vh, finite = _svd_of_finite(x)
    capped = (u * s.clamp(max=sigma_max).unsqueeze(-2)) @ vh
    within = (s[..., 0] <= sigma_max)[..., None, None]
    return torch.where(within | ~finite, x, capped)


@CONSTRAINTS.register("stiefel")
def stiefel(x: Tensor, sigma_max: float, *, step: StepContext) -> Tensor:
    """σmax·msign(X): every (nonzero) singular value set to σmax (Modula's ``orthogonal``)."""
    return sigma_max * msign(x)


# ----------------------------------------------------------------------------- in-place driver


@torch.no_grad()
def constrain_(weight: Tensor, name: str, sigma_max: float, *, lr: float, weight_decay: float,
               update_norm: float, spectral_wd: float) -> None:
    """Decay and project one weight in place, right after the optimizer's step (``constrain_all_``
    for one matrix)."""
    if weight.ndim != 2:
        raise ValueError(f"constraint '{name}' needs a 2-D weight (fan_out, fan_in), got shape {tuple(weight.shape)}")
    constrain_all_([weight], name, sigma_max, lr=lr, weight_decay=weight_decay, update_norm=update_norm,
                   spectral_wd=spectral_wd)


@torch.no_grad()
def constrain_all_(weights: list[Tensor], name: str, sigma_max: float, *, lr: float, weight_decay: float,
                   update_norm: float | Tensor, spectral_wd: float, compiled: bool = False) -> None:
    """Decay and project same-shape weights in place, as one stack, right after the optimizer's step.

    W ← (1 − λη)W, then W ← s·constraint(W/s), s = √(fan_out/fan_in), all in float32 whatever the
    weights' dtype, one batched matmul chain for the whole stack. The decay comes after the step
    here (Modula decays first); the weights differ by O(λη²) and k = σmax(1−λη) + u still bounds
    (σmax + u)(1−λη), so the soft cap's guarantee holds. ``lr`` is the weights' learning rate,
    ``update_norm`` their step's RMS→RMS bound: one float, or a tensor with one per weight;
    ``compiled``: the constraint's matmul chain through torch.compile (the soft cap's). The float32
    result is rounded into the weights' dtype: a bf16 matrix can end above σmax by that rounding
    (measured up to 1.3e-3 relative on small matrices after the soft cap), so the bounds hold in
    float32 weights only.
    """
    project = CONSTRAINTS.get(name)
    if not sigma_max > 0:
        raise ValueError(f"sigma_max must be > 0, got {sigma_max}")
    shapes = {tuple(w.shape) for w in weights}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"constraint '{name}' needs 2-D weights of one shape, got shapes {sorted(shapes)}")
    decay = 1.0 - lr * weight_decay
    if project is unconstrained:  # no float32 round trip for the identity
        if decay != 1.0:
            torch._foreach_mul_(weights, decay)
        return
    fan_out, fan_in = weights[0].shape
    scale = math.sqrt(fan_out / fan_in)
    step = StepContext(lr=lr, weight_decay=weight_decay, update_norm=update_norm, spectral_wd=spectral_wd,
                       compiled=compiled)
    x = torch.stack([w.float() for w in weights]) * (decay / scale)
    projected = project(x, sigma_max, step=step) * scale
    for w, new in zip(weights, projected.unbind(0)):
        w.copy_(new)
