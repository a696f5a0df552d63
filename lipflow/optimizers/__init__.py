"""Optimizers (registry ``optimizer``): AdamW, Muon, Scion (constrained SCG) and uSCG.

``build_optimizer(model, cfg)`` groups the model's parameters by role (``model.param_roles()``:
embed / hidden / head / vector) and by learning-rate multiplier ``p.lr_mult`` (set by the
parametrization, default 1), one param group per (role, multiplier), each tagged ``role``.

Weight decay: matrices (hidden, head) get none inside any optimizer — their decoupled decay
W ← (1 − λη)W is done by ``lipflow.constraints.constrain_all_`` after the step (see
``lipflow.train.update``), with the same λ = cfg weight_decay, so decay and constraint compose
(step → decay → project; Modula decays before the step). Embedding tables get cfg weight_decay inside AdamW (also the AdamW half of Muon;
none under Muon's ``dualized`` embedding step, as in the reference); vectors (biases, gains) get
none, as in nanoGPT. Scion/uSCG add no decay of their own (constrained Scion's (1 − γ) contraction
plays that role, Pethick et al. 2025); the decoupled decay after the step applies to their matrices
too when weight_decay > 0 (default 0).

Layout: matrices are (fan_out, fan_in) as in nn.Linear. Role ``embed`` holds lookup tables
stored (num_embeddings, dim) with one-hot inputs; the LMOs see their transpose.

Each Muon/Scion step records ``state[p]["update_norm"]``, a bound on the RMS→RMS operator norm
of the step's update of matrix p (for constrained Scion, of its LMO part γρ·lmo(d); the whole step
also contracts W by (1 − γ)), also given by ``optimizer.update_bound(group, p)`` before the step
(the soft cap couples to it, see lipflow.train.update: the contraction only lowers the k it caps).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterator

import torch
from torch import nn

from lipflow.model.base import ROLES
from lipflow.optimizers.common import ADAM_EPS
from lipflow.optimizers.muon import (MUON_NS_COEFFICIENTS, NS_COEFFICIENT_SETS, UPDATE_SCALES,
                                    YOU_NS_COEFFICIENTS, Muon, newton_schulz, newton_schulz_peak)
from lipflow.optimizers.scion import LMOS, SCION_GPT_DEFAULTS, Scion
from lipflow.registry import Registry

__all__ = ["LMOS", "MUON_NS_COEFFICIENTS", "NS_COEFFICIENT_SETS", "OPTIMIZERS", "SCION_GPT_DEFAULTS", "UPDATE_SCALES",
           "YOU_NS_COEFFICIENTS", "Muon", "Scion", "build_optimizer", "declares_geometry", "newton_schulz",
           "newton_schulz_peak", "update_geometry"]

OptimizerBuilder = Callable[[nn.Module, dict[str, Any]], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerBuilder] = Registry("optimizer")


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
    """torch.optim.AdamW with lr·lr_mult per group; betas (beta1, beta2). Fused (multi-tensor CUDA
    kernels, as nanoGPT uses) when the whole model is on CUDA; torch's default elsewhere. A resumed
    optimizer keeps the setting its checkpoint was saved with (``load_state_dict`` restores groups)."""
    groups = [dict(params=params, lr=cfg["lr"] * mult, weight_decay=_embed_decay(role, cfg), role=role)
              for role, mult, params in _role_groups(model)]
    on_cuda = {p.device.type for p in model.parameters()} == {"cuda"}
    # floats: a config's `beta1: 0` is an int, and torch refuses betas of an int and a float
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(float(cfg["beta1"]), float(cfg["beta2"])),
                             eps=ADAM_EPS, weight_decay=0.0, fused=True if on_cuda else None)


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
