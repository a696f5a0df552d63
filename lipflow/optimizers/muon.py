"""Muon (Keller Jordan's KellerJordan/Muon): momentum, Newton–Schulz orthogonalization of each
matrix's update (batched over same-shape matrices, shared across ranks), an AdamW half for
embeddings and vectors; ``state[p]["update_norm"]`` bounds each step's RMS→RMS norm."""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from lipflow import distributed
from lipflow.optimizers.common import ADAM_EPS, evaluate_closure


# Keller Jordan's quintic p(x) = a x + b x³ + c x⁵ (KellerJordan/Muon, zeropower_via_newtonschulz5).
# p peaks at 1.2024 (x ≈ 0.5545) and maps [0, 1.2024] into itself, so T ≥ 1 steps have peak
# 1.2024 on [0, 1]; 5 steps send every singular value σ ≥ 0.00151·‖G‖_F into [0.6818, 1.2024]
# (σ = 0.0015·‖G‖_F ends at 0.6798).
MUON_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

# Extra factor on the recorded update bound for rounding in the iteration's dtype:
# float32 rounding is ~1e-6 relative; bf16 (CUDA) adds the reference's 5% safety factor
# (NanoGPT soft cap passes η·1.14502·1.05; we measured ≤ 0.4% bf16 overshoot on CPU).
NS_ROUNDING_MARGIN = {torch.float32: 1.0, torch.bfloat16: 1.05}


# You Jiacheng's 6-step schedule, one (a, b, c) per step (Modula's ``orthogonalize``, used by the
# reference implementation of Newhouse et al. 2025): its output peak on [0, 1] is 0.99933, so an
# update of spectral norm ≤ η needs no safety factor.
YOU_NS_COEFFICIENTS = tuple((a / 1024, b / 1024, c / 1024) for a, b, c in (
    (3955, -8306, 5008), (3735, -6681, 3463), (3799, -6499, 3211),
    (4019, -6385, 2906), (2677, -3029, 1162), (2172, -1833, 682)))
NS_COEFFICIENT_SETS = {"jordan": MUON_NS_COEFFICIENTS, "you": YOU_NS_COEFFICIENTS}

Coefficients = tuple  # one (a, b, c) used at every step, or a tuple of one (a, b, c) per step


def ns_schedule(steps: int, coefficients: Coefficients = MUON_NS_COEFFICIENTS) -> tuple[tuple[float, float, float], ...]:
    """The (a, b, c) of each of ``steps`` Newton–Schulz steps."""
    if len(coefficients) == 3 and not isinstance(coefficients[0], tuple):
        return (tuple(coefficients),) * steps
    if len(coefficients) != steps:
        raise ValueError(f"ns_steps: this Newton–Schulz coefficient set has exactly {len(coefficients)} steps, "
                         f"not {steps}")
    return tuple(coefficients)


@functools.lru_cache(maxsize=None)
def newton_schulz_peak(steps: int, coefficients: Coefficients = MUON_NS_COEFFICIENTS) -> float:
    """max over σ ∈ [0, 1] of |p_T∘…∘p_1| (``steps`` steps): the bound on NS output singular values.

    The image of [0, 1] under the first t steps is an interval [lo, hi]; the next image is p's
    range over it, reached at its ends or at real roots of p'(x) = a + 3bx² + 5cx⁴. An output
    singular value is |value| (a negative one flips its singular vector), so the bound is max(hi, −lo):
    hi for Jordan's and You's sets, whose images stay ≥ 0.
    """
    lo, hi = 0.0, 1.0
    for a, b, c in ns_schedule(steps, coefficients):
        poly = np.polynomial.Polynomial([0.0, a, 0.0, b, 0.0, c])
        critical = [r.real for r in poly.deriv().roots() if abs(r.imag) < 1e-12]
        values = poly(np.array([lo, hi] + [r for r in critical if lo <= r <= hi]))
        lo, hi = float(values.min()), float(values.max())
    return max(hi, -lo)


def newton_schulz(g: Tensor, steps: int, dtype: torch.dtype = torch.float32,
                  coefficients: Coefficients = MUON_NS_COEFFICIENTS) -> Tensor:
    """≈ msign(G): X ← G/‖G‖_F, then ``steps`` × X ← aX + (bA + cA²)X with A = XXᵀ (Keller Jordan;
    ``coefficients`` may give each step its own (a, b, c), e.g. ``YOU_NS_COEFFICIENTS``).

    Applies p_T∘…∘p_1 to every singular value σ/‖G‖_F ≤ 1 and keeps singular vectors. Runs in
    ``dtype`` through the smaller Gram matrix: a tall X steps as X ← aX + X(bA + cA²), A = XᵀX, the
    same map without Keller Jordan's transposed copy (whose rows would have the long side's stride,
    an odd 50257 for GPT-2's head). The scalings ride in the matmuls (``baddbmm``: two matmuls and
    the Gram product per step, no elementwise pass). Returns float32. ``g`` may be a stack (…, m, n)
    of same-shape matrices: one batched matmul chain, each normalized by its own norm.
    """
    shape = g.shape
    x = g.to(dtype).reshape(-1, *shape[-2:])
    tall = x.shape[-2] > x.shape[-1]
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in ns_schedule(steps, coefficients):
        gram = x.mT @ x if tall else x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # bA + cA²
        x = torch.baddbmm(x, x, poly, beta=a) if tall else torch.baddbmm(x, poly, x, beta=a)
    return x.reshape(shape).float()


# Muon's update scale c(fan_out, fan_in) on NS(u) (Muon docstring)
UPDATE_SCALES: dict[str, Callable[[int, int], float]] = {
    "sqrt_fan_ratio": lambda fan_out, fan_in: math.sqrt(fan_out / fan_in),
    "speedrun": lambda fan_out, fan_in: math.sqrt(max(1.0, fan_out / fan_in)),
}


def _orthogonalize(directions: Tensor, steps: int, orthogonalize: Callable[..., Tensor] | None = None,
                   coefficients: Coefficients = MUON_NS_COEFFICIENTS) -> Tensor:
    """newton_schulz (or ``orthogonalize``, e.g. its compiled form) of a stack of same-shape
    matrices. Under data parallelism each rank orthogonalizes its
    share (padded with zero matrices, which map to zero) and the shares are all-gathered, as in
    modded-nanogpt: gradients, and so momenta and directions, are the same on every rank."""
    orthogonalize = orthogonalize or newton_schulz
    dtype = _ns_dtype(directions.device)
    world, rank, per_rank = distributed.share_of_work(directions.shape[0])
    if world == 1:
        return orthogonalize(directions, steps, dtype, coefficients)
    padded = torch.cat([directions, directions.new_zeros(per_rank * world - directions.shape[0],
                                                         *directions.shape[1:])])
    mine = orthogonalize(padded[rank * per_rank:(rank + 1) * per_rank], steps, dtype, coefficients)
    return distributed.all_gather_stack(mine, world)[:directions.shape[0]]


def _ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (tensor cores, as in the Muon reference), float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ----------------------------------------------------------------------------- Muon


class Muon(torch.optim.Optimizer):
    """Muon for matrices plus AdamW (or the reference's dualized step) for the rest, in one
    optimizer (param-group field ``kind``).

    kind "muon" (Keller Jordan 2024; Newhouse et al. 2025 for the scaling), W of shape
    (fan_out, fan_in), g its gradient, β = momentum:
        m ← βm + (1 − β)g;  u = (1 − β)g + βm (``nesterov``) or u = m;
        W ← W − η·c·NS(u),  c = √(fan_out/fan_in) (``update_scale`` "sqrt_fan_ratio") or
        max(1, fan_out/fan_in)^½ (the speedrun's "speedrun").
    With c = √(fan_out/fan_in) the step's RMS→RMS norm is η·σ₁(NS(u)) ≤ η·peak; with the speedrun's
    c it is η·peak·max(1, √(fan_in/fan_out)). That bound is ``update_bound`` and state["update_norm"]
    (peak = newton_schulz_peak of the group's ``ns_coefficients`` set, times NS_ROUNDING_MARGIN).
    No weight decay on these matrices (see module docstring).
    kind "adamw": bias-corrected AdamW (Loshchilov & Hutter) with decoupled weight decay.
    kind "dualized": the reference's embedding step for tables (num_embeddings, dim) with one-hot
    inputs, each table on its own (a group may mix shapes: GPT's token and position tables): the same
    momentum, then each row's direction u_i ↦ u_i / max(1/inflation, RMS(u_i)) (unit RMS, small rows
    inflated at most ``max_inflation``×: the ℓ1→RMS duality map), W ← W − η·that.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.02, momentum: float = 0.95, ns_steps: int = 5,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = ADAM_EPS, weight_decay: float = 0.0,
                 kind: str = "muon", nesterov: bool = True, ns_coefficients: str = "jordan",
                 update_scale: str = "sqrt_fan_ratio", max_inflation: float = 16.0, compile: bool = False):
        defaults = dict(lr=lr, momentum=momentum, ns_steps=ns_steps, betas=betas, eps=eps,
                        weight_decay=weight_decay, kind=kind, nesterov=nesterov, ns_coefficients=ns_coefficients,
                        update_scale=update_scale, max_inflation=max_inflation)
        super().__init__(params, defaults)
        # compile: Newton–Schulz through torch.compile, one graph per matrix-stack shape
        self._newton_schulz = torch.compile(newton_schulz, dynamic=False) if compile else newton_schulz
        for group in self.param_groups:
            if group["kind"] not in self._steps:
                raise ValueError(f"Muon param group kind '{group['kind']}' is not one of {sorted(self._steps)}")
            if group["ns_coefficients"] not in NS_COEFFICIENT_SETS:
                raise ValueError(f"ns_coefficients: '{group['ns_coefficients']}' is not one of "
                                 f"{sorted(NS_COEFFICIENT_SETS)}")
            if group["update_scale"] not in UPDATE_SCALES:
                raise ValueError(f"update_scale: '{group['update_scale']}' is not one of {sorted(UPDATE_SCALES)}")
            ns_schedule(group["ns_steps"], NS_COEFFICIENT_SETS[group["ns_coefficients"]])  # a step count that fits
            if group["kind"] in ("muon", "dualized"):
                if group["weight_decay"]:
                    raise ValueError(f"Muon param groups of kind '{group['kind']}' take no weight_decay "
                                     "(constrain_ decays matrices)")
                if any(p.ndim != 2 for p in group["params"]):
                    raise ValueError(f"Muon param groups of kind '{group['kind']}' must hold 2-D matrices only")

    @property
    def _steps(self) -> dict[str, Callable[[dict[str, Any]], None]]:
        return {"muon": self._muon_step, "adamw": self._adamw_step, "dualized": self._dualized_step}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            self._steps[group["kind"]](group)
        return loss

    def update_bound(self, group: dict[str, Any], p: Tensor) -> float | None:
        """Bound on the RMS→RMS norm of one step of ``p`` in ``group`` at its current lr (None but for Muon)."""
        if group["kind"] != "muon":
            return None
        fan_out, fan_in = p.shape
        peak = newton_schulz_peak(group["ns_steps"], NS_COEFFICIENT_SETS[group["ns_coefficients"]])
        scale = UPDATE_SCALES[group["update_scale"]](fan_out, fan_in) / math.sqrt(fan_out / fan_in)
        return group["lr"] * peak * scale * NS_ROUNDING_MARGIN[_ns_dtype(p.device)]

    def _directions(self, group: dict[str, Any], params: list[Tensor]) -> list[Tensor]:
        """Momentum update of each parameter, then its (Nesterov) direction, one per parameter
        (any shapes: the muon step stacks one shape at a time, the dualized step takes each table)."""
        beta = group["momentum"]
        bufs = []
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        grads = [p.grad for p in params]
        torch._foreach_lerp_(bufs, grads, 1.0 - beta)
        if group["nesterov"]:
            return [g.lerp(buf, beta) for g, buf in zip(grads, bufs)]
        return bufs

    def _muon_step(self, group: dict[str, Any]) -> None:
        """Momentum for every matrix, then Newton–Schulz once per shape on the stacked directions."""
        by_shape: dict[tuple[int, ...], list[Tensor]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is not None:
                by_shape[tuple(p.shape)].append(p)
        coefficients = NS_COEFFICIENT_SETS[group["ns_coefficients"]]
        for (fan_out, fan_in), params in by_shape.items():
            directions = torch.stack(self._directions(group, params))
            updates = _orthogonalize(directions, group["ns_steps"], self._newton_schulz, coefficients)
            scale = UPDATE_SCALES[group["update_scale"]](fan_out, fan_in)
            torch._foreach_add_(params, updates.to(params[0].dtype).unbind(0), alpha=-group["lr"] * scale)
            for p in params:
                self.state[p]["update_norm"] = self.update_bound(group, p)

    def _dualized_step(self, group: dict[str, Any]) -> None:
        """W ← W − η·u_i/max(1/inflation, RMS(u_i)) for each row u_i of each table's direction."""
        params = [p for p in group["params"] if p.grad is not None]
        for p, direction in zip(params, self._directions(group, params) if params else []):
            rms = direction.float().pow(2).mean(dim=1, keepdim=True).sqrt()
            p.add_((direction / rms.clamp_min(1.0 / group["max_inflation"])).to(p.dtype), alpha=-group["lr"])

    def _adamw_step(self, group: dict[str, Any]) -> None:
        lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"]
            state["exp_avg"].lerp_(p.grad, 1.0 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
            denom = (state["exp_avg_sq"] / (1.0 - beta2 ** t)).sqrt_().add_(eps)
            p.mul_(1.0 - lr * decay)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1.0 - beta1 ** t))
