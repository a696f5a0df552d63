"""Scion / uSCG (Pethick et al. 2025, LIONS-EPFL/scion): a linear minimization oracle (LMO) per
parameter role, constrained (convex combination) or unconstrained steps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from lipflow.constraints import msign, squaring_divisor
from lipflow.optimizers.common import evaluate_closure
from lipflow.registry import Registry


@dataclass(frozen=True)
class Lmo:
    """Linear minimization oracle of one norm: lmo(g, input_dim) = argmin_{‖s‖≤1} ⟨g, s⟩.

    g is (fan_out, fan_in); input_dim is the dimension the input norm averages over: fan_in for
    RMS-normalized inputs, 1 for one-hot inputs (embeddings; the reference's ``normalized=False``).
    matrix_only: the norm is defined for 2-D tensors only. rms_bound: a bound on ‖lmo(g)‖_RMS→RMS
    for input_dim = fan_in (None where no useful one exists).
    """

    direction: Callable[[Tensor, int], Tensor]
    matrix_only: bool
    rms_bound: float | None

    def __call__(self, g: Tensor, input_dim: int) -> Tensor:
        return self.direction(g, input_dim)


LMOS: Registry[Lmo] = Registry("lmo")


def _register_lmo(name: str, *, matrix_only: bool, rms_bound: float | None) -> Callable:
    def wrap(direction: Callable[[Tensor, int], Tensor]) -> Callable[[Tensor, int], Tensor]:
        LMOS.register(name)(Lmo(direction, matrix_only, rms_bound))
        return direction

    return wrap


def _safe(norm: Tensor) -> Tensor:
    """Guard a norm against 0 (entries are ≤ the norm, so the quotient stays ≤ 1 and 0/0 → 0)."""
    return norm.clamp_min(torch.finfo(norm.dtype).tiny)


@_register_lmo("spectral", matrix_only=True, rms_bound=1.0)
def spectral_lmo(g: Tensor, input_dim: int) -> Tensor:
    """‖W‖ = √(input_dim/fan_out)·σ₁(W) (RMS→RMS); lmo = −√(fan_out/input_dim)·UVᵀ (exact polar);
    dual norm √(fan_out/input_dim)·‖G‖_nuclear. RMS→RMS norm of the output: exactly 1."""
    return -math.sqrt(g.shape[0] / input_dim) * msign(g)


@_register_lmo("sign", matrix_only=True, rms_bound=1.0)
def sign_lmo(g: Tensor, input_dim: int) -> Tensor:
    """‖W‖ = input_dim·max|W_ij| (bounds RMS→∞ and ∞→∞); lmo = −sign(G)/input_dim; dual ‖G‖₁/input_dim.
    RMS→RMS ≤ ‖·‖_F/√(fan_out/fan_in) = 1 for input_dim = fan_in."""
    return -torch.sign(g) / input_dim


@_register_lmo("colnorm", matrix_only=True, rms_bound=None)
def colnorm_lmo(g: Tensor, input_dim: int) -> Tensor:
    """‖W‖ = input_dim·max_j RMS(W[:, j]) (ℓ1→RMS for one-hot inputs); lmo: column j ↦
    −g_j·√fan_out/(input_dim·‖g_j‖); dual (√fan_out/input_dim)·Σ_j ‖g_j‖."""
    g = g / squaring_divisor(g, dim=0)  # scale-invariant: keep its norm in range
    return -g * (math.sqrt(g.shape[0]) / input_dim) / _safe(g.norm(dim=0, keepdim=True))


@_register_lmo("rownorm", matrix_only=True, rms_bound=1.0)
def rownorm_lmo(g: Tensor, input_dim: int) -> Tensor:
    """‖W‖ = √input_dim·max_i ‖W[i, :]‖ (RMS→ℓ∞); lmo: row i ↦ −g_i/(√input_dim·‖g_i‖);
    dual Σ_i ‖g_i‖/√input_dim. RMS→RMS ≤ ‖·‖_F/√(fan_out/fan_in) = 1 for input_dim = fan_in."""
    g = g / squaring_divisor(g, dim=1)  # scale-invariant: keep its norm in range
    return -g / (math.sqrt(input_dim) * _safe(g.norm(dim=1, keepdim=True)))


@_register_lmo("bias_rms", matrix_only=False, rms_bound=None)
def bias_rms_lmo(g: Tensor, input_dim: int) -> Tensor:
    """‖b‖ = RMS(b) over all entries (input_dim unused); lmo = −g/RMS(g); dual √numel·‖g‖₂."""
    g = g / squaring_divisor(g)  # scale-invariant: keep its norm in range
    return -g * math.sqrt(g.numel()) / _safe(g.norm())


# ----------------------------------------------------------------------------- Scion / uSCG


class Scion(torch.optim.Optimizer):
    """Stochastic conditional gradient with one norm per param group (Pethick et al. 2025).

    With α = momentum (the *averaging* weight, 1 − β), γ = lr, ρ = radius and the group's LMO:
        d ← (1 − α)d + αg   (d₀ = 0)
        Scion (constrained=True):  x ← (1 − γ)x + γρ·lmo(d)   (Frank–Wolfe: for γ ≤ 1 an x inside the
                                   ρ-ball stays inside, one outside shrinks towards it by (1 − γ))
        uSCG  (constrained=False): x ← x + γρ·lmo(d)
    Unlike the reference's ``init()``, nothing here moves the model's own init into the ball: e.g.
    lipschitz_gpt's orthogonal 65 × 256 head starts at Sign norm 256·max|W| ≈ 33 > ρ = 10.
    Groups with ``embedding=True`` hold (num_embeddings, dim) tables with one-hot inputs: the LMO
    acts on the transpose with input_dim 1. For matrices whose LMO has an ``rms_bound``,
    state["update_norm"] = γρ·rms_bound bounds the RMS→RMS norm of γρ·lmo(d).
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.1, constrained: bool = True,
                 norm: str = "spectral", radius: float = 1.0, embedding: bool = False):
        defaults = dict(lr=lr, momentum=momentum, constrained=constrained, norm=norm, radius=radius,
                        embedding=embedding)
        super().__init__(params, defaults)
        for group in self.param_groups:
            lmo = LMOS.get(group["norm"])
            if (lmo.matrix_only or group["embedding"]) and any(p.ndim != 2 for p in group["params"]):
                raise ValueError(f"Scion norm '{group['norm']}' needs 2-D parameters")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            lmo = LMOS.get(group["norm"])
            lr, alpha, radius, embedding = group["lr"], group["momentum"], group["radius"], group["embedding"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                d = state["momentum_buffer"]
                d.lerp_(p.grad, alpha)
                if embedding:
                    direction = lmo(d.float().mT, 1).mT
                else:
                    direction = lmo(d.float(), d.shape[-1])
                if group["constrained"]:
                    p.mul_(1.0 - lr)
                p.add_(direction.to(p.dtype), alpha=lr * radius)
                bound = self.update_bound(group, p)
                if bound is not None:
                    state["update_norm"] = bound
        return loss

    def update_bound(self, group: dict[str, Any], p: Tensor) -> float | None:
        """γρ·rms_bound: the RMS→RMS norm bound of one step of matrix ``p`` (None where the LMO has none)."""
        lmo = LMOS.get(group["norm"])
        if p.ndim != 2 or group["embedding"] or lmo.rms_bound is None:
            return None
        return group["lr"] * group["radius"] * lmo.rms_bound


# Pethick et al. 2025, untied GPT (LIONS-EPFL/scion examples/shallow-nanogpt): embedding Sign
# with one-hot inputs (unnormalized) ρ=1, blocks Spectral ρ=3, head Sign (1/fan_in) ρ=10.
# Vectors (biases, gains): BiasRMS ρ=1 (the reference's ``Auto`` choice for 1-D parameters).
SCION_GPT_DEFAULTS: dict[str, dict[str, Any]] = {
    "lmo_norms": {"embed": "sign", "hidden": "spectral", "head": "sign", "vector": "bias_rms"},
    "lmo_radius": {"embed": 1.0, "hidden": 3.0, "head": 10.0, "vector": 1.0},
}
