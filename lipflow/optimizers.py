"""Optimizers (registry ``optimizer``): AdamW, Muon, Scion (constrained SCG) and uSCG.

``build_optimizer(model, cfg)`` groups the model's parameters by role (``model.param_roles()``:
embed / hidden / head / vector) and by learning-rate multiplier ``p.lr_mult`` (set by the
parametrization, default 1), one param group per (role, multiplier), each tagged ``role``.

Weight decay: matrices (hidden, head) get none inside any optimizer — their decoupled decay
W ← (1 − λη)W is done by ``lipflow.constraints.constrain_all_`` after the step (see
``lipflow.train.update``), with the same λ = cfg weight_decay, so constraints and decay compose in
Modula's order. Embedding tables get cfg weight_decay inside AdamW (also the AdamW half of Muon;
none under Muon's ``dualized`` embedding step, as in the reference); vectors (biases, gains) get
none, as in nanoGPT. Scion/uSCG use no weight decay: constrained Scion's (1 − γ) contraction
already plays that role (Pethick et al. 2025).

Layout: matrices are (fan_out, fan_in) as in nn.Linear. Role ``embed`` holds lookup tables
stored (num_embeddings, dim) with one-hot inputs; the LMOs see their transpose.

Each Muon/Scion step records ``state[p]["update_norm"]``, a bound on the RMS→RMS operator norm
of the step's update of matrix p, also given by ``optimizer.update_bound(group, p)`` before the
step (the soft cap couples to it, see lipflow.train.update).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from lipflow import distributed
from lipflow.constraints import msign
from lipflow.model.base import ROLES
from lipflow.registry import Registry

OptimizerBuilder = Callable[[nn.Module, dict[str, Any]], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerBuilder] = Registry("optimizer")

ADAM_EPS = 1e-8  # torch's default

# ----------------------------------------------------------------------------- Newton–Schulz

# Keller Jordan's quintic p(x) = a x + b x³ + c x⁵ (KellerJordan/Muon, zeropower_via_newtonschulz5).
# p peaks at 1.2024 (x ≈ 0.5545) and maps [0, 1.2024] into itself, so T ≥ 1 steps have peak
# 1.2024 on [0, 1]; 5 steps send every singular value σ ≥ 0.0015·‖G‖_F into [0.6818, 1.2024].
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
    """max over σ ∈ [0, 1] of p_T∘…∘p_1 (``steps`` steps): the bound on NS output singular values.

    The image of [0, 1] under the first t steps is an interval [lo, hi]; the next image is p's
    range over it, reached at its ends or at real roots of p'(x) = a + 3bx² + 5cx⁴.
    """
    lo, hi = 0.0, 1.0
    for a, b, c in ns_schedule(steps, coefficients):
        poly = np.polynomial.Polynomial([0.0, a, 0.0, b, 0.0, c])
        critical = [r.real for r in poly.deriv().roots() if abs(r.imag) < 1e-12]
        values = poly(np.array([lo, hi] + [r for r in critical if lo <= r <= hi]))
        lo, hi = float(values.min()), float(values.max())
    return hi


def newton_schulz(g: Tensor, steps: int, dtype: torch.dtype = torch.float32,
                  coefficients: Coefficients = MUON_NS_COEFFICIENTS) -> Tensor:
    """≈ msign(G): X ← G/‖G‖_F, then ``steps`` × X ← aX + (bA + cA²)X with A = XXᵀ (Keller Jordan;
    ``coefficients`` may give each step its own (a, b, c), e.g. ``YOU_NS_COEFFICIENTS``).

    Applies p_T∘…∘p_1 to every singular value σ/‖G‖_F ≤ 1 and keeps singular vectors. Runs in
    ``dtype`` on the wide orientation (small Gram matrix); returns float32. ``g`` may be a stack
    (…, m, n) of same-shape matrices: one batched matmul chain, each normalized by its own norm.
    """
    x = g.to(dtype)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in ns_schedule(steps, coefficients):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if transposed else x).float()


# Muon's update scale c(fan_out, fan_in) on NS(u) (Muon docstring)
UPDATE_SCALES: dict[str, Callable[[int, int], float]] = {
    "sqrt_fan_ratio": lambda fan_out, fan_in: math.sqrt(fan_out / fan_in),
    "speedrun": lambda fan_out, fan_in: math.sqrt(max(1.0, fan_out / fan_in)),
}


def _orthogonalize(directions: Tensor, steps: int, orthogonalize: Callable[..., Tensor] | None = None,
                   coefficients: Coefficients = MUON_NS_COEFFICIENTS) -> Tensor:
    """newton_schulz (or ``orthogonalize``, e.g. its compiled form) of a stack of same-shape
    matrices. Under DDP each rank orthogonalizes its
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
    inputs: the same momentum, then each row's direction u_i ↦ u_i / max(1/inflation, RMS(u_i))
    (unit RMS, small rows inflated at most ``max_inflation``×: the ℓ1→RMS duality map), W ← W − η·that.
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
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
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

    def _directions(self, group: dict[str, Any], params: list[Tensor]) -> Tensor:
        """Momentum update of each parameter, then its (Nesterov) direction, stacked."""
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
            return torch.stack([g.lerp(buf, beta) for g, buf in zip(grads, bufs)])
        return torch.stack(bufs)

    def _muon_step(self, group: dict[str, Any]) -> None:
        """Momentum for every matrix, then Newton–Schulz once per shape on the stacked directions."""
        by_shape: dict[tuple[int, ...], list[Tensor]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is not None:
                by_shape[tuple(p.shape)].append(p)
        coefficients = NS_COEFFICIENT_SETS[group["ns_coefficients"]]
        for (fan_out, fan_in), params in by_shape.items():
            directions = self._directions(group, params)
            updates = _orthogonalize(directions, group["ns_steps"], self._newton_schulz, coefficients)
            scale = UPDATE_SCALES[group["update_scale"]](fan_out, fan_in)
            torch._foreach_add_(params, updates.to(params[0].dtype).unbind(0), alpha=-group["lr"] * scale)
            for p in params:
                self.state[p]["update_norm"] = self.update_bound(group, p)

    def _dualized_step(self, group: dict[str, Any]) -> None:
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


# ----------------------------------------------------------------------------- LMOs


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
    return -g * (math.sqrt(g.shape[0]) / input_dim) / _safe(g.norm(dim=0, keepdim=True))


@_register_lmo("rownorm", matrix_only=True, rms_bound=1.0)
def rownorm_lmo(g: Tensor, input_dim: int) -> Tensor:
    """‖W‖ = √input_dim·max_i ‖W[i, :]‖ (RMS→ℓ∞); lmo: row i ↦ −g_i/(√input_dim·‖g_i‖);
    dual Σ_i ‖g_i‖/√input_dim. RMS→RMS ≤ ‖·‖_F/√(fan_out/fan_in) = 1 for input_dim = fan_in."""
    return -g / (math.sqrt(input_dim) * _safe(g.norm(dim=1, keepdim=True)))


@_register_lmo("bias_rms", matrix_only=False, rms_bound=None)
def bias_rms_lmo(g: Tensor, input_dim: int) -> Tensor:
    """‖b‖ = RMS(b) over all entries (input_dim unused); lmo = −g/RMS(g); dual √numel·‖g‖₂."""
    return -g * math.sqrt(g.numel()) / _safe(g.norm())


# ----------------------------------------------------------------------------- Scion / uSCG


class Scion(torch.optim.Optimizer):
    """Stochastic conditional gradient with one norm per param group (Pethick et al. 2025).

    With α = momentum (the *averaging* weight, 1 − β), γ = lr, ρ = radius and the group's LMO:
        d ← (1 − α)d + αg   (d₀ = 0)
        Scion (constrained=True):  x ← (1 − γ)x + γρ·lmo(d)   (Frank–Wolfe; stays in the ρ-ball)
        uSCG  (constrained=False): x ← x + γρ·lmo(d)
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
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
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


# ----------------------------------------------------------------------------- builders

UPDATE_GEOMETRIES = ("entrywise", "normalized")


def declares_geometry(**by_role: str) -> Callable[[OptimizerBuilder], OptimizerBuilder]:
    """Decorator of a builder: how its optimizer moves a parameter of each role, ``entrywise``
    (Adam: every entry moves ≈ lr whatever the shape) or ``normalized`` (a width-independent
    RMS→RMS update: Muon's orthogonalized step, Scion's LMOs). µP reads it (lipflow.parametrization)."""
    if set(by_role) != set(ROLES) or not set(by_role.values()) <= set(UPDATE_GEOMETRIES):
        raise ValueError(f"an update geometry maps every role {ROLES} to one of {UPDATE_GEOMETRIES}; got {by_role}")

    def attach(builder: OptimizerBuilder) -> OptimizerBuilder:
        builder.update_geometry = dict(by_role)
        return builder

    return attach


def update_geometry(name: str) -> dict[str, str]:
    """role → ``entrywise`` | ``normalized`` for the optimizer registered as ``name``."""
    return OPTIMIZERS.get(name).update_geometry



def _role_groups(model: nn.Module) -> Iterator[tuple[str, float, list[nn.Parameter]]]:
    """(role, lr_mult, params) for each non-empty (role, multiplier) pair, in a fixed order.

    Checks that ``param_roles`` covers every trainable parameter exactly once.
    """
    roles = model.param_roles()
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"param_roles returned unknown roles {sorted(unknown)}; expected {ROLES}")
    seen: dict[int, str] = {}
    for role in ROLES:
        for name, p in roles.get(role, []):
            if id(p) in seen:
                raise ValueError(f"parameter '{name}' has two roles ('{seen[id(p)]}' and '{role}')")
            seen[id(p)] = role
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ValueError(f"param_roles leaves parameters without a role: {missing}")
    for role in ROLES:
        by_mult: dict[float, list[nn.Parameter]] = defaultdict(list)
        for _, p in roles.get(role, []):
            if p.requires_grad:
                by_mult[float(getattr(p, "lr_mult", 1.0))].append(p)
        for mult, params in by_mult.items():
            yield role, mult, params


def _embed_decay(role: str, cfg: dict[str, Any]) -> float:
    """In-optimizer weight decay: cfg weight_decay for embedding tables, 0 otherwise (module docstring)."""
    return cfg["weight_decay"] if role == "embed" else 0.0


@OPTIMIZERS.register("adamw")
@declares_geometry(embed="entrywise", hidden="entrywise", head="entrywise", vector="entrywise")
def build_adamw(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """torch.optim.AdamW with lr·lr_mult per group; betas (beta1, beta2)."""
    groups = [dict(params=params, lr=cfg["lr"] * mult, weight_decay=_embed_decay(role, cfg), role=role)
              for role, mult, params in _role_groups(model)]
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]),
                             eps=ADAM_EPS, weight_decay=0.0)


@OPTIMIZERS.register("muon")
@declares_geometry(embed="entrywise", hidden="normalized", head="normalized", vector="entrywise")
def build_muon(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """Muon (lr) on hidden and head matrices; embeddings on AdamW (adam_lr, betas), or with
    ``embed_optimizer: dualized`` on the reference's dualized step (lr, ``max_embed_inflation``);
    vectors on AdamW. With ``compile`` also Newton–Schulz through torch.compile."""
    groups = []
    for role, mult, params in _role_groups(model):
        if role in ("hidden", "head"):
            groups.append(dict(params=params, kind="muon", lr=cfg["lr"] * mult, role=role))
        elif role == "embed" and cfg["embed_optimizer"] == "dualized":
            groups.append(dict(params=params, kind="dualized", lr=cfg["lr"] * mult, role=role))
        else:
            groups.append(dict(params=params, kind="adamw", lr=cfg["adam_lr"] * mult,
                               weight_decay=_embed_decay(role, cfg), role=role))
    return Muon(groups, lr=cfg["lr"], momentum=cfg["momentum"], ns_steps=cfg["ns_steps"],
                betas=(cfg["beta1"], cfg["beta2"]), nesterov=cfg["nesterov"],
                ns_coefficients=cfg["ns_coefficients"], update_scale=cfg["update_scale"],
                max_inflation=cfg["max_embed_inflation"], compile=cfg["compile"])


def _build_scion(model: nn.Module, cfg: dict[str, Any], constrained: bool) -> Scion:
    """Scion/uSCG with α = 1 − cfg momentum and per-role norms/radii (cfg over SCION_GPT_DEFAULTS)."""
    if "constrained" in cfg and bool(cfg["constrained"]) != constrained:
        raise ValueError(f"constrained={cfg['constrained']} contradicts optimizer '{cfg['optimizer']}' "
                         "(scion is constrained, uscg is not)")
    tables = {}
    for key in ("lmo_norms", "lmo_radius"):
        given = cfg[key]
        unknown = set(given) - set(ROLES)
        if unknown:
            raise ValueError(f"{key} has unknown roles {sorted(unknown)}; expected a subset of {ROLES}")
        tables[key] = {**SCION_GPT_DEFAULTS[key], **given}
    groups = []
    for role, mult, params in _role_groups(model):
        norm = tables["lmo_norms"][role]
        lmo = LMOS.get(norm)
        if lmo.matrix_only or role == "embed":
            bad = [tuple(p.shape) for p in params if p.ndim != 2]
            if bad:
                raise ValueError(f"lmo_norms.{role}='{norm}' needs 2-D parameters, got shapes {bad}")
        groups.append(dict(params=params, lr=cfg["lr"] * mult, norm=norm, radius=float(tables["lmo_radius"][role]),
                           embedding=role == "embed", role=role))
    return Scion(groups, lr=cfg["lr"], momentum=1.0 - cfg["momentum"], constrained=constrained)


@OPTIMIZERS.register("scion")
@declares_geometry(embed="normalized", hidden="normalized", head="normalized", vector="normalized")
def build_scion(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    return _build_scion(model, cfg, constrained=True)


@OPTIMIZERS.register("uscg")
@declares_geometry(embed="normalized", hidden="normalized", head="normalized", vector="normalized")
def build_uscg(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    return _build_scion(model, cfg, constrained=False)


def build_optimizer(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """Build the optimizer named by cfg['optimizer'] for ``model``."""
    return OPTIMIZERS.get(cfg["optimizer"])(model, cfg)
