"""Closed forms and optimal baselines for in-context linear regression (Ahn et al. 2023).

Notation: x ~ N(0, Σ), w ~ N(0, Ω), y = ⟨w, x⟩ + σε; with n context examples,
S = (1/n) Σ_i x_i x_iᵀ, c = (1/n) Σ_i y_i x_i and R(w) = (1/2n) Σ_i (wᵀx_i − y_i)², ∇R = S w − c.

One layer (Thm 1, generalised to any Ω and noise; derivation in the docstrings below):
    the best predictor x_qᵀ Γ c has Γ⋆ = Ω Σ K⁻¹, K = (n+1)/n ΣΩΣ + (tr(ΩΣ) + σ²)/n Σ,
    which is ((n+1)/n Σ + tr Σ/n I)⁻¹ for Ω = I and n/(n+d+1+σ²) Σ⁻¹ for Ω = Σ⁻¹.

L steps of GD with preconditioner M and step sizes a_ℓ (w_{ℓ+1} = w_ℓ − a_ℓ M ∇R(w_ℓ), w₀ = 0)
leave the error polynomial p(s) = Π_ℓ (1 − a_ℓ s) = Σ_k c_k s^k of S_M = M^{1/2} S M^{1/2}, and the
expected loss is the quadratic form cᵀ H c + σ² with, for Σ_M = M^{1/2}ΣM^{1/2}, Ω_M = M^{-1/2}ΩM^{-1/2},
    H_jk = E tr(S_M^j Σ_M S_M^k Ω_M) + (σ²/n) [j,k ≥ 1] E tr(S_M^{j-1} Σ_M S_M^{k-1} S_M).
The expectation over x is taken by Monte Carlo over S; w, the query and the noise are exact.
The best p with p(0) = 1 is c = H⁻¹e₀ / (e₀ᵀH⁻¹e₀) (a kernel polynomial), whose inverse roots
are the optimal per-step sizes (Thm 3: the sparse L-layer optimum for Ω = Σ⁻¹, M = Σ⁻¹).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from lipflow.studies.icl.data import Prompts, PromptSampler, spd_power
from lipflow.registry import Registry


def one_step_moment(sigma: torch.Tensor, w_cov: torch.Tensor, n: int, noise_std: float):
    """K = E[c cᵀ] = (n+1)/n ΣΩΣ + (tr(ΩΣ) + σ²)/n Σ (Gaussian fourth moments)."""
    sws = sigma @ w_cov @ sigma
    return (n + 1) / n * sws + (torch.trace(w_cov @ sigma) + noise_std**2) / n * sigma


def optimal_preconditioner(sigma, w_cov, n: int, noise_std: float = 0.0) -> torch.Tensor:
    """Γ⋆ = Ω Σ K⁻¹ minimises f(Γ) (set ∇_Γ f = 2ΣΓK − 2ΣΩΣ to zero)."""
    k = one_step_moment(sigma, w_cov, n, noise_std)
    return torch.linalg.solve(k, w_cov @ sigma, left=False)


def one_step_loss(gamma, sigma, w_cov, n: int, noise_std: float = 0.0) -> float:
    """f(Γ) = E(x_qᵀΓc − y_q)² = tr(ΣΓKΓᵀ) − 2 tr(ΣΓΣΩ) + tr(ΣΩ) + σ²."""
    k = one_step_moment(sigma, w_cov, n, noise_std)
    value = (
        torch.trace(sigma @ gamma @ k @ gamma.T)
        - 2 * torch.trace(sigma @ gamma @ sigma @ w_cov)
        + torch.trace(sigma @ w_cov)
        + noise_std**2
    )
    return float(value)


def preconditioned_gd(prompts: Prompts, preconditioners: torch.Tensor) -> torch.Tensor:
    """Query predictions x_qᵀ w_L of w_{ℓ+1} = w_ℓ − Γ_ℓ (S w_ℓ − c), w₀ = 0; Γ (L, d, d)."""
    x, y = prompts.context_x, prompts.context_y
    n = x.shape[1]
    s = x.transpose(1, 2) @ x / n
    c = (x.transpose(1, 2) @ y.unsqueeze(-1)).squeeze(-1) / n
    w = torch.zeros_like(c)
    for gamma in preconditioners.to(x):
        grad = (s @ w.unsqueeze(-1)).squeeze(-1) - c
        w = w - grad @ gamma.T
    return (prompts.query_x * w).sum(-1)


def least_squares(prompts: Prompts) -> torch.Tensor:
    """Query predictions of the minimum-norm least-squares fit w = X⁺y to the n examples."""
    w = torch.linalg.pinv(prompts.context_x) @ prompts.context_y.unsqueeze(-1)
    return (prompts.query_x * w.squeeze(-1)).sum(-1)


def regression_optimum(
    sampler: PromptSampler, prompts: int, generator: torch.Generator, chunk: int = 50_000
) -> torch.Tensor:
    """Empirical one-layer optimum Γ̂: least squares of y_q on the features vec(x_q cᵀ).

    The sparse one-layer model predicts x_qᵀΓc = ⟨Γ, x_q cᵀ⟩, so this regression is its exact
    empirical risk minimiser (no training); Γ̂ → Γ⋆ as the number of prompts grows.
    """
    d = sampler.sigma.d
    gram = torch.zeros(d * d, d * d, dtype=torch.float64, device=sampler.device)
    moment = torch.zeros(d * d, dtype=torch.float64, device=sampler.device)
    for start in range(0, prompts, chunk):
        batch = sampler.sample(min(chunk, prompts - start), generator, torch.float64)
        c = (batch.context_x.transpose(1, 2) @ batch.context_y.unsqueeze(-1)).squeeze(-1)
        features = (batch.query_x.unsqueeze(-1) * c.unsqueeze(-2) / batch.n).flatten(1)
        gram += features.T @ features
        moment += features.T @ batch.query_y
    return torch.linalg.solve(gram, moment).reshape(d, d).cpu()


# ---------------------------------------------------------------- step-size theory


def error_polynomial(step_sizes: torch.Tensor) -> torch.Tensor:
    """Coefficients c_0..c_L of p(s) = Π_ℓ (1 − a_ℓ s) (differentiable in a)."""
    coeffs = torch.ones(1, dtype=step_sizes.dtype)
    for a in step_sizes:
        shifted = torch.cat([torch.zeros(1, dtype=coeffs.dtype), coeffs])
        coeffs = torch.cat([coeffs, torch.zeros(1, dtype=coeffs.dtype)]) - a * shifted
    return coeffs


def lbfgs_minimum(loss: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, max_iter: int,
                  tolerance_grad: float) -> torch.Tensor:
    """A local minimum of ``loss`` reached from ``start`` by L-BFGS with a strong-Wolfe line search."""
    x = start.detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([x], max_iter=max_iter, tolerance_grad=tolerance_grad,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = loss(x)
        value.backward()
        return value

    optimizer.step(closure)
    return x.detach()


@dataclass(frozen=True)
class StepSizeProblem:
    """The quadratic form H (degree ≤ max_layers) of L-step GD with preconditioner M."""

    hessian: torch.Tensor  # (max_layers+1, max_layers+1), float64
    noise_var: float

    @classmethod
    def estimate(
        cls,
        sampler: PromptSampler,
        preconditioner: torch.Tensor,
        max_layers: int,
        samples: int,
        generator: torch.Generator,
        chunk: int = 20_000,
    ) -> "StepSizeProblem":
        """Monte-Carlo H over ``samples`` draws of the context covariance S."""
        sigma, w_cov = sampler.sigma.matrix, sampler.w_cov
        root, inv_root = spd_power(preconditioner, 0.5), spd_power(preconditioner, -0.5)
        sigma_m = (root @ sigma @ root).to(sampler.device)
        w_cov_m = (inv_root @ w_cov @ inv_root).to(sampler.device)
        root = root.to(sampler.device)
        size = max_layers + 1
        signal = torch.zeros(size, size, dtype=torch.float64, device=sampler.device)
        noise = torch.zeros_like(signal)
        for start in range(0, samples, chunk):
            x = sampler.sample(min(chunk, samples - start), generator, torch.float64).context_x
            s_m = root @ (x.transpose(1, 2) @ x / sampler.n) @ root
            powers = [torch.eye(sampler.sigma.d, dtype=torch.float64, device=sampler.device)]
            for _ in range(max_layers):
                powers.append(powers[-1] @ s_m)
            powers = torch.stack([p.expand_as(s_m) for p in powers], 1)  # (B, L+1, d, d)
            left = powers @ sigma_m  # S^j Σ_M
            signal += torch.einsum("zjab,zkbc,ca->jk", left, powers, w_cov_m)
            noise[1:, 1:] += torch.einsum(
                "zjab,zkbc,zca->jk", left[:, :-1], powers[:, :-1], s_m
            )
        hessian = (signal + sampler.noise_std**2 / sampler.n * noise) / samples
        return cls(((hessian + hessian.T) / 2).cpu(), sampler.noise_std**2)

    def loss(self, step_sizes: torch.Tensor) -> torch.Tensor:
        """Expected query loss cᵀHc + σ² of the step sizes a (L,)."""
        c = error_polynomial(step_sizes.to(torch.float64))
        h = self.hessian[: c.numel(), : c.numel()]
        return c @ h @ c + self.noise_var

    def optimal_constant(self, n_layers: int) -> torch.Tensor:
        """Best constant step a_ℓ = η: the loss is a polynomial in η, minimised at a root of
        its derivative (the loss grows like η^{2L}, so the minimum is a critical point)."""
        binom = torch.tensor(
            [math.comb(n_layers, k) * (-1) ** k for k in range(n_layers + 1)], dtype=torch.float64
        )
        h = self.hessian[: n_layers + 1, : n_layers + 1] * torch.outer(binom, binom)
        poly = np.zeros(2 * n_layers + 1)  # coefficients of η^m
        for j in range(n_layers + 1):
            for k in range(n_layers + 1):
                poly[j + k] += float(h[j, k])
        critical = np.polynomial.polynomial.polyroots(np.polynomial.polynomial.polyder(poly))
        candidates = [r.real for r in critical if abs(r.imag) < 1e-9 and r.real > 0]
        best = min(candidates, key=lambda eta: np.polynomial.polynomial.polyval(eta, poly))
        return torch.full((n_layers,), best, dtype=torch.float64)

    def optimal_per_step(self, n_layers: int) -> torch.Tensor:
        """Best per-step sizes: inverse roots of the kernel polynomial c ∝ H⁻¹e₀, refined by
        L-BFGS over real a (a no-op when the roots are real; needed if some are complex)."""
        h = self.hessian[: n_layers + 1, : n_layers + 1]
        coeffs = torch.linalg.solve(h, torch.eye(n_layers + 1, dtype=torch.float64)[0])
        roots = np.polynomial.polynomial.polyroots((coeffs / coeffs[0]).numpy())
        start = torch.tensor(np.sort(1.0 / roots.real), dtype=torch.float64)
        return lbfgs_minimum(self.loss, start, max_iter=200, tolerance_grad=1e-14).sort().values


# ---------------------------------------------------------------- baselines


@dataclass(frozen=True)
class TheoryContext:
    """What every baseline needs: the test prompts, Σ⁻¹ and the two step-size problems."""

    test: Prompts
    sigma_inverse: torch.Tensor
    pgd: StepSizeProblem  # M = Σ⁻¹
    gd: StepSizeProblem  # M = I


@dataclass(frozen=True)
class BaselineResult:
    step_sizes: list[float]  # sorted ascending; empty for least squares
    preconditioners: torch.Tensor  # (L, d, d): a_ℓ M, in the order of step_sizes
    predictions: torch.Tensor  # on the test prompts
    expected_loss: float | None  # cᵀHc + σ² (population value of the step sizes)


def _gd_result(problem: StepSizeProblem, steps: torch.Tensor, test: Prompts, m: torch.Tensor):
    preconditioners = steps[:, None, None] * m
    return BaselineResult(
        steps.tolist(),
        preconditioners,
        preconditioned_gd(test, preconditioners),
        float(problem.loss(steps)),
    )


BASELINES: Registry[Callable[[TheoryContext, int], BaselineResult]] = Registry("icl baseline")


@BASELINES.register("pgd")
def _pgd(ctx: TheoryContext, n_layers: int) -> BaselineResult:
    """L steps of Σ⁻¹-preconditioned GD with optimal per-step sizes (Thm 3)."""
    return _gd_result(ctx.pgd, ctx.pgd.optimal_per_step(n_layers), ctx.test, ctx.sigma_inverse)


@BASELINES.register("pgd_constant")
def _pgd_constant(ctx: TheoryContext, n_layers: int) -> BaselineResult:
    """L steps of Σ⁻¹-preconditioned GD with the best constant step size."""
    return _gd_result(ctx.pgd, ctx.pgd.optimal_constant(n_layers), ctx.test, ctx.sigma_inverse)


@BASELINES.register("gd")
def _gd(ctx: TheoryContext, n_layers: int) -> BaselineResult:
    """L steps of plain GD with the best constant step size."""
    eye = torch.eye(ctx.sigma_inverse.shape[0], dtype=torch.float64)
    return _gd_result(ctx.gd, ctx.gd.optimal_constant(n_layers), ctx.test, eye)


@BASELINES.register("least_squares")
def _least_squares(ctx: TheoryContext, n_layers: int) -> BaselineResult:
    """Minimum-norm least squares on the n examples (independent of L)."""
    d = ctx.sigma_inverse.shape[0]
    return BaselineResult([], torch.empty(0, d, d), least_squares(ctx.test), None)


# ---------------------------------------------------------------- matrix metrics


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    """‖A − B‖_F / ‖B‖_F."""
    return float(torch.linalg.norm(estimate - reference) / torch.linalg.norm(reference))


def sigma_weighted_error(estimate, reference, sigma: torch.Tensor) -> float:
    """‖Σ^{1/2}(A − B)Σ^{1/2}‖_F / ‖Σ^{1/2} B Σ^{1/2}‖_F (error in whitened coordinates)."""
    root = spd_power(sigma, 0.5)
    return relative_error(root @ estimate @ root, root @ reference @ root)


def distance_to_identity(matrix: torch.Tensor) -> float:
    """Dist(M, I) = min_α ‖M − αI‖_F / ‖M‖_F, attained at α = tr(M)/d (Ahn et al. §4.3)."""
    alpha = torch.trace(matrix) / matrix.shape[0]
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype)
    return float(torch.linalg.norm(matrix - alpha * eye) / torch.linalg.norm(matrix))


def step_size(gamma: torch.Tensor, sigma: torch.Tensor) -> float:
    """a = tr(ΣΓ)/d: the scale of Γ ≈ a Σ⁻¹ (the α of Dist(Σ^{1/2}ΓΣ^{1/2}, I))."""
    return float(torch.trace(sigma @ gamma) / gamma.shape[0])
