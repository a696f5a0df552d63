"""The constrained update (step → decay → project): the soft cap keeps σmax for every optimizer,
refuses couplings it cannot honour, clips measured steps; batched stacks equal per-matrix work."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lipflow.constraints import SOFT_CAP_MAX_GROWTH, constrain_, soft_cap_alpha, spectral_hard_cap, StepContext
from lipflow.optimizers import Muon
from lipflow.train.update import ConstraintSettings, check_coupling, constrained_update

from conftest import run_stage


def rms_operator_norm(w: torch.Tensor) -> float:
    fan_out, fan_in = w.shape
    return torch.linalg.matrix_norm(w.detach().double(), ord=2).item() / math.sqrt(fan_out / fan_in)


def capped_matrices(count: int, shape: tuple[int, int], sigma_max: float, seed: int) -> list[nn.Parameter]:
    """Matrices whose every normalized singular value is σmax (the soft cap's worst starting point)."""
    gen = torch.Generator().manual_seed(seed)
    scale = math.sqrt(shape[0] / shape[1])
    return [nn.Parameter(torch.linalg.qr(torch.randn(shape, generator=gen))[0] * scale * sigma_max)
            if shape[0] >= shape[1] else
            nn.Parameter(torch.linalg.qr(torch.randn(shape[::-1], generator=gen))[0].T * scale * sigma_max)
            for _ in range(count)]


def push_outwards(params: list[nn.Parameter], gen: torch.Generator) -> None:
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) - 0.5 * p.detach()


@pytest.mark.parametrize("lr", [0.01, 0.3])
def test_adamw_soft_cap_keeps_sigma_max_with_the_measured_step(lr):
    """AdamW has no update bound: the step is measured (and clipped when too large), so σ₁ ≤ σmax.
    Coupling to lr instead (as before) let σ₁ reach 1.54 at σmax 1."""
    sigma_max = 1.0
    params = capped_matrices(3, (48, 24), sigma_max, seed=0)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    settings = ConstraintSettings("spectral_soft_cap", sigma_max, 0.0, 0.0, False)
    gen = torch.Generator().manual_seed(1)
    raw_steps, clipped = [], 0
    for _ in range(30):
        push_outwards(params, gen)
        before = [p.detach().clone() for p in params]

        def record_raw_step():
            raw_steps.extend(rms_operator_norm(p.detach() - b) for p, b in zip(params, before))

        clipped += int(constrained_update(optimizer, params, settings, after_step=record_raw_step))
        for p in params:
            assert rms_operator_norm(p) <= sigma_max * (1 + 1e-4)
    assert max(raw_steps) > 3 * lr  # AdamW's steps exceed lr in RMS→RMS norm: coupling to lr was unsound
    if lr == 0.3:
        assert clipped > 0  # k would exceed (81/62)σmax: those steps were clipped, and counted
    else:
        assert clipped == 0


def test_a_muon_lr_beyond_the_soft_caps_range_is_refused():
    params = capped_matrices(1, (32, 32), 1.0, seed=2)
    settings = ConstraintSettings("spectral_soft_cap", 1.0, 0.0, 0.0, False)
    check_coupling(Muon(params, lr=0.25), params, settings)  # 0.25·1.2024 = 0.30 ≤ 0.3065
    with pytest.raises(ValueError, match=r"^lr: .*sigma_max 1"):
        check_coupling(Muon(params, lr=0.4), params, settings)
    check_coupling(Muon(params, lr=0.4), params, ConstraintSettings("spectral_soft_cap", 2.0, 0.0, 0.0, False))
    check_coupling(Muon(params, lr=0.4), params, ConstraintSettings("spectral_hard_cap", 1.0, 0.0, 0.0, False))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_the_refusal_names_the_largest_lr_that_fits(weight_decay):
    """The largest run lr the message names (4 significant digits, cut down) passes, and 0.11 % above
    it is refused, so it is the edge; with a group at half the run's lr (a multiplier, as µP and the
    modular step sizes set) that edge doubles."""
    import re

    params = capped_matrices(1, (32, 32), 1.0, seed=2)
    settings = ConstraintSettings("spectral_soft_cap", 1.0, weight_decay, 0.0, False)

    def largest(lr: float, multiplier: float) -> float:
        with pytest.raises(ValueError) as refused:
            check_coupling(Muon([{"params": params, "lr": lr * multiplier}], lr=lr), params, settings)
        return float(re.search(r"lower lr to at most ([0-9.e+-]+) ", str(refused.value)).group(1))

    for multiplier in (1.0, 0.5):
        edge = largest(1.0, multiplier)
        assert largest(3.0, multiplier) == edge  # the edge does not depend on the lr that was refused
        check_coupling(Muon([{"params": params, "lr": edge * multiplier}], lr=edge), params, settings)
        above = edge * 1.0011
        with pytest.raises(ValueError, match=r"^lr: at lr "):
            check_coupling(Muon([{"params": params, "lr": above * multiplier}], lr=above), params, settings)
    assert largest(1.0, 0.5) == pytest.approx(2 * largest(1.0, 1.0), rel=2e-3)


def test_training_refuses_such_a_config_in_one_line(char_shards, tiny_run_config, tmp_path):
    cfg = {**tiny_run_config, "model": "lipschitz_gpt", "optimizer": "muon", "lr": 0.4,
           "weight_constraint": "spectral_soft_cap", "sigma_max": 1.0}
    done = run_stage("lipflow.train", "--run-id", "tiny-00000000", "--config-json", json.dumps(cfg),
                     "--data-dir", str(char_shards), "--out-dir", str(tmp_path), "--no-progress")
    assert done.returncode == 2
    assert done.stderr.strip().startswith("lipflow: error: lr: ") and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "model.safetensors").exists()


def test_the_soft_caps_growth_limit_is_where_its_map_stops_increasing():
    """At k = (81/62)σmax, t = αk² = 1/3: there p₂∘p₁'s derivative at k is 0 (beyond, it decreases)."""
    k = SOFT_CAP_MAX_GROWTH
    alpha = soft_cap_alpha(1.0, k)
    assert alpha * k * k == pytest.approx(1 / 3, abs=1e-9)
    x = torch.tensor(k, dtype=torch.float64, requires_grad=True)
    y = x - alpha * x ** 3
    (y + alpha * y ** 3).backward()
    assert abs(x.grad.item()) < 1e-7


def test_soft_cap_alpha_on_a_tensor_equals_the_scalar_solution():
    ks = [0.5, 1.0, 1.05, 1.2, 1.3, 2.0]
    batched = soft_cap_alpha(1.0, torch.tensor(ks, dtype=torch.float64))
    for k, a in zip(ks, batched.tolist()):
        assert a == pytest.approx(soft_cap_alpha(1.0, k), rel=1e-12, abs=1e-15)


def test_hard_cap_lands_on_sigma_max_from_far_above():
    """σ₁ = 10⁴·σmax in fp32: U·min(Σ, σmax)·Vᵀ has σ₁ = σmax to rounding (X − U·relu(Σ−σmax)·Vᵀ gave 1.008)."""
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen))
    s = torch.linspace(1e4, 0.5, 64)
    x = (u * s) @ v.T
    capped = spectral_hard_cap(x, 1.0, step=StepContext())
    assert torch.linalg.matrix_norm(capped.double(), ord=2).item() <= 1.0 + 1e-5
    small = x / 2e4
    assert torch.equal(spectral_hard_cap(small, 1.0, step=StepContext()), small)  # within the cap: untouched


@pytest.mark.parametrize("name", ["spectral_soft_cap", "spectral_hard_cap", "spectral_normalize", "stiefel",
                                  "spectral_hammer", "spectral_weight_decay"])
def test_a_stack_of_matrices_is_constrained_like_each_alone(name):
    gen = torch.Generator().manual_seed(7)
    params = [nn.Parameter(torch.randn(40, 24, generator=gen) * (0.5 + i)) for i in range(4)]
    reference = [p.detach().clone() for p in params]
    optimizer = Muon(params, lr=0.05)
    for p in params:
        p.grad = torch.zeros_like(p)  # a zero step: what remains is decay → project
    settings = ConstraintSettings(name, 1.5, 0.1, 0.2, False)
    constrained_update(optimizer, params, settings)
    bound = optimizer.update_bound(optimizer.param_groups[0], params[0])
    for p, w in zip(params, reference):
        constrain_(w, name, 1.5, lr=0.05, weight_decay=0.1, update_norm=bound, spectral_wd=0.2)
        torch.testing.assert_close(p.detach(), w, atol=2e-5, rtol=1e-5)


# ---- the soft cap's step limit and the measured step's norm (mutation round 3)

def test_max_update_norm_is_the_largest_step_keeping_k_within_the_growth_limit():
    """u_max solves σ(1 − λη) + u = (81/62)·σ."""
    settings = ConstraintSettings("spectral_soft_cap", sigma_max=2.0, weight_decay=0.1, spectral_wd=0.0,
                                  compile=False)
    lr = 0.5
    u = settings.max_update_norm(lr)
    assert u == pytest.approx(2.0 * (81 / 62 - 1 + 0.05))
    assert 2.0 * (1 - 0.1 * lr) + u == pytest.approx(SOFT_CAP_MAX_GROWTH * 2.0)


def test_the_measured_step_of_a_non_square_matrix_is_its_rms_to_rms_norm():
    """u = ‖ΔW‖₂/√(fan_out/fan_in), certified (never below the exact value), for an (8, 2) matrix."""
    from lipflow.train.update import _clip_measured_steps_

    settings = ConstraintSettings("spectral_soft_cap", sigma_max=100.0, weight_decay=0.0, spectral_wd=0.0,
                                  compile=False)
    gen = torch.Generator().manual_seed(0)
    before = torch.randn(8, 2, generator=gen)
    delta = torch.randn(8, 2, generator=gen) * 0.1
    p = nn.Parameter(before + delta)
    u, clipped = _clip_measured_steps_([p], [before], lr=0.1, settings=settings)
    exact = float(torch.linalg.matrix_norm(delta, 2)) / math.sqrt(8 / 2)
    assert exact * (1 - 1e-5) <= float(u[0]) <= exact * 1.5
    assert int(clipped) == 0 and torch.equal(p.data, before + delta)


@pytest.mark.parametrize("sigma_max", [0.5, 0.25])
def test_soft_cap_below_the_init_norm_keeps_every_matrix_within_sigma_max(sigma_max):
    """The models initialise their matrices at RMS→RMS norm 1 and the soft cap keeps σ ≤ σmax only from
    weights within it: at sigma_max 0.5 they stayed above it for steps, at 0.25 they reached 1e10 and NaN
    within two Muon steps. build_learner now starts them on the cap."""
    from lipflow.config import run_defaults
    from lipflow.train.build import build_learner

    torch.manual_seed(0)
    cfg = run_defaults(model="lipschitz_gpt", d_model=16, n_layers=1, n_heads=2, context=8, optimizer="muon",
                       lr=0.02, weight_constraint="spectral_soft_cap", sigma_max=sigma_max, weight_decay=0.0)
    learner = build_learner(cfg, 11, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randint(0, 11, (4, 8), generator=gen)
        loss = nn.functional.cross_entropy(learner.model(x).reshape(-1, 11), torch.roll(x, -1, 1).reshape(-1))
        learner.optimizer.zero_grad()
        loss.backward()
        constrained_update(learner.optimizer, learner.matrices, learner.constraint)
        for w in learner.matrices:
            assert rms_operator_norm(w) <= sigma_max * (1 + 1e-5)


@pytest.mark.parametrize("d_model, n_heads, vocab, seed", [(16, 2, 11, 0), (512, 4, 65, 1)])
def test_soft_cap_start_leaves_an_init_within_sigma_max_bit_for_bit(d_model, n_heads, vocab, seed):
    """An orthogonal init at σmax = 1 is within the cap: bits unchanged. float32 rounding puts its σ up to
    ≈ 1.4e-6 above 1 at 512 × 512, so a fixed 1e-6 slack rescaled such starts (d_model 512, seed 1:
    blocks.1.attn.v.weight at 1 + 1.08e-6), changing runs it left unchanged at smaller widths."""
    from lipflow.config import run_defaults
    from lipflow.model import build_model
    from lipflow.train.build import build_learner

    cfg = run_defaults(model="lipschitz_gpt", d_model=d_model, n_layers=2, n_heads=n_heads, context=8,
                       optimizer="muon", lr=0.02, weight_constraint="spectral_soft_cap", sigma_max=1.0,
                       weight_decay=0.0)
    torch.manual_seed(seed)
    plain = build_model(cfg, vocab)
    torch.manual_seed(seed)
    learner = build_learner(cfg, vocab, torch.device("cpu"))
    for (name, a), b in zip(plain.named_parameters(), learner.model.parameters()):
        assert torch.equal(a, b), name
