"""Optimizers: Newton–Schulz band, LMO duality (closed forms), descent, update norms, resume."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from lipflow.config import run_defaults
from lipflow.constraints import constrain_
from lipflow.model import build_model
from lipflow.optimizers import (LMOS, MUON_NS_COEFFICIENTS, NS_COEFFICIENT_SETS, OPTIMIZERS, SCION_GPT_DEFAULTS, Muon, Scion,
                                build_optimizer, newton_schulz, newton_schulz_peak)
from lipflow.registry import UnknownNameError

VOCAB, DIM = 16, 24


class ToyModel(nn.Module):
    """Embedding → Linear+bias → GELU → head: one parameter of each role."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.tok = nn.Embedding(VOCAB, DIM)
        self.hidden = nn.Linear(DIM, 2 * DIM)
        self.head = nn.Linear(2 * DIM, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.nn.functional.gelu(self.hidden(self.tok(idx))))

    def param_roles(self):
        return {"embed": [("tok.weight", self.tok.weight)], "hidden": [("hidden.weight", self.hidden.weight)],
                "head": [("head.weight", self.head.weight)], "vector": [("hidden.bias", self.hidden.bias)]}


CFGS = {
    "adamw": run_defaults(optimizer="adamw", lr=1e-2, weight_decay=0.1),
    "muon": run_defaults(optimizer="muon", lr=0.05, adam_lr=1e-2, weight_decay=0.1),
    "scion": run_defaults(optimizer="scion", lr=0.05, momentum=0.9),
    "uscg": run_defaults(optimizer="uscg", lr=0.02, momentum=0.9),
}
INPUTS = torch.arange(VOCAB).repeat(4)
TARGETS = (3 * INPUTS + 5) % VOCAB  # a permutation of the vocabulary to learn


def toy_loss(model: ToyModel) -> torch.Tensor:
    return nn.functional.cross_entropy(model(INPUTS), TARGETS)


def train(model: ToyModel, optimizer: torch.optim.Optimizer, steps: int) -> float:
    for _ in range(steps):
        optimizer.zero_grad()
        loss = toy_loss(model)
        loss.backward()
        optimizer.step()
    return toy_loss(model).item()


def make_matrix(kind: str, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    if kind == "low_rank":
        x = torch.randn(shape[0], 2, generator=gen) @ torch.randn(2, shape[1], generator=gen)
    if kind == "ill_conditioned":
        x = x * torch.logspace(0, -5, shape[1])
    return x


SHAPES = [(32, 32), (64, 16), (16, 64)]
KINDS = ["random", "low_rank", "ill_conditioned"]


def rms_operator_norm(w: torch.Tensor) -> float:
    fan_out, fan_in = w.shape
    return torch.linalg.matrix_norm(w.double(), ord=2).item() / math.sqrt(fan_out / fan_in)


def ns_scalar_map(x: np.ndarray, steps: int) -> np.ndarray:
    a, b, c = MUON_NS_COEFFICIENTS
    for _ in range(steps):
        x = a * x + b * x ** 3 + c * x ** 5
    return x


# ----------------------------------------------------------------------------- Newton–Schulz


@pytest.mark.parametrize("steps", [1, 3, 5])
def test_newton_schulz_peak_matches_a_dense_grid(steps):
    grid_max = ns_scalar_map(np.linspace(0.0, 1.0, 2_000_001), steps).max()
    assert grid_max - 1e-12 <= newton_schulz_peak(steps) <= grid_max + 1e-6
    assert newton_schulz_peak(steps) == pytest.approx(1.2024, abs=1e-4)  # documented value


def test_newton_schulz_peak_bounds_singular_values_a_step_maps_below_zero():
    """p(x) = x − 3x³ has max 2/9 on [0, 1] but p(1) = −2: a singular value at ‖G‖_F (a rank-one G) comes
    out as |−2| = 2 (NS keeps the vectors, flips the sign), which the peak must bound."""
    coefficients = (1.0, -3.0, 0.0)
    g = torch.outer(torch.arange(1.0, 5.0), torch.tensor([1.0, -2.0, 0.5]))
    out = newton_schulz(g, 1, coefficients=coefficients)
    sigma = torch.linalg.matrix_norm(out.double(), ord=2).item()
    assert sigma == pytest.approx(2.0, rel=1e-5)
    assert sigma <= newton_schulz_peak(1, coefficients) * (1 + 1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_singular_values_follow_the_scalar_map(kind, shape):
    g = make_matrix(kind, shape)
    out = newton_schulz(g, 5)
    s_in = torch.linalg.svdvals(g.double())
    s_out = torch.linalg.svdvals(out.double())
    predicted = np.sort(ns_scalar_map((s_in / (g.norm().double() + 1e-7)).numpy(), 5))[::-1].copy()
    np.testing.assert_allclose(s_out.numpy(), predicted, atol=2e-4)
    # documented band: all ≤ peak; σ ≥ 0.00151·‖G‖_F lands in [0.6818, 1.2024]
    assert s_out.max().item() <= newton_schulz_peak(5) * (1 + 1e-5)
    resolved = np.sort((s_in / g.norm().double()).numpy())[::-1] >= 0.00151
    assert (s_out.numpy()[resolved] >= 0.6818 - 1e-4).all()
    # singular vectors are kept: the output is UφVᵀ, so GᵀO is symmetric PSD
    gto = (g.double().T @ out.double())
    torch.testing.assert_close(gto, gto.T, atol=1e-4 * g.norm().item(), rtol=0)


def test_newton_schulz_of_zero_is_zero():
    assert torch.count_nonzero(newton_schulz(torch.zeros(6, 9), 5)) == 0


# ----------------------------------------------------------------------------- LMOs

# name -> (primal norm ‖W‖, dual norm ‖G‖_*), each as a closed form with input dimension d
NORMS = {
    "spectral": (lambda w, d: math.sqrt(d / w.shape[0]) * torch.linalg.matrix_norm(w, ord=2).item(),
                 lambda g, d: math.sqrt(g.shape[0] / d) * torch.linalg.matrix_norm(g, ord="nuc").item()),
    "sign": (lambda w, d: d * w.abs().max().item(),
             lambda g, d: g.abs().sum().item() / d),
    "colnorm": (lambda w, d: d * (w.norm(dim=0) / math.sqrt(w.shape[0])).max().item(),
                lambda g, d: math.sqrt(g.shape[0]) / d * g.norm(dim=0).sum().item()),
    "rownorm": (lambda w, d: math.sqrt(d) * w.norm(dim=1).max().item(),
                lambda g, d: g.norm(dim=1).sum().item() / math.sqrt(d)),
    "bias_rms": (lambda w, d: (w.norm() / math.sqrt(w.numel())).item(),
                 lambda g, d: math.sqrt(g.numel()) * g.norm().item()),
}


def test_lmo_registry_covers_the_documented_norms():
    assert LMOS.names() == sorted(NORMS)


@pytest.mark.parametrize("name", sorted(NORMS))
@pytest.mark.parametrize("shape", SHAPES + [(40, 1)])
@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize("kind", ["random", "low_rank"])
def test_lmo_attains_the_dual_norm(name, shape, one_hot, kind):
    g = make_matrix(kind, shape).double()
    d = 1 if one_hot else shape[1]
    s = LMOS.get(name)(g, d)
    primal, dual = NORMS[name]
    assert (g * s).sum().item() == pytest.approx(-dual(g, d), rel=1e-6)
    assert primal(s, d) == pytest.approx(1.0, rel=1e-6)
    # a minimizer: no random point of the unit ball does better
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        r = torch.randn(shape, generator=gen, dtype=torch.float64)
        r = r / primal(r, d)
        assert (g * r).sum().item() >= (g * s).sum().item() - 1e-9


@pytest.mark.parametrize("name", sorted(NORMS))
def test_lmo_of_zero_is_zero(name):
    assert torch.count_nonzero(LMOS.get(name)(torch.zeros(5, 7), 7)) == 0


@pytest.mark.parametrize("name", sorted(NORMS))
@pytest.mark.parametrize("magnitude", [1e-25, 3e-22, 1e-15, 1e20])
def test_float32_lmo_of_a_tiny_or_huge_direction_stays_on_the_unit_sphere(name, magnitude):
    """Each LMO is scale-invariant: a float32 direction of entries ~1e-25 (a momentum that decayed for a few
    hundred steps without gradient: its squares underflow, ‖g‖₂ computes to 0) or ~1e20 (squares overflow,
    ‖g‖₂ = inf) has the LMO of the same direction at unit scale, on the unit sphere of the norm (closed form
    in float64), not ~1e13 times outside it or zero."""
    d = 12
    g = make_matrix("random", (8, d)).double()
    expected = LMOS.get(name)(g, d)
    s = LMOS.get(name)((g * magnitude).float(), d).double()
    primal, _ = NORMS[name]
    assert primal(s, d) == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(s, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in sorted(NORMS) if n != "bias_rms"])
@pytest.mark.parametrize("shape", SHAPES)
def test_lmo_rms_bound(name, shape):
    lmo = LMOS.get(name)
    for kind in KINDS:
        norm = rms_operator_norm(lmo(make_matrix(kind, shape).double(), shape[1]))
        if lmo.rms_bound is not None:
            assert norm <= lmo.rms_bound * (1 + 1e-9)
        if name == "spectral":
            assert norm == pytest.approx(1.0, rel=1e-9)


# ----------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("name", sorted(CFGS))
def test_optimizers_reduce_a_simple_loss(name):
    model = ToyModel()
    optimizer = build_optimizer(model, CFGS[name])
    assert isinstance(optimizer, torch.optim.Optimizer)
    start = toy_loss(model).item()
    assert train(model, optimizer, 60) < 0.3 * start


@pytest.mark.parametrize("name", sorted(CFGS))
def test_a_beta_written_as_a_whole_number_builds_the_optimizer(name):
    """`beta1: 0` (no first moment) is a valid config, read from YAML or JSON as the int 0; torch's AdamW
    refused betas (0, 0.95) in a line naming no key ("betas must be either both floats or both Tensors")."""
    model = ToyModel()
    for betas in ((0, 0.95), (0.9, 0), (0, 0)):
        optimizer = build_optimizer(model, {**CFGS[name], "beta1": betas[0], "beta2": betas[1]})
        train(model, optimizer, 1)


def test_registry_names():
    assert {"adamw", "muon", "scion", "uscg"} <= set(OPTIMIZERS.names())  # one more is added by one file (README)
    with pytest.raises(UnknownNameError, match="did you mean 'muon'"):
        build_optimizer(ToyModel(), dict(optimizer="moun", lr=0.1))


@pytest.mark.parametrize("shape", [(48, 48), (96, 24), (24, 96)])
def test_muon_reduces_least_squares(shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, shape[1], generator=gen)
    target = x @ torch.randn(shape[1], shape[0], generator=gen) / math.sqrt(shape[1])
    w = nn.Parameter(torch.zeros(shape))
    optimizer = Muon([w], lr=0.02)
    losses = []
    for _ in range(100):
        optimizer.zero_grad()
        loss = ((x @ w.T - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_muon_follows_nesterov_momentum():
    """m ← βm + (1−β)g, u = (1−β)g + βm, W ← W − η√(fan_out/fan_in)·NS(u), over two steps."""
    gen = torch.Generator().manual_seed(2)
    g1, g2 = torch.randn(12, 30, generator=gen), torch.randn(12, 30, generator=gen)
    w = nn.Parameter(torch.randn(12, 30, generator=gen))
    expected = w.detach().clone()
    optimizer = Muon([w], lr=0.1, momentum=0.8, ns_steps=4)
    m = torch.zeros_like(expected)
    for g in (g1, g2):
        w.grad = g.clone()
        optimizer.step()
        m = 0.8 * m + 0.2 * g
        expected = expected - 0.1 * math.sqrt(12 / 30) * newton_schulz(0.2 * g + 0.8 * m, 4)
    torch.testing.assert_close(w.detach(), expected, atol=1e-6, rtol=0)


def test_muon_adamw_groups_match_torch_adamw():
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(7, 5, generator=gen) for _ in range(4)]
    start = torch.randn(7, 5, generator=gen)
    ours, theirs = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    hyper = dict(lr=0.01, betas=(0.8, 0.9), eps=1e-8, weight_decay=0.3)
    mine = Muon([ours], kind="adamw", **hyper)
    reference = torch.optim.AdamW([theirs], **hyper)
    for g in grads:
        ours.grad, theirs.grad = g.clone(), g.clone()
        mine.step()
        reference.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_muon_update_norm_is_the_measured_rms_norm(kind, shape):
    w = nn.Parameter(torch.randn(shape))
    w.grad = make_matrix(kind, shape)
    lr = 0.03
    optimizer = Muon([w], lr=lr)
    before = w.detach().clone()
    optimizer.step()
    measured = rms_operator_norm(w.detach() - before)
    recorded = optimizer.state[w]["update_norm"]
    assert recorded == pytest.approx(lr * newton_schulz_peak(5))
    assert measured <= recorded * (1 + 1e-5)
    # first step: direction ∝ g, so the step's top singular value is lr·max φ(σ_i/‖g‖_F)
    s = torch.linalg.svdvals(w.grad.double()) / (w.grad.double().norm())
    assert measured == pytest.approx(lr * ns_scalar_map(s.numpy(), 5).max(), rel=1e-4)


@pytest.mark.parametrize("constrained", [True, False])
@pytest.mark.parametrize("norm", ["spectral", "sign", "rownorm"])
@pytest.mark.parametrize("shape", SHAPES)
def test_scion_update_norm(constrained, norm, shape):
    w = nn.Parameter(torch.randn(shape))
    lr, radius = 0.05, 3.0
    optimizer = Scion([w], lr=lr, momentum=0.5, constrained=constrained, norm=norm, radius=radius)
    for kind in KINDS:
        w.grad = make_matrix(kind, shape)
        before = w.detach().clone()
        optimizer.step()
        lmo_step = w.detach() - (1 - lr if constrained else 1.0) * before
        measured = rms_operator_norm(lmo_step)
        recorded = optimizer.state[w]["update_norm"]
        assert recorded == pytest.approx(lr * radius)
        assert measured <= recorded * (1 + 1e-5)
        if norm == "spectral":
            assert measured == pytest.approx(recorded, rel=1e-5)


def test_scion_update_rules():
    """x ← (1−γ)x + γρ·lmo(d) (Scion) and x ← x + γρ·lmo(d) (uSCG), with d ← (1−α)d + αg."""
    gen = torch.Generator().manual_seed(3)
    g1, g2 = torch.randn(8, 12, generator=gen), torch.randn(8, 12, generator=gen)
    for constrained in (True, False):
        w = nn.Parameter(torch.randn(8, 12, generator=gen))
        x0 = w.detach().clone()
        optimizer = Scion([w], lr=0.1, momentum=0.3, constrained=constrained, norm="sign", radius=2.0)
        expected = x0
        d = torch.zeros_like(x0)
        for g in (g1, g2):
            w.grad = g.clone()
            optimizer.step()
            d = 0.7 * d + 0.3 * g
            expected = (0.9 if constrained else 1.0) * expected + 0.1 * 2.0 * (-torch.sign(d) / 12)
        torch.testing.assert_close(w.detach(), expected, atol=1e-6, rtol=0)


def test_scion_embedding_tables_use_one_hot_scaling():
    """An embedding table (vocab, dim) under colnorm gets token rows of RMS ρ (ℓ1→RMS LMO on the transpose)."""
    table = nn.Parameter(torch.zeros(10, 6))
    table.grad = torch.randn(10, 6)
    Scion([table], lr=1.0, momentum=1.0, constrained=True, norm="colnorm", radius=1.0, embedding=True).step()
    rms = table.detach().pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(rms, torch.ones(10), atol=1e-6, rtol=0)


def test_muon_soft_cap_coupling_keeps_sigma_max():
    """Muon steps + constrain_(soft cap) with the optimizer's update bound: σ stays ≤ σmax."""
    sigma_max, shape = 1.0, (48, 24)
    scale = math.sqrt(shape[0] / shape[1])
    gen = torch.Generator().manual_seed(5)
    w = nn.Parameter(torch.linalg.qr(torch.randn(shape, generator=gen))[0] * scale * sigma_max)
    optimizer = Muon([w], lr=0.05, momentum=0.9)
    grown = False
    for _ in range(50):
        w.grad = torch.randn(shape, generator=gen) - 0.5 * w.detach()  # push outwards
        optimizer.step()
        grown |= rms_operator_norm(w.detach()) > sigma_max * (1 + 1e-3)
        group = optimizer.param_groups[0]
        constrain_(w.data, "spectral_soft_cap", sigma_max, lr=group["lr"], weight_decay=0.0,
                   update_norm=optimizer.state[w]["update_norm"], spectral_wd=0.0)
        assert rms_operator_norm(w.detach()) <= sigma_max * (1 + 1e-3)
    assert grown


# ----------------------------------------------------------------------------- builders


def test_groups_follow_roles_and_lr_multipliers():
    model = ToyModel()
    model.hidden.weight.lr_mult = 0.25
    cfg = CFGS["muon"]
    optimizer = build_optimizer(model, cfg)
    groups = {g["role"]: g for g in optimizer.param_groups}
    assert groups["hidden"]["kind"] == "muon" and groups["hidden"]["lr"] == pytest.approx(0.25 * cfg["lr"])
    assert groups["head"]["kind"] == "muon" and groups["head"]["lr"] == cfg["lr"]
    assert groups["embed"]["kind"] == "adamw" and groups["embed"]["lr"] == cfg["adam_lr"]
    assert groups["embed"]["weight_decay"] == cfg["weight_decay"]
    assert groups["vector"]["kind"] == "adamw" and groups["vector"]["weight_decay"] == 0.0
    assert groups["hidden"]["weight_decay"] == groups["head"]["weight_decay"] == 0.0  # constrain_ decays matrices

    adamw = build_optimizer(model, CFGS["adamw"])
    decay = {g["role"]: g["weight_decay"] for g in adamw.param_groups}
    assert decay == {"embed": 0.1, "hidden": 0.0, "head": 0.0, "vector": 0.0}
    assert {g["role"]: g["lr"] for g in adamw.param_groups}["hidden"] == pytest.approx(0.25 * 1e-2)


def test_muon_adamw_half_multiplies_adam_lr_by_each_parameters_multiplier():
    """Under ``parametrization: modular`` the embedding on Muon's AdamW half steps at adam_lr·t (its target
    norm), vectors at adam_lr·their multiplier; the Muon groups at lr·t."""
    model = ToyModel()
    model.tok.weight.lr_mult, model.hidden.bias.lr_mult, model.head.weight.lr_mult = 0.125, 0.5, 0.25
    cfg = CFGS["muon"]
    groups = {g["role"]: g for g in build_optimizer(model, cfg).param_groups}
    assert groups["embed"]["kind"] == "adamw" and groups["embed"]["lr"] == pytest.approx(0.125 * cfg["adam_lr"])
    assert groups["vector"]["kind"] == "adamw" and groups["vector"]["lr"] == pytest.approx(0.5 * cfg["adam_lr"])
    assert groups["head"]["kind"] == "muon" and groups["head"]["lr"] == pytest.approx(0.25 * cfg["lr"])
    dualized = {g["role"]: g for g in build_optimizer(model, dict(cfg, embed_optimizer="dualized")).param_groups}
    assert dualized["embed"]["kind"] == "dualized" and dualized["embed"]["lr"] == pytest.approx(0.125 * cfg["lr"])


def test_scion_builder_uses_the_norm_table():
    model = ToyModel()
    optimizer = build_optimizer(model, dict(CFGS["scion"], lmo_norms={"head": "rownorm"}, lmo_radius={"hidden": 7}))
    groups = {g["role"]: g for g in optimizer.param_groups}
    defaults = SCION_GPT_DEFAULTS
    assert groups["head"]["norm"] == "rownorm" and groups["head"]["radius"] == defaults["lmo_radius"]["head"]
    assert groups["hidden"]["norm"] == defaults["lmo_norms"]["hidden"] == "spectral"
    assert groups["hidden"]["radius"] == 7.0
    assert groups["embed"]["embedding"] and not groups["hidden"]["embedding"]
    assert groups["hidden"]["momentum"] == pytest.approx(0.1)  # α = 1 − momentum
    assert all(g["constrained"] for g in optimizer.param_groups)
    assert not any(g["constrained"] for g in build_optimizer(model, CFGS["uscg"]).param_groups)


@pytest.mark.parametrize("cfg,message", [
    (run_defaults(optimizer="scion", lr=0.1, lmo_norms={"hiden": "spectral"}), "unknown roles"),
    (run_defaults(optimizer="scion", lr=0.1, lmo_norms={"hidden": "spectrl"}), "did you mean 'spectral'"),
    (run_defaults(optimizer="scion", lr=0.1, lmo_norms={"vector": "spectral"}), "needs 2-D parameters"),
    (run_defaults(optimizer="uscg", lr=0.1, constrained=True), "contradicts"),
])
def test_builder_errors(cfg, message):
    with pytest.raises((ValueError, UnknownNameError), match=message):
        build_optimizer(ToyModel(), cfg)


def test_roles_must_cover_every_parameter():
    model = ToyModel()
    model.param_roles = lambda: {"hidden": [("hidden.weight", model.hidden.weight)]}
    with pytest.raises(ValueError, match="without a role"):
        build_optimizer(model, CFGS["adamw"])


def test_muon_rejects_decay_and_non_matrices():
    with pytest.raises(ValueError, match="no weight_decay"):
        Muon([nn.Parameter(torch.zeros(3, 3))], weight_decay=0.1)
    with pytest.raises(ValueError, match="2-D"):
        Muon([nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="kind"):
        Muon([nn.Parameter(torch.zeros(3, 3))], kind="sgd")


@pytest.mark.parametrize("name", sorted(CFGS))
def test_state_dict_round_trip_resumes_bit_exactly(name):
    model = ToyModel()
    optimizer = build_optimizer(model, CFGS[name])
    train(model, optimizer, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    resumed = ToyModel(seed=123)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = build_optimizer(resumed, CFGS[name])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    reference = copy.deepcopy(model)  # keep `model` running with its own optimizer
    train(model, optimizer, 4)
    train(resumed, resumed_optimizer, 4)
    for (n, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert optimizer.state[p].keys() == resumed_optimizer.state[q].keys()


def test_update_bounds_follow_each_optimizer():
    model = ToyModel()
    muon = build_optimizer(model, CFGS["muon"])
    train(model, muon, 1)
    bounds = {id(p): (g["lr"], muon.update_bound(g, p)) for g in muon.param_groups for p in g["params"]}
    lr, update = bounds[id(model.hidden.weight)]
    assert lr == CFGS["muon"]["lr"] and update == pytest.approx(lr * newton_schulz_peak(5))
    assert muon.state[model.hidden.weight]["update_norm"] == update
    assert bounds[id(model.tok.weight)] == (CFGS["muon"]["adam_lr"], None)
    scion = build_optimizer(ToyModel(), CFGS["scion"])
    group = next(g for g in scion.param_groups if g["role"] == "hidden")
    assert scion.update_bound(group, group["params"][0]) == pytest.approx(0.05 * 3.0 * 1.0)
    embed = next(g for g in scion.param_groups if g["role"] == "embed")
    assert scion.update_bound(embed, embed["params"][0]) is None


@pytest.mark.parametrize("shape", [(32, 32), (64, 16), (16, 48)])
def test_batched_newton_schulz_equals_one_matrix_at_a_time(shape):
    gen = torch.Generator().manual_seed(3)
    stack = torch.randn(5, *shape, generator=gen) * torch.logspace(-2, 2, 5)[:, None, None]
    batched = newton_schulz(stack, 5)
    for g, out in zip(stack, batched):
        torch.testing.assert_close(out, newton_schulz(g, 5), atol=2e-6, rtol=0)


def test_muon_step_batched_by_shape_equals_a_per_matrix_muon():
    """Muon steps several same-shape matrices as one stack: the same weights as Keller Jordan's
    per-matrix update written out here (Nesterov lerp, NS5, √(fan_out/fan_in))."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(24, 16), (24, 16), (16, 24), (24, 16)]
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    reference = [p.detach().clone() for p in params]
    buffers = [torch.zeros_like(p) for p in params]
    optimizer = Muon(params, lr=0.05, momentum=0.9)
    for _ in range(3):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        for w, buf, g in zip(reference, buffers, grads):
            buf.lerp_(g, 0.1)
            w.add_(newton_schulz(g.lerp(buf, 0.9), 5), alpha=-0.05 * math.sqrt(w.shape[0] / w.shape[1]))
    for p, w in zip(params, reference):
        torch.testing.assert_close(p.detach(), w, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- the reference's Muon options


def composed_ns_map(x: np.ndarray, schedule) -> np.ndarray:
    for a, b, c in schedule:
        x = a * x + b * x ** 3 + c * x ** 5
    return x


def test_you_coefficients_peak_below_one_and_follow_their_scalar_map():
    from lipflow.optimizers import YOU_NS_COEFFICIENTS

    grid_max = composed_ns_map(np.linspace(0.0, 1.0, 2_000_001), YOU_NS_COEFFICIENTS).max()
    peak = newton_schulz_peak(6, YOU_NS_COEFFICIENTS)
    assert grid_max - 1e-12 <= peak <= grid_max + 1e-6
    assert peak == pytest.approx(0.99933, abs=2e-5)  # the value the reference's coupling relies on
    g = make_matrix("random", (48, 24))
    out = newton_schulz(g, 6, coefficients=YOU_NS_COEFFICIENTS)
    predicted = np.sort(composed_ns_map((torch.linalg.svdvals(g.double()) / (g.norm().double() + 1e-7)).numpy(),
                                        YOU_NS_COEFFICIENTS))[::-1].copy()
    np.testing.assert_allclose(torch.linalg.svdvals(out.double()).numpy(), predicted, atol=2e-4)


def test_a_coefficient_schedule_needs_its_own_step_count():
    with pytest.raises(ValueError, match="ns_steps: .* exactly 6 steps"):
        build_optimizer(ToyModel(), {**CFGS["muon"], "ns_coefficients": "you", "ns_steps": 5})


@pytest.mark.parametrize("coefficients,steps", [("jordan", 5), ("you", 6)])
@pytest.mark.parametrize("update_scale", ["sqrt_fan_ratio", "speedrun"])
@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (32, 32)])
def test_muon_update_bound_holds_for_every_option(coefficients, steps, update_scale, shape):
    gen = torch.Generator().manual_seed(11)
    w = nn.Parameter(torch.randn(shape, generator=gen))
    optimizer = Muon([w], lr=0.1, ns_steps=steps, ns_coefficients=coefficients, update_scale=update_scale)
    bound = optimizer.update_bound(optimizer.param_groups[0], w)
    for _ in range(3):
        before = w.detach().clone()
        w.grad = torch.randn(shape, generator=gen)
        optimizer.step()
        measured = rms_operator_norm(w.detach() - before)
        assert measured <= bound * (1 + 1e-5)
        assert measured >= 0.6 * bound  # the bound is the step's own size, not a loose cap
    expected_scale = math.sqrt(max(1.0, shape[0] / shape[1])) if update_scale == "speedrun" else \
        math.sqrt(shape[0] / shape[1])
    ns_peak = newton_schulz_peak(steps, NS_COEFFICIENT_SETS[coefficients])
    assert bound == pytest.approx(0.1 * ns_peak * expected_scale / math.sqrt(shape[0] / shape[1]))


def test_muon_without_nesterov_steps_along_the_momentum():
    gen = torch.Generator().manual_seed(12)
    w = nn.Parameter(torch.randn(24, 24, generator=gen))
    start = w.detach().clone()
    optimizer = Muon([w], lr=0.05, momentum=0.9, nesterov=False)
    g1, g2 = torch.randn(24, 24, generator=gen), torch.randn(24, 24, generator=gen)
    for g in (g1, g2):
        w.grad = g
        optimizer.step()
    m1 = 0.1 * g1
    m2 = 0.9 * m1 + 0.1 * g2
    expected = start - 0.05 * newton_schulz(m1, 5) - 0.05 * newton_schulz(m2, 5)
    torch.testing.assert_close(w.detach(), expected, atol=1e-6, rtol=0)


def test_dualized_embedding_rows_move_at_unit_rms_with_capped_inflation():
    model = ToyModel()
    cfg = {**CFGS["muon"], "embed_optimizer": "dualized", "max_embed_inflation": 16.0, "nesterov": False}
    optimizer = build_optimizer(model, cfg)
    group = next(g for g in optimizer.param_groups if g["role"] == "embed")
    assert group["kind"] == "dualized" and group["lr"] == cfg["lr"]
    table = model.tok.weight
    before = table.detach().clone()
    grad = 10 * torch.randn(VOCAB, DIM, generator=torch.Generator().manual_seed(13))  # momentum rows RMS ≈ 0.5
    grad[0] *= 1e-2  # a row far below 1/16 RMS: inflated 16×, not to unit RMS
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    table.grad = grad
    optimizer.step()
    step = (before - table.detach()) / cfg["lr"]
    momentum = (1 - group["momentum"]) * grad
    rms = momentum.pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(step[1:].pow(2).mean(dim=1).sqrt(), torch.ones(VOCAB - 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(step[0], 16.0 * momentum[0], atol=0, rtol=1e-3)
    assert rms[0] * 16 < 1


@pytest.mark.parametrize("nesterov", [True, False])
def test_dualized_step_of_gpt_token_and_position_tables_equals_one_table_at_a_time(nesterov):
    """gpt has two embedding tables of different shapes (token 105×64, position 64×64) in one dualized
    group: each steps as a Muon holding that table alone (was a stack of unequal shapes)."""
    model = build_model(run_defaults(model="gpt", d_model=64, n_heads=4, context=64), 105)
    cfg = {**CFGS["muon"], "embed_optimizer": "dualized", "nesterov": nesterov}
    optimizer = build_optimizer(model, cfg)
    group = next(g for g in optimizer.param_groups if g["role"] == "embed")
    tables = group["params"]
    assert group["kind"] == "dualized" and sorted(tuple(t.shape) for t in tables) == [(64, 64), (105, 64)]
    alone = [nn.Parameter(t.detach().clone()) for t in tables]
    references = [Muon([dict(params=[t], kind="dualized")], lr=cfg["lr"], momentum=cfg["momentum"],
                       nesterov=nesterov, max_inflation=cfg["max_embed_inflation"]) for t in alone]
    gen = torch.Generator().manual_seed(14)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
        for t, reference, table in zip(alone, references, tables):
            t.grad = table.grad.clone()
            reference.step()
    for t, table in zip(alone, tables):
        torch.testing.assert_close(table.detach(), t.detach(), atol=0, rtol=0)


def test_config_knows_each_fixed_coefficient_schedule_length():
    """The config check (no torch at parse time) states the step count of each fixed schedule."""
    from lipflow.config import FIXED_NS_STEPS, ConfigError, check_config

    fixed = {name: len(c) for name, c in NS_COEFFICIENT_SETS.items() if isinstance(c[0], tuple)}
    assert FIXED_NS_STEPS == fixed
    with pytest.raises(ConfigError, match=r"runs\.r\.ns_steps: ns_coefficients 'you' has exactly 6 steps, got 5"):
        check_config({"runs": {"r": {"optimizer": "muon", "ns_coefficients": "you"}}})
    check_config({"runs": {"r": {"optimizer": "muon", "ns_coefficients": "you", "ns_steps": 6}}})


@pytest.mark.parametrize("name", ["adamw", "muon", "scion", "uscg"])
def test_step_returns_the_closure_loss_as_torch_optim_does(name):
    torch.manual_seed(0)
    model = build_model(run_defaults(model="gpt", d_model=16, n_layers=1, n_heads=2, context=8), vocab_size=11)
    optimizer = OPTIMIZERS.get(name)(model, run_defaults(model="gpt", optimizer=name, lr=0.01))
    idx = torch.randint(0, 11, (2, 9))

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert loss is not None and torch.isfinite(loss) and loss.requires_grad  # computed with gradients on


def test_scion_gpt_defaults_are_the_reference_radii():
    """SCION_GPT_DEFAULTS are the untied-GPT radii of LIONS-EPFL/scion (examples/shallow-nanogpt):
    embedding Sign ρ=1, hidden Spectral ρ=3, head Sign ρ=10, vectors ρ=1."""
    assert SCION_GPT_DEFAULTS["lmo_radius"] == {"embed": 1.0, "hidden": 3.0, "head": 10.0, "vector": 1.0}
    assert SCION_GPT_DEFAULTS["lmo_norms"] == {"embed": "sign", "hidden": "spectral", "head": "sign",
                                               "vector": "bias_rms"}
