"""Sharpness: the Hessian of the training loss on one fixed batch, through Hessian-vector products.

Hv = ∇_θ(∇_θ L · v) (Pearlmutter 1994): one backward with ``create_graph=True`` builds the gradient
graph once, and each product is one more backward through it (PyHessian's single-batch mode).
Built on that operator:

- ``power_iteration``: the eigenvalue of largest |λ| (the sharpness evaluation's
  ``top_hessian_eigenvalue``, measured like PyHessian, which Noci et al. 2024 use: stop when
  |Δλ| < tol·(|λ| + 1e-6)), optionally warm-started from a previous eigenvector; with
  ``precondition`` = diag(P⁻¹) the same for P⁻¹H, computed as the similar symmetric matrix
  P^{-½} H P^{-½};
- ``largest_eigenvalue``: λ_max itself, the largest signed eigenvalue (of H or of P⁻¹H), the top Ritz
  value of a Lanczos run: the sharpness logged during training (``sharpness_every``), which an
  edge-of-stability threshold bounds;
- ``adam_preconditioner``: Adam's P⁻¹ = η/((1 − β₁ᵗ)(√v̂ + ε)) per coordinate, read from the optimizer state
  (the *preconditioned sharpness* λ_max(P⁻¹H) of Cohen et al. 2022, "Adaptive gradient methods at
  the edge of stability", which Noci et al. report for Adam; stable below (2 + 2β₁)/(1 − β₁));
- ``lanczos_topk``: the k largest eigenvalues from a Lanczos tridiagonalisation with full
  reorthogonalisation (``lanczos_ritz_pairs``: Ritz values of T_m and their residuals; memory m × #params);
- ``hutchinson_trace``: tr H ≈ mean of vᵀHv over Rademacher v (Hutchinson 1989), with the
  standard error of that mean.

Attention runs on SDPA's math backend and autocast is off while the graph is built: fused attention
kernels are not twice differentiable, and bf16 would corrupt the second derivative.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lipflow.evaluation import EVALUATIONS, EvalContext
from lipflow.metrics import loss_and_correct

LossFn = Callable[[], torch.Tensor]


@contextlib.contextmanager
def _twice_differentiable(device: torch.device) -> Iterator[None]:
    with sdpa_kernel([SDPBackend.MATH]), torch.autocast(device.type, enabled=False):
        yield


class HessianOperator:
    """v ↦ Hv for the Hessian of ``loss_fn()`` w.r.t. ``params`` at their current values; with
    ``precondition`` = d (flat, positive), v ↦ D^{½} H D^{½} v for D = diag(d), whose eigenvalues
    are those of DH.

    Vectors are flat float32 tensors of length ``dim`` = Σ numel(p), in ``params`` order.
    """

    def __init__(self, loss_fn: LossFn, params: Sequence[torch.Tensor],
                 precondition: torch.Tensor | None = None):
        self.params = list(params)
        if not self.params:
            raise ValueError("sharpness: no parameters to differentiate")
        self.device = self.params[0].device
        self.dim = sum(p.numel() for p in self.params)
        if precondition is not None and precondition.shape != (self.dim,):
            raise ValueError(f"sharpness: preconditioner has shape {tuple(precondition.shape)}, expected ({self.dim},)")
        self._half = None if precondition is None else precondition.to(self.device).float().sqrt()
        with _twice_differentiable(self.device):
            loss = loss_fn()
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        # Gradients without a graph are constant in θ: their rows of H are zero.
        self._grads = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def _split(self, v: torch.Tensor) -> list[torch.Tensor]:
        return [chunk.view_as(p) for chunk, p in zip(v.split([p.numel() for p in self.params]), self.params)]

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        if not self._grads:
            return torch.zeros_like(v)
        if self._half is not None:
            v = self._half * v
        pieces = self._split(v)
        hv = torch.autograd.grad([g for _, g in self._grads], self.params,
                                 grad_outputs=[pieces[i].to(g.dtype) for i, g in self._grads],
                                 retain_graph=True, allow_unused=True)
        out = torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1).float()
                         for h, p in zip(hv, self.params)])
        return out if self._half is None else self._half * out

    def random_vector(self, generator: torch.Generator | None, rademacher: bool = False) -> torch.Tensor:
        """A Gaussian (or Rademacher ±1) vector, drawn on the CPU so seeds agree across devices."""
        if rademacher:
            v = torch.randint(0, 2, (self.dim,), generator=generator).float() * 2 - 1
        else:
            v = torch.randn(self.dim, generator=generator)
        return v.to(self.device)


@dataclass
class PowerIterationResult:
    eigenvalue: float            # Rayleigh quotient vᵀHv (signed) of the last unit vector v multiplied by H
    eigenvector: torch.Tensor    # Hv/‖Hv‖, one power step past v: a flat unit vector for a warm start (``init``)
    iterations: int
    converged: bool


def power_iteration(loss_fn: LossFn, params: Sequence[torch.Tensor], *, iters: int, tol: float,
                    generator: torch.Generator | None = None, init: torch.Tensor | None = None,
                    precondition: torch.Tensor | None = None) -> PowerIterationResult:
    """Largest-|λ| Hessian eigenvalue: v ← Hv/‖Hv‖, λ = vᵀHv, until |Δλ| < tol·(|λ| + 1e-6)
    (of D^{½}HD^{½}, i.e. of DH, with ``precondition`` = diag(D))."""
    op = HessianOperator(loss_fn, params, precondition)
    v = (init.to(op.device).float().clone() if init is not None else op.random_vector(generator))
    v /= v.norm()
    eigenvalue, converged, step = 0.0, False, 0
    for step in range(1, iters + 1):
        hv = op(v)
        new = float(v @ hv)
        norm = hv.norm()
        if norm == 0:  # H v = 0: v is in the null space; the Rayleigh quotient is exact
            eigenvalue, converged = new, True
            break
        v = hv / norm
        if step > 1 and abs(new - eigenvalue) < tol * (abs(new) + 1e-6):
            eigenvalue, converged = new, True
            break
        eigenvalue = new
    return PowerIterationResult(eigenvalue, v.detach(), step, converged)


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """diag(P⁻¹) of Adam's step for ``params``, flat: η/((1 − β₁ᵗ)(√(v/(1 − β₂ᵗ)) + ε)) per coordinate,
    with η the group's current lr (schedule applied) and v the second moment (``exp_avg_sq``): the
    step is −P⁻¹m with m the uncorrected first moment, Cohen et al. 2022's form, for which their
    threshold (2 + 2β₁)/(1 − β₁) holds. None when some parameter has no Adam state (Muon/Scion
    matrices, or before the first step)."""
    group_of = {p: group for group in optimizer.param_groups for p in group["params"]}
    pieces = []
    for p in params:
        state, group = optimizer.state.get(p, {}), group_of.get(p)
        if group is None or "exp_avg_sq" not in state or "betas" not in group:
            return None
        (beta1, beta2), t = group["betas"], float(state["step"])
        v_hat = state["exp_avg_sq"].float() / (1.0 - beta2 ** t)
        pieces.append((group["lr"] / ((1.0 - beta1 ** t) * (v_hat.sqrt() + group["eps"]))).reshape(-1))
    return torch.cat(pieces)


LANCZOS_MIN_STEPS = 10  # largest_eigenvalue's fewest steps: under top eigenvalues 10, 9.9, 9.8 a residual stop
#                         before them returned 9.9 for 5 start vectors of 300, after them for none


@dataclass
class RitzPairs:
    values: torch.Tensor     # θ_i, the eigenvalues of T_j, ascending (float64)
    residuals: torch.Tensor  # ‖H Q y_i − θ_i Q y_i‖ = β_j |y_i[j]|, each Ritz pair's residual (0 once exact)


def lanczos_ritz_pairs(op: HessianOperator, steps: int, generator: torch.Generator | None) -> Iterator[RitzPairs]:
    """The Ritz values of T_j and their residuals after each Lanczos step j = 1 … ``steps`` (full
    reorthogonalisation; memory ``steps`` × dim float32, allocated at the start); it ends early when the start
    vector's Krylov space is invariant, whose Ritz values are then exact eigenvalues of the operator (H = 0:
    one step).

    Lanczos (1950): q_{j+1} β_j = H q_j − α_j q_j − β_{j−1} q_{j−1}; the extreme eigenvalues of the
    tridiagonal T_j = tridiag(β, α, β) converge to those of H first, both ends alike. A Ritz pair (θ, Qy)
    has residual β_j |y[j]| (Paige 1971), and an eigenvalue of H lies within it of θ (Parlett, The Symmetric
    Eigenvalue Problem, Thm 4.5.1): the stopping rule ARPACK uses.
    """
    basis = torch.empty(steps, op.dim, device=op.device)  # q_1 … q_steps, one row each, allocated once
    q = op.random_vector(generator)
    basis[0] = q / q.norm()
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(steps):
        w = op(basis[j])
        alphas.append(float(basis[j] @ w))
        Q = basis[:j + 1]
        for _ in range(2):  # classical Gram–Schmidt twice ("twice is enough")
            w = w - Q.T @ (Q @ w)
        beta = float(w.norm())
        invariant = beta <= 1e-10 * max(1.0, max(abs(a) for a in alphas))  # then T's eigenvalues are exact
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T += torch.diag(off, 1) + torch.diag(off, -1)
        values, vectors = torch.linalg.eigh(T)
        yield RitzPairs(values, (0.0 if invariant else beta) * vectors[-1].abs())
        if invariant or j == steps - 1:
            return
        betas.append(beta)
        basis[j + 1] = w / beta


def lanczos_topk(loss_fn: LossFn, params: Sequence[torch.Tensor], k: int, *, iters: int,
                 generator: torch.Generator | None = None) -> list[float]:
    """The k largest Ritz values of an ``iters``-step Lanczos run (``lanczos_ritz_pairs``), descending;
    fewer when the start vector's Krylov space is invariant before k steps (H = 0: one)."""
    op = HessianOperator(loss_fn, params)
    steps = min(iters, op.dim)
    if k > steps:
        raise ValueError(f"sharpness: lanczos_k={k} exceeds the number of Lanczos steps {steps}")
    *_, ritz = lanczos_ritz_pairs(op, steps, generator)
    return [float(x) for x in ritz.values.flip(0)[:k]]


@dataclass
class TopEigenvalue:
    value: float      # θ, the top Ritz value
    steps: int        # Lanczos steps (Hessian-vector products) taken
    residual: float   # its Ritz pair's residual ‖Hv − θv‖ after the last step
    converged: bool   # residual < tol·(|θ| + 1e-6): an eigenvalue lies that close to θ (not: that it is the largest)


def largest_eigenvalue(loss_fn: LossFn, params: Sequence[torch.Tensor], *, iters: int, tol: float,
                       generator: torch.Generator | None = None,
                       precondition: torch.Tensor | None = None) -> TopEigenvalue:
    """λ_max, the largest (signed) eigenvalue of H, or of DH with ``precondition`` = diag(D) (through the
    similar D^{½}HD^{½}): the top Ritz value θ (``TopEigenvalue``) of at most ``iters`` Lanczos steps, stopped
    once its residual
    ‖Hv − θv‖ is below tol·(|θ| + 1e-6), so that an eigenvalue lies that close to θ, but not before
    :data:`LANCZOS_MIN_STEPS`: a start vector with little weight on the top eigenvector settles on the next
    one first. Not stopped when θ merely moves little: below a cluster of top eigenvalues it creeps up
    (2% low at tol 1e-3 under {10, 9.9, 9.8}). Not power iteration, which finds the largest |λ|: Adam's preconditioned
    Hessian early in training has a negative end as large as its top (λ ∈ [−279, 273] at step 20 of the
    cpu super_consistency run at width 128), where 10 power steps gave 154 and 100 gave −250, and at step 40
    (λ ∈ [−23.0, 12.2]) they gave −23.0, whereas the stability threshold (2 + 2β₁)/(1 − β₁) bounds λ_max."""
    op = HessianOperator(loss_fn, params, precondition)
    top, residual, step, converged = math.nan, math.inf, 0, False
    for step, ritz in enumerate(lanczos_ritz_pairs(op, min(iters, op.dim), generator), start=1):
        top, residual = float(ritz.values[-1]), float(ritz.residuals[-1])
        converged = residual < tol * (abs(top) + 1e-6)
        if step >= LANCZOS_MIN_STEPS and converged:
            break
    return TopEigenvalue(top, step, residual, converged)


@dataclass
class TraceEstimate:
    mean: float
    stderr: float  # sample standard deviation / √samples
    samples: int


def hutchinson_trace(loss_fn: LossFn, params: Sequence[torch.Tensor], samples: int = 100,
                     generator: torch.Generator | None = None) -> TraceEstimate:
    """tr H ≈ (1/s) Σ vᵢᵀHvᵢ with Rademacher vᵢ; Var(vᵀHv) = 2 Σ_{i≠j} H_ij² (Hutchinson 1989)."""
    if samples < 2:
        raise ValueError(f"sharpness: hutchinson_samples must be ≥ 2, got {samples}")
    op = HessianOperator(loss_fn, params)
    values = torch.tensor([float(v @ op(v)) for v in
                           (op.random_vector(generator, rademacher=True) for _ in range(samples))],
                          dtype=torch.float64)
    return TraceEstimate(float(values.mean()), float(values.std() / math.sqrt(samples)), samples)


def language_model_loss_fn(model: torch.nn.Module, windows: torch.Tensor) -> LossFn:
    """Mean next-token cross-entropy of ``model`` on the fixed windows (N, context+1)."""
    x, y = windows[:, :-1], windows[:, 1:]
    return lambda: loss_and_correct(model, x, y)[0]


@EVALUATIONS.register("sharpness")
def evaluate(ctx: EvalContext) -> list[dict]:
    """Top Hessian eigenvalue (and optionally Lanczos top-k and Hutchinson trace) on a fixed train batch."""
    cfg = ctx.cfg
    batch = ctx.first_train_windows(cfg["batch_size"]).to(ctx.device)
    model = ctx.model.to(ctx.device).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = language_model_loss_fn(model, batch)
    seed = cfg["seed"]
    rows: list[dict] = []
    result = power_iteration(loss_fn, params, iters=cfg["iters"], tol=cfg["tol"],
                             generator=torch.Generator().manual_seed(seed))
    rows.append({"metric": "top_hessian_eigenvalue", "value": result.eigenvalue})
    rows.append({"metric": "power_iterations", "value": float(result.iterations)})
    rows.append({"metric": "power_iteration_converged", "value": float(result.converged)})
    ctx.report(f"top Hessian eigenvalue {result.eigenvalue:.6g} after {result.iterations} power iterations")
    if cfg["lanczos_k"]:
        top = lanczos_topk(loss_fn, params, cfg["lanczos_k"], iters=cfg["lanczos_iters"],
                           generator=torch.Generator().manual_seed(seed + 1))
        rows += [{"metric": "lanczos_eigenvalue", "value": lam, "k": i + 1} for i, lam in enumerate(top)]
        closed = "" if len(top) == cfg["lanczos_k"] else f" of {cfg['lanczos_k']} (the Krylov space closed)"
        ctx.report(f"Lanczos: the top {len(top)} eigenvalues{closed}")
    if cfg["hutchinson_samples"]:
        trace = hutchinson_trace(loss_fn, params, cfg["hutchinson_samples"],
                                 generator=torch.Generator().manual_seed(seed + 2))
        rows.append({"metric": "hessian_trace", "value": trace.mean})
        rows.append({"metric": "hessian_trace_stderr", "value": trace.stderr})
    return rows
