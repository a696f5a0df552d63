"""One update of a norm-constrained model: the optimizer's step, then decay and projection of every
constrained matrix (Newhouse et al. 2025; Modula's ``Atom.decay_step_project``). Shared by the
language-model trainer and the image-MLP study.

The soft cap is coupled to the norm u of the step actually taken: the optimizer's own bound where
it has one (``optimizer.update_bound``: Muon η·peak of Newton–Schulz, Scion γρ·rms_bound), else
measured (AdamW: ``spectral_norm_bound``, a certified upper bound, of (W_after − W_before)/s). Its
guarantee needs k = σmax(1 − λη) + u ≤ (81/62)·σmax (``SOFT_CAP_MAX_GROWTH``): an optimizer bound
above that is refused before training (``check_coupling``); a measured step above it is clipped
to it (W ← W_before + c·ΔW, c < 1) and counted.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from lipflow.constraints import SOFT_CAP_MAX_GROWTH, constrain_all_, spectral_norm_bound


@dataclass(frozen=True)
class ConstraintSettings:
    """The weight constraint of a run: its name, σmax, decoupled decay λ and spectral decay, and
    whether its matmul chain runs through torch.compile."""

    name: str
    sigma_max: float
    weight_decay: float
    spectral_wd: float
    compile: bool

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "ConstraintSettings":
        return cls(cfg["weight_constraint"], cfg["sigma_max"], cfg["weight_decay"], cfg["spectral_wd"],
                   cfg["compile"])

    @property
    def coupled(self) -> bool:
        """Whether the projection depends on the step's norm u (the soft cap's coupling)."""
        return self.name == "spectral_soft_cap"

    def max_update_norm(self, lr: float) -> float:
        """The largest u with σmax(1 − λη) + u ≤ (81/62)·σmax."""
        return self.sigma_max * (SOFT_CAP_MAX_GROWTH - 1.0 + lr * self.weight_decay)


def constrained_matrices(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, matrix) of every matrix the constraint applies to: the hidden and head roles."""
    roles = model.param_roles()
    return roles["hidden"] + roles["head"]


@torch.no_grad()
def fit_within_cap_(matrices: list[Tensor], settings: ConstraintSettings) -> None:
    """Scale every matrix whose RMS→RMS norm exceeds σmax onto σmax (W ← W·σmax/‖W‖), for the soft cap only;
    called once on the freshly initialised model (``build_learner``).

    The soft cap's guarantee is inductive: one decay-step-project keeps ‖W‖ ≤ σmax only from weights
    that start there (singular values above k = σmax(1 − λη) + u map above σmax, and beyond (81/62)·k
    anywhere, e.g. to ±1e10 and then to NaN). lipschitz_gpt and mlp initialise at RMS→RMS norm 1, so a
    run with sigma_max < 1 started outside the cap: its weights stayed above σmax for several steps
    (σmax 0.5), or diverged within two steps (σmax 0.25); gpt's attention-out, MLP-down and head
    matrices (PyTorch's default init, ≈ 1.1–1.7) are scaled already at σmax = 1. A matrix within
    σmax·(1 + 4·eps·√max(fan)) is multiplied by exactly 1, bits unchanged: the slack is the rounding
    of an orthogonal init to the matrix's dtype (up to ≈ 0.6·eps·√max(fan) above 1, 1.4e-6 at
    512 × 512 in fp32). The other constraints project exactly on the first step and need nothing
    here. No ``.item()`` (a meta model builds too); on CUDA the eigensolve waits for the device once per
    matrix, at build only, as torch.linalg's solvers do."""
    if not settings.coupled:
        return
    for w in matrices:
        fan_out, fan_in = w.shape
        slack = 4.0 * torch.finfo(w.dtype).eps * math.sqrt(max(fan_out, fan_in))
        sigma = spectral_norm_f64(w.detach()) / math.sqrt(fan_out / fan_in)
        w.mul_(torch.where(sigma > settings.sigma_max * (1.0 + slack), settings.sigma_max / sigma, 1.0).to(w.dtype))


def spectral_norm_f64(w: Tensor) -> Tensor:
    """σ_max(W) in float64 from the Gram matrix of W's short side, σ_max² = λ_max(WᵀW) (or of WWᵀ): one
    matmul and an eigensolve of min(m, n)² instead of an SVD of W (2× faster for GPT-2's 50257 × 768 head
    on a CPU, 7× for a 768 × 3072 MLP matrix), equal to it within ≈ 1e-14 relative, far inside
    :func:`fit_within_cap_`'s slack of 4·eps·√max(m, n) (≥ 4.7e-7 in fp32)."""
    w = w.double()
    gram = w.mT @ w if w.shape[0] >= w.shape[1] else w @ w.mT
    return torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0.0).sqrt()


def _update_bound(optimizer: torch.optim.Optimizer, group: dict[str, Any], p: Tensor) -> float | None:
    bound = getattr(optimizer, "update_bound", None)
    return None if bound is None else bound(group, p)


def _slots(optimizer: torch.optim.Optimizer, matrices: list[Tensor]) -> list[tuple[Tensor, dict[str, Any]]]:
    """(matrix, its param group) for every matrix, in the optimizer's order."""
    wanted = {id(p) for p in matrices}
    return [(p, g) for g in optimizer.param_groups for p in g["params"] if id(p) in wanted]


def check_coupling(optimizer: torch.optim.Optimizer, matrices: list[Tensor], settings: ConstraintSettings) -> None:
    """Refuse a soft cap whose optimizer steps (at the current, i.e. the base, lr) can leave the
    range where its guarantee holds: ValueError naming lr, sigma_max and the largest lr that fits.

    The run's lr η scales every group's lr to m·η (m the group's multiplier), and both a step's bound
    u = m·η·c and the limit σmax(1.3065 − 1 + m·η·λ) are linear in it, so the largest η that fits is
    the least σmax·0.3065 / (m·(c − σmax·λ)) over the matrices with c > σmax·λ."""
    if not settings.coupled:
        return
    run_lr, headroom = optimizer.defaults["lr"], settings.max_update_norm(0.0)
    largest_lr, worst = math.inf, None
    for p, group in _slots(optimizer, matrices):
        u = _update_bound(optimizer, group, p)
        if u is None or group["lr"] == 0:
            continue
        per_lr = u / group["lr"] - settings.sigma_max * settings.weight_decay
        if per_lr > 0:
            largest_lr = min(largest_lr, headroom / (group["lr"] / run_lr * per_lr))
        if u > settings.max_update_norm(group["lr"]) and (worst is None or u > worst[0]):
            worst = (u, settings.max_update_norm(group["lr"]), group.get("role"))
    if worst is not None:
        u, limit, role = worst
        raise ValueError(f"lr: at lr {run_lr:g} the optimizer's steps reach RMS→RMS norm {u:.4g}"
                         f"{f' ({role} matrices)' if role else ''}, more than the soft cap absorbs at sigma_max "
                         f"{settings.sigma_max:g} (at most {limit:.4g}: k ≤ 1.3065·sigma_max); lower lr to at most "
                         f"{_round_down(largest_lr):g} or raise sigma_max")


def _round_down(x: float, digits: int = 4) -> float:
    """``x`` cut (not rounded) to ``digits`` significant digits: a printed limit that is never above ``x``."""
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(x)))
    return math.floor(x * scale) / scale


@torch.no_grad()
def constrained_update(optimizer: torch.optim.Optimizer, matrices: list[Tensor], settings: ConstraintSettings,
                       after_step: Callable[[], None] | None = None) -> Tensor:
    """``optimizer.step()`` (then ``after_step()``, if given), then decay → project every matrix.
    Returns the number of clipped steps as a 0-d tensor on the matrices' device (no host sync)."""
    slots = _slots(optimizer, matrices)
    before = {}
    if settings.coupled:
        before = {id(p): p.detach().clone() for p, g in slots if _update_bound(optimizer, g, p) is None}
    optimizer.step()
    if after_step is not None:
        after_step()
    return project_matrices_(optimizer, matrices, settings, before)


@torch.no_grad()
def project_matrices_(optimizer: torch.optim.Optimizer, matrices: list[Tensor], settings: ConstraintSettings,
                      before: dict[int, Tensor]) -> Tensor:
    """Decay → project every matrix just stepped, one stack per (shape, lr, bound); ``before`` holds
    the pre-step copies of the matrices whose step is measured. Returns the clipped-step count."""
    with torch.profiler.record_function("weight_constraint"):  # a phase of a step in a profile
        stacks: dict[tuple, list[Tensor]] = defaultdict(list)
        for p, group in _slots(optimizer, matrices):
            bound = _update_bound(optimizer, group, p) if settings.coupled else 0.0
            stacks[(tuple(p.shape), p.dtype, group["lr"], bound)].append(p)
        clipped = torch.zeros((), dtype=torch.int64, device=matrices[0].device if matrices else "cpu")
        for (shape, _, lr, bound), params in stacks.items():
            update_norm: float | Tensor = 0.0 if bound is None else bound
            if bound is None and settings.coupled:
                update_norm, count = _clip_measured_steps_(params, [before[id(p)] for p in params], lr, settings)
                clipped = clipped + count
            constrain_all_([p.data for p in params], settings.name, settings.sigma_max, lr=lr,
                           weight_decay=settings.weight_decay, update_norm=update_norm,
                           spectral_wd=settings.spectral_wd, compiled=settings.compile)
        return clipped


def _clip_measured_steps_(params: list[Tensor], before: list[Tensor], lr: float,
                          settings: ConstraintSettings) -> tuple[Tensor, Tensor]:
    """u = certified ‖ΔW/s‖₂ per matrix; steps with u above ``max_update_norm`` are scaled down to
    it in place. Returns (u after clipping, number clipped), both on the device. A ``max_update_norm``
    beyond fp32's range (a decay λη far above 1) clips no finite step and is taken as fp32's largest."""
    fan_out, fan_in = params[0].shape
    old = torch.stack([b.float() for b in before])
    delta = torch.stack([p.detach().float() for p in params]) - old
    u = spectral_norm_bound(delta / math.sqrt(fan_out / fan_in)).nan_to_num(nan=math.inf)
    u_max = min(settings.max_update_norm(lr), torch.finfo(u.dtype).max)
    factor = (u_max / u).clamp(max=1.0)
    for p, new in zip(params, (old + delta * factor[:, None, None]).unbind(0)):
        p.data.copy_(new)
    return torch.minimum(u, torch.full_like(u, u_max)), (factor < 1.0).sum()
