"""Parametrizations (registry ``parametrization``): per-parameter init, lr multipliers, readout multiplier.

``build_model`` applies ``PARAMETRIZATIONS.get(cfg["parametrization"])(model, cfg, width_twin)`` once:
it may re-initialize parameters, sets ``p.lr_mult`` on every parameter (the optimizer builder
multiplies each parameter's lr by it) and sets ``model.output_mult``. ``width_twin(w)`` builds the
same model at d_model = w; called on the meta device (nothing allocated), it tells which dimensions
grow with width by comparing shapes (microsoft/mup's ``set_base_shapes``).

µP (Yang et al. 2021, Tensor Programs V, Table 3; microsoft/mup), width multiplier m = d_model/base_width.
How a rule reads depends on how the optimizer moves a parameter (its builder's ``update_geometry``,
declared beside it in :mod:`lipflow.optimizers`):
- ``entrywise`` (Adam: every entry moves ≈ lr whatever the shape) — mup's MuAdam: tensors whose
  fan_in and fan_out both grow with width get lr/m; input weights, embeddings, biases and gains
  keep lr; the readout keeps lr and its logits are multiplied by 1/m (mup's MuReadout, the
  multiplier form of init variance 1/fan_in² and lr η/fan_in).
- ``normalized`` (Muon's √(fan_out/fan_in)·msign(G), Scion's LMOs in normalized norms): the update
  already has a width-independent RMS→RMS norm (or per-entry size lr/fan_in for Scion's Sign head),
  which is the spectral condition for feature learning (Yang, Simon & Bernstein 2023,
  ‖ΔW‖ = Θ(√(fan_out/fan_in))). So lr × 1 and output multiplier 1.
In both cases the readout starts at zero. Attention uses 1/d_head (gpt applies it when
parametrization = mup; lipschitz_gpt always uses attn_scale/d_head), and hidden init variance ∝ 1/fan_in
(already true of every model's own init: PyTorch's default, orthogonal·√(fan_out/fan_in)).

Depth-µP (Yang et al. 2023, Tensor Programs VI; α = ½ of Dey et al. 2025's branch scaling L^(−α),
whose CompleteP is α = 1): with
``depth_mup`` the model multiplies each residual branch by 1/√L, and hidden lr gets × L^(α−1) = 1/√L
(for Adam, Muon and Scion alike: all normalize the update, so the gradient's 1/√L does not carry through).

Modular (Large et al. 2024, "Scalable optimization in the modular norm"; Bernstein & Newhouse 2024;
the per-layer step sizes of Newhouse et al. 2025's Muon): the model describes itself as a Modula
expression (``LanguageModel.modular_structure``) and every weight's lr multiplier is the target
norm Modula's ``dualize`` gives it at target 1 (``target_norms``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import nn

from lipflow.registry import Registry

Parametrization = Callable[[nn.Module, dict[str, Any], Callable[[int], nn.Module]], None]
PARAMETRIZATIONS: Registry[Parametrization] = Registry("parametrization")

def width_dimension_counts(model: nn.Module, width_twin: Callable[[int], nn.Module], d_model: int) -> dict[str, int]:
    """Per parameter name, how many of its dimensions grow with d_model (0, 1 or 2)."""
    with torch.device("meta"):
        twin = width_twin(2 * d_model)
    twin_shapes = {name: p.shape for name, p in twin.named_parameters()}
    return {name: sum(a != b for a, b in zip(p.shape, twin_shapes[name]))
            for name, p in model.named_parameters()}


def _depth_factor(cfg: dict[str, Any]) -> float:
    return 1.0 / math.sqrt(cfg["n_layers"]) if cfg["depth_mup"] else 1.0


@PARAMETRIZATIONS.register("sp")
def standard(model: nn.Module, cfg: dict[str, Any], width_twin: Callable[[int], nn.Module]) -> None:
    """Standard parametrization: the model's own init, lr × 1 (hidden lr × 1/√L under depth_mup), no readout multiplier."""
    depth = _depth_factor(cfg)
    for role, params in model.param_roles().items():
        for _, p in params:
            p.lr_mult = depth if role == "hidden" else 1.0
    model.output_mult = 1.0


@PARAMETRIZATIONS.register("mup")
@torch.no_grad()
def maximal_update(model: nn.Module, cfg: dict[str, Any], width_twin: Callable[[int], nn.Module]) -> None:
    """µP: zero-init readout; lr and readout multipliers per the update geometry of cfg['optimizer']."""
    from lipflow.optimizers import update_geometry  # at call time: lipflow.optimizers imports lipflow.model

    if "optimizer" not in cfg:
        raise ValueError("optimizer: the mup parametrization needs the optimizer name to pick its multipliers")
    geometry = update_geometry(cfg["optimizer"])
    d_model, base_width = cfg["d_model"], cfg["base_width"]
    if base_width <= 0:
        raise ValueError(f"base_width={base_width} must be positive")
    m = d_model / base_width
    n_width = width_dimension_counts(model, width_twin, d_model)
    depth = _depth_factor(cfg)
    roles = model.param_roles()
    for role, params in roles.items():
        for name, p in params:
            entrywise_hidden = geometry[role] == "entrywise" and n_width[name] == 2
            p.lr_mult = 1.0 / m if entrywise_hidden else 1.0
            if role == "hidden":
                p.lr_mult *= depth
            if role == "head":
                p.zero_()
    # mup's MuReadout divides by the readout's fan_in multiplier: 1/m where its fan_in grows with width, 1 where
    # nothing in it does (the one-layer mlp, in_features → n_classes, whose shape d_model does not reach)
    head_grows = any(n_width[name] > 0 for name, _ in roles["head"])
    model.output_mult = 1.0 / m if geometry["head"] == "entrywise" and head_grows else 1.0


# ----------------------------------------------------------------------------- modular norm


@dataclass(frozen=True)
class Module:
    """A Modula module reduced to what ``dualize`` reads (modula/abstract.py in Arongil/lipschitz-transformers).

    kind "atom": one weight (parameter ``name``), mass 1 and sensitivity 1 like Modula's Linear and
    Embed; "bond": no weight, mass 0, sensitivity = its Lipschitz constant (Mul(c) has c; ReLU,
    GELU/1.1289, RoPE, QKᵀ/d_head, the causal mask, softmax and Add have 1); "seq": ``children``
    applied first to last (Modula's ``@``: masses add, sensitivities multiply); "par": children on
    one input, outputs added or kept as a tuple (TupleModule: masses add, sensitivities add).
    """

    kind: str
    mass: float
    sensitivity: float
    children: tuple["Module", ...] = ()
    name: str = ""


def atom(name: str) -> Module:
    return Module("atom", 1.0, 1.0, name=name)


def bond(sensitivity: float) -> Module:
    return Module("bond", 0.0, sensitivity)


def seq(*children: Module) -> Module:
    """children[0] ∘ … in application order: children[0] first."""
    return Module("seq", sum(c.mass for c in children), math.prod(c.sensitivity for c in children), children)


def par(*children: Module) -> Module:
    return Module("par", sum(c.mass for c in children), sum(c.sensitivity for c in children), children)


def residual(keep: float, weight: float, branch: Module) -> Module:
    """keep·Identity + weight·branch (Modula's GPT residual: keep = 1−α, weight = α):
    sensitivity keep + weight·s_branch."""
    return par(bond(keep), seq(branch, bond(weight)))


def tare(module: Module, mass: float) -> Module:
    """Modula's ``tare(absolute=mass)``: the module's mass becomes ``mass``. Modula rescales every
    descendant by the same factor; ``target_norms`` reads only mass ratios inside a module, so
    only the module's own mass changes here."""
    return replace(module, mass=float(mass))


def target_norms(module: Module, target: float = 1.0) -> dict[str, float]:
    """Per atom name, the target norm t that Modula's ``dualize(grad, target_norm=target)`` gives it.

    CompositeModule.dualize (m1 ∘ m0): m0 gets t·mass₀/mass/sensitivity₁, m1 gets t·mass₁/mass;
    unrolled over a chain, child i gets t·massᵢ/mass / Π_{j>i} sensitivityⱼ (everything downstream).
    TupleModule.dualize: child i gets t·massᵢ/mass. A mass-0 module gets no update (Modula returns zeros).
    """
    if module.kind == "atom":
        return {module.name: target}
    total = sum(c.mass for c in module.children)
    out: dict[str, float] = {}
    downstream = 1.0
    for child in reversed(module.children):
        if child.mass > 0:
            share = target * child.mass / total
            out.update(target_norms(child, share / downstream if module.kind == "seq" else share))
        if module.kind == "seq":
            downstream *= child.sensitivity
    return out


@PARAMETRIZATIONS.register("modular")
def modular(model: nn.Module, cfg: dict[str, Any], width_twin: Callable[[int], nn.Module]) -> None:
    """lr × t per weight, t = its target norm under Modula's mass/sensitivity rule (``target_norms``);
    model init unchanged, output multiplier 1. cfg ``masses`` (embed / blocks / head; null or missing
    keys: the model's ``modular_masses``) sets the tared masses of the model's parts.

    Checked against the reference itself: Modula's ``GPT(vocab 65, 4 heads, d 256, 3 blocks,
    blocks_mass 16).dualize`` (Arongil/lipschitz-transformers 158692e, JAX) gives updates of RMS→RMS
    norm 0.8883 (q, k, v), 0.2961 (W_o, MLP) and 0.0555 (head; embedding column RMS 0.0556): these
    t = 8/9, 8/27, 1/18 times the peak 0.99933 of its 6-step Newton–Schulz.
    With Muon, t·lr is each matrix's step size and the soft cap couples to it (the group's lr).
    Under lipflow's Muon the embedding is on AdamW, whose lr (adam_lr) is multiplied by its t. With
    optimizer adamw every Adam step is multiplied by t; the reference's Adam runs (post_dualize off)
    use t only in the decay and the cap's coupling, not in the step."""
    name = cfg["model"]
    if model.modular_masses is None:
        raise ValueError(f"parametrization: 'modular' needs a model with a Lipschitz structure "
                         f"(lipschitz_gpt, lipschitz_gpt_unscaled, mlp); '{name}' has none "
                         "(its LayerNorm has no sensitivity)")
    given = cfg["masses"] or {}
    unknown = sorted(set(given) - set(model.modular_masses))
    if unknown:
        raise ValueError(f"masses: model '{name}' has no part {unknown[0]}; its parts are "
                         f"{', '.join(model.modular_masses)}")
    targets = target_norms(model.modular_structure({**model.modular_masses, **given}))
    for param_name, p in model.named_parameters():
        p.lr_mult = targets[param_name]
    model.output_mult = 1.0
