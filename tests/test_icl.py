"""ICL study (issue 5): prompts, model, closed forms, optimal baselines, training and workflow.

Training tests reproduce the issue's "Done when" numbers: for d=5, n=20 a trained one-layer
model finds Γ⋆ (Σ = I and a diagonal anisotropic Σ), and a trained three-layer sparse model
(w ~ N(0, Σ⁻¹), the default config) matches optimal three-step preconditioned GD.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
import torch

from lipflow.experiments.icl import ICL_VS_PGD
from lipflow.studies.icl import study, tables, theory
from lipflow.studies.icl.__main__ import main as icl_main
from lipflow.errors import ConfigError
from lipflow.studies.icl.config import load_config, schema, training_config, training_jobs
from lipflow.studies.icl.data import PromptSampler, spd_power
from lipflow.studies.icl.model import InContextTransformer
from lipflow.studies.icl.train import train_model
from lipflow.registry import UnknownNameError
from lipflow.results import load_study_tables
from lipflow.results.views import create_views

REPO = Path(__file__).resolve().parent.parent
PAPER_EIGENVALUES = [1.0, 1.0, 0.25, 0.0625, 1.0]
DOUBLE = torch.float64


def sampler_for(n=20, **overrides) -> PromptSampler:
    return PromptSampler(load_config(overrides), n)


def prompts(sampler: PromptSampler, count: int, seed: int):
    return sampler.sample(count, torch.Generator().manual_seed(seed), DOUBLE)


def query_loss(predictions, batch) -> float:
    return float((predictions - batch.query_y).square().mean())


# ---------------------------------------------------------------- config


def test_config_defaults_come_from_the_schema_and_errors_name_the_field():
    cfg = load_config({})
    props = schema()["properties"]
    for key in ("d", "n", "train_steps", "lr", "w_prior", "parametrization", "test_prompts"):
        assert getattr(cfg, key) == props[key]["default"]
    assert list(cfg.sigma.eigenvalues) == props["sigma"]["properties"]["eigenvalues"]["default"]
    assert cfg.test_prompts >= 20_000
    assert training_jobs(load_config({"layers": [1, 3], "n_grid": [5, 20]})) == [
        (1, 20), (3, 5), (3, 20)
    ]
    bad = {
        "icl.d": {"d": 0},
        "icl.sigma.kind": {"sigma": {"kind": "rotatd"}},
        "icl.sigma.eigenvalues": {"d": 3},
        "icl.test_prompts": {"test_prompts": 100},
        "unknown key 'icl.layer' (did you mean 'layers'?)": {"layer": [1]},
        "icl.n": {"n": 10**20},  # every count above 2^48 is refused, as config.schema.yaml's
        "icl.train_steps": {"train_steps": 2**48 + 1},
        "icl.layers": {"layers": [1, 10**20]},
    }
    for field, raw in bad.items():
        with pytest.raises(ConfigError) as error:
            load_config(raw)
        assert str(error.value).startswith(field) and "\n" not in str(error.value)
    assert load_config({"d": 3, "sigma": {"kind": "identity"}}).d == 3  # identity needs no λ



def test_an_eigenvalue_without_a_finite_inverse_is_refused_in_one_line(capsys):
    """λ = 10⁻³²⁰ (positive, so the schema takes it) made Σ⁻¹ infinite: train and baselines died in
    torch.linalg.eigh with a _LinAlgError traceback. The smallest normal double still has an inverse."""
    with pytest.raises(ConfigError, match=r"^icl.sigma.eigenvalues.1: 1e-320 has no finite inverse"):
        load_config({"sigma": {"kind": "diagonal", "eigenvalues": [1, 1e-320, 1, 1, 1]}})
    assert load_config({"sigma": {"kind": "diagonal", "eigenvalues": [1, 2.3e-308, 1, 1, 1]}}).sigma.kind == "diagonal"
    config = json.dumps({"sigma": {"kind": "rotated", "eigenvalues": [1e-320, 1, 1, 1, 1]}})
    assert icl_main(["baselines", "--config-json", config, "--out", "x.parquet"]) == 2
    assert capsys.readouterr().err.startswith("lipflow: error: --config-json: icl.sigma.eigenvalues.0")


def test_a_sigma_key_its_kind_does_not_read_changes_no_params_string():
    """`sigma.seed` draws only the rotation (kind rotated) and `sigma.eigenvalues` are ignored for kind identity:
    set there, they changed the training and baselines params, which retrained every ICL model and recomputed
    the baselines on the same Σ. Such a key is set to the schema's default, as the data blocks' are."""
    from lipflow.plan import Plan

    defaults = schema()["properties"]["sigma"]["properties"]
    for plain, edited in (({"kind": "identity"}, {"kind": "identity", "eigenvalues": [2.0], "seed": 7}),
                          ({"kind": "diagonal", "eigenvalues": [1, 2, 3, 4, 5]},
                           {"kind": "diagonal", "eigenvalues": [1, 2, 3, 4, 5], "seed": 9})):
        plans = [Plan.from_config({"icl": {"sigma": sigma}}) for sigma in (plain, edited)]
        assert plans[0].icl_train_params() == plans[1].icl_train_params()
        assert plans[0].icl_baselines_params() == plans[1].icl_baselines_params()
        assert load_config({"sigma": edited}).sigma.seed == defaults["seed"]["default"]
    assert load_config({"sigma": {"kind": "identity", "eigenvalues": [2.0]}}).sigma.eigenvalues == \
        tuple(defaults["eigenvalues"]["default"])
    rotated = [load_config({"sigma": {"kind": "rotated", "seed": seed}}) for seed in (0, 9)]
    assert training_config(rotated[0]) != training_config(rotated[1])  # the rotation's seed is read


def test_reordering_layers_or_n_grid_reruns_no_icl_job():
    """`layers: [3, 1, 2]` is the study of `[1, 2, 3]` (each job and baseline has its own seeded stream), but its
    params string differed, which recomputed the baselines and reran collect, plots and check; the lists are
    sorted, so the captions read L = 1, 2, 3 as well."""
    from lipflow.plan import Plan

    plans = [Plan.from_config({"icl": block}) for block in ({"layers": [1, 2, 3], "n_grid": [5, 10]},
                                                             {"layers": [3, 1, 2], "n_grid": [10, 5]})]
    assert plans[0].icl_baselines_params() == plans[1].icl_baselines_params()
    assert plans[0].icl_params() == plans[1].icl_params()
    assert plans[1].icl_caption()["layers"] == "1, 2, 3" and plans[1].icl_caption()["n_grid"] == "5, 10"


def test_an_integer_for_a_number_key_is_one_training_params_string_with_its_float():
    """`lr: 1`, `noise_std: 0` and `betas: [0, 0.9]` train as `1.0`, `0.0` and `[0.0, 0.9]` (the defaults'
    spelling); they gave another params string, which retrained every ICL model with the same numbers."""
    from lipflow.plan import Plan

    ints = {"lr": 1, "noise_std": 0, "init_std": 1, "grad_clip": 1, "betas": [0, 0.9]}
    floats = {"lr": 1.0, "noise_std": 0.0, "init_std": 1.0, "grad_clip": 1.0, "betas": [0.0, 0.9]}
    assert training_config(load_config(ints)) == training_config(load_config(floats))
    plans = [Plan.from_config({"icl": block}) for block in (ints, floats)]
    assert plans[0].icl_train_params() == plans[1].icl_train_params()
    assert plans[0].icl_params() == plans[1].icl_params()
    assert json.loads(plans[0].icl_train_params())["lr"] == 1.0
    assert load_config({"lr": 10**400}).lr == 10**400  # no float holds it: left as written, as a run's number


def test_an_integer_eigenvalue_past_float64_is_refused_in_one_line():
    """An integer eigenvalue of 10⁴⁰⁰ (JSON and YAML read it as a Python int, the schema's number takes
    it) has no float64 value: 1.0 / value raised OverflowError, a traceback naming no key."""
    with pytest.raises(ConfigError, match=r"^icl.sigma.eigenvalues.2: an integer of 401 digits is beyond float64's range"):
        load_config({"sigma": {"kind": "diagonal", "eigenvalues": [1, 1, 10**400, 1, 1]}})
    assert load_config({"sigma": {"kind": "diagonal", "eigenvalues": [1, 1, 10**300, 1, 1]}}).sigma.eigenvalues[2] == 1e300


def test_cli_rejects_a_bad_config_with_one_line_and_exit_2(capsys):
    """The line names the argument and the key, as the image-MLP study's (``--config-json: icl.w_prior``)."""
    code = icl_main(["baselines", "--config-json", '{"w_prior": "sigma"}', "--out", "x.parquet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("lipflow: error: --config-json: icl.w_prior") and "\n" not in err
    assert icl_main(["baselines", "--config-json", "{d: 1}", "--out", "x.parquet"]) == 2
    assert not Path("x.parquet").exists()
    if not torch.cuda.is_available():
        train = ["train", "--config-json", '{"device": "cuda"}', "--layers", "1", "--n", "5",
                 "--out", "x.safetensors"]
        assert icl_main(train) == 2 and "icl.device" in capsys.readouterr().err


def test_cli_sizes_beyond_memory_are_one_line_and_write_nothing(tmp_path, capsys):
    """The schema allows d and batch_size up to 2^48 one by one: a Σ (d × d) or a prompt batch that no
    memory holds was a RuntimeError traceback from torch's allocator."""
    for config in ('{"d": 10000000, "sigma": {"kind": "identity"}}',):  # Σ alone: 800 TB
        out = tmp_path / "x.safetensors"
        code = icl_main(["train", "--no-progress", "--config-json", config, "--layers", "1", "--n", "5",
                         "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("lipflow: error: out of memory") and "icl.d" in err, err
        assert "\n" not in err and not out.exists()


def test_train_writes_no_checkpoint_when_training_overflows(tmp_path, capsys):
    """An eigenvalue of 10³⁰⁰ with w ~ N(0, I) overflows float32 at the first step: the checkpoint was written
    with NaN blocks and a NaN curve, exit 0, and collect then scored NaN."""
    out = tmp_path / "L1_n5.safetensors"
    config = json.dumps({"sigma": {"kind": "diagonal", "eigenvalues": [1e300, 1, 1, 1, 1]}, "w_prior": "identity",
                         "train_steps": 2, "batch_size": 10})
    code = icl_main(["train", "--no-progress", "--config-json", config, "--layers", "1", "--n", "5", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("lipflow: error: icl train L=1 n=5: ") and "icl.sigma.eigenvalues" in err, err
    assert "\n" not in err and not out.exists() and not list(tmp_path.iterdir())


# ---------------------------------------------------------------- data


def test_prompts_have_the_configured_distribution():
    sampler = sampler_for(sigma={"kind": "rotated", "eigenvalues": PAPER_EIGENVALUES, "seed": 3},
                          w_prior="sigma_inverse", noise_std=0.5)
    sigma = sampler.sigma.matrix
    rotation = sampler.sigma.rotation
    assert torch.allclose(rotation.T @ rotation, torch.eye(5, dtype=DOUBLE), atol=1e-12)
    assert torch.allclose(torch.linalg.eigvalsh(sigma), torch.tensor(sorted(PAPER_EIGENVALUES), dtype=DOUBLE))
    assert (sigma - torch.diag(torch.diagonal(sigma))).abs().max() > 0.05  # really rotated

    batch = prompts(sampler, 20_000, seed=1)
    x = batch.x.reshape(-1, 5)
    assert theory.relative_error(x.T @ x / len(x), sigma) < 0.02
    # w is not stored; recover it from the n+1 noisy labels of each prompt by least squares
    w = torch.linalg.lstsq(batch.x, batch.y.unsqueeze(-1)).solution.squeeze(-1)
    residual = batch.y - torch.einsum("bid,bd->bi", batch.x, w)
    noise_var = float(residual.square().sum() / (residual.numel() - w.numel()))
    assert noise_var == pytest.approx(0.25, rel=0.03)
    # Cov(w) = Σ⁻¹ plus the least-squares noise E[(XᵀX)⁻¹]σ², whitened: ≈ I + small
    whitened = w @ spd_power(sigma, 0.5)
    assert theory.relative_error(whitened.T @ whitened / len(w), torch.eye(5, dtype=DOUBLE)) < 0.1

    tokens = batch.tokens()
    assert tokens.shape == (20_000, 21, 6)
    assert torch.all(tokens[:, -1, -1] == 0) and torch.equal(tokens[:, :-1, -1], batch.context_y)
    assert torch.equal(prompts(sampler, 20_000, seed=1).y, batch.y)  # seeded
    assert not torch.equal(prompts(sampler, 20_000, seed=2).x, batch.x)


# ---------------------------------------------------------------- model


def naive_forward(tokens, qs, ps, attention):
    """The paper's layer written out: Z ← Z + (1/n)(Z Q̄ Zᵀ) M (Z P̄ᵀ) (or masked softmax)."""
    z = tokens.clone()
    n1, d1 = z.shape[1], z.shape[2]
    mask = torch.ones(n1, dtype=DOUBLE)
    mask[-1] = 0
    for q, p in zip(qs, ps):
        q_full = torch.zeros(d1, d1, dtype=DOUBLE)
        q_full[:-1, :-1] = q
        p_full = torch.zeros(d1, d1, dtype=DOUBLE)
        p_full[:-1, :-1] = p
        p_full[-1, -1] = 1.0
        scores = z @ q_full @ z.transpose(1, 2)
        if attention == "linear":
            weights = scores * mask / (n1 - 1)
        else:
            weights = torch.softmax(scores.masked_fill(mask == 0, -math.inf), dim=-1)
        z = z + weights @ (z @ p_full.T)
    return -z[:, -1, -1]


@pytest.mark.parametrize("attention", ["linear", "softmax"])
@pytest.mark.parametrize("parametrization", ["sparse", "full"])
def test_model_matches_the_paper_formula(attention, parametrization):
    batch = prompts(sampler_for(n=7, d=4, sigma={"kind": "diagonal", "eigenvalues": [1, 2, .5, .3]}),
                    64, seed=0)
    model = InContextTransformer(4, 3, parametrization, attention, init_std=0.3,
                                 generator=torch.Generator().manual_seed(0)).double()
    ps = model.p.detach() if model.p is not None else torch.zeros(3, 4, 4, dtype=DOUBLE)
    expected = naive_forward(batch.tokens(), model.q.detach(), ps, attention)
    assert torch.allclose(model(batch.tokens()), expected, atol=1e-10)


def test_sparse_linear_model_is_preconditioned_gd_lemma_1():
    batch = prompts(sampler_for(sigma={"kind": "rotated", "eigenvalues": PAPER_EIGENVALUES}), 256, 0)
    model = InContextTransformer(5, 3, init_std=0.4, generator=torch.Generator().manual_seed(1)).double()
    gammas = model.preconditioners()  # random, non-symmetric
    assert not torch.allclose(gammas, gammas.transpose(1, 2))
    assert torch.allclose(model(batch.tokens()), theory.preconditioned_gd(batch, gammas), atol=1e-10)
    # softmax attention with Q = 0 averages the context labels: prediction −ȳ
    softmax = InContextTransformer(5, 1, attention="softmax").double()
    with torch.no_grad():
        softmax.q.zero_()
    assert torch.allclose(softmax(batch.tokens()), -batch.context_y.mean(1), atol=1e-12)
    with pytest.raises(UnknownNameError, match="did you mean 'linear'"):
        InContextTransformer(5, 1, attention="linar")


# ---------------------------------------------------------------- closed forms


def test_one_step_optimum_closed_forms():
    d, n = 5, 20
    eye = torch.eye(d, dtype=DOUBLE)
    gamma = theory.optimal_preconditioner(eye, eye, n)
    assert torch.allclose(gamma, n / (n + d + 1) * eye)
    assert theory.one_step_loss(gamma, eye, eye, n) == pytest.approx(d * (d + 1) / (n + d + 1))
    assert d * (d + 1) / (n + d + 1) == pytest.approx(1.1538, abs=1e-4)

    sampler = sampler_for(sigma={"kind": "rotated", "eigenvalues": PAPER_EIGENVALUES, "seed": 5},
                          w_prior="identity")
    sigma, w_cov = sampler.sigma.matrix, sampler.w_cov
    lam, trace = torch.tensor(PAPER_EIGENVALUES, dtype=DOUBLE), sum(PAPER_EIGENVALUES)
    gamma = theory.optimal_preconditioner(sigma, w_cov, n)
    # Thm 1: Γ⋆ = U diag(n / ((n+1)λ_i + tr Σ)) Uᵀ and f⋆ = Σ λ_i(λ_i + tr Σ)/((n+1)λ_i + tr Σ)
    u = sampler.sigma.rotation
    assert torch.allclose(gamma, (u * (n / ((n + 1) * lam + trace))) @ u.T, atol=1e-12)
    optimum = float((lam * (lam + trace) / ((n + 1) * lam + trace)).sum())
    assert optimum == pytest.approx(0.6818, abs=1e-4)
    assert theory.one_step_loss(gamma, sigma, w_cov, n) == pytest.approx(optimum, rel=1e-10)
    # stationary and minimal
    g = gamma.clone().requires_grad_(True)
    k = theory.one_step_moment(sigma, w_cov, n, 0.0)
    f = torch.trace(sigma @ g @ k @ g.T) - 2 * torch.trace(sigma @ g @ sigma @ w_cov)
    f.backward()
    assert g.grad.abs().max() < 1e-10
    bump = 0.05 * torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=DOUBLE)
    assert theory.one_step_loss(gamma + bump, sigma, w_cov, n) > optimum

    noisy = sampler_for(sigma={"kind": "rotated", "eigenvalues": PAPER_EIGENVALUES}, noise_std=0.7)
    gamma = theory.optimal_preconditioner(noisy.sigma.matrix, noisy.w_cov, n, 0.7)
    assert torch.allclose(gamma, n / (n + d + 1 + 0.49) * noisy.sigma.inverse, atol=1e-10)


def test_matrix_metrics_match_their_closed_forms():
    """Dist(M, I) = min_α ‖M − αI‖_F/‖M‖_F, the minimum at α = tr M/d: 0 for cI, √2/√14 for diag(1, 2, 3)
    (α = 2), never above the value at any other α; step_size a = tr(ΣΓ)/d is a for Γ = aΣ⁻¹."""
    assert theory.distance_to_identity(2.5 * torch.eye(4, dtype=DOUBLE)) == pytest.approx(0.0, abs=1e-15)
    m = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=DOUBLE))
    assert theory.distance_to_identity(m) == pytest.approx(math.sqrt(2 / 14), rel=1e-12)
    for alpha in (1.5, 1.9, 2.1, 6.0):
        assert theory.distance_to_identity(m) <= float(torch.linalg.norm(m - alpha * torch.eye(3, dtype=DOUBLE))
                                                       / torch.linalg.norm(m))
    sampler = sampler_for(sigma={"kind": "rotated", "eigenvalues": PAPER_EIGENVALUES})
    sigma = sampler.sigma.matrix
    assert theory.step_size(0.7 * sampler.sigma.inverse, sigma) == pytest.approx(0.7, rel=1e-12)
    assert theory.sigma_weighted_error(1.1 * sampler.sigma.inverse, sampler.sigma.inverse, sigma) == pytest.approx(0.1)
    # whitened: Σ^½ diag(1, 0) Σ^½ = diag(1, 0) against Σ^½ I Σ^½ = diag(1, 4), so 1/√17 (unwhitened 1/√2)
    eye, sigma = torch.eye(2, dtype=DOUBLE), torch.diag(torch.tensor([1.0, 4.0], dtype=DOUBLE))
    error = theory.sigma_weighted_error(eye + torch.diag(torch.tensor([1.0, 0.0], dtype=DOUBLE)), eye, sigma)
    assert error == pytest.approx(1 / math.sqrt(17), rel=1e-12)


def test_regression_optimum_satisfies_the_normal_equations_of_its_prompts():
    """Γ̂ is the least-squares fit of y_q by x_qᵀΓc on the prompts it drew: the residuals of the one-step
    predictions x_qᵀΓ̂c (``preconditioned_gd``) are orthogonal to every feature x_q,i·c_j."""
    sampler = sampler_for(n=6, sigma={"kind": "rotated", "eigenvalues": PAPER_EIGENVALUES}, noise_std=0.5)
    gamma = theory.regression_optimum(sampler, 3000, torch.Generator().manual_seed(4))
    assert not torch.allclose(gamma, gamma.T, atol=1e-3)  # a finite sample: not symmetric
    batch = sampler.sample(3000, torch.Generator().manual_seed(4), DOUBLE)
    residual = batch.query_y - theory.preconditioned_gd(batch, gamma[None])
    c = (batch.context_x.transpose(1, 2) @ batch.context_y.unsqueeze(-1)).squeeze(-1) / batch.n
    features = batch.query_x.unsqueeze(-1) * c.unsqueeze(-2)  # (B, i, j) = x_q,i·c_j
    normal = torch.einsum("b,bij->ij", residual, features)
    scale = torch.einsum("b,bij->ij", batch.query_y.abs(), features.abs())
    assert float((normal.abs() / scale).max()) < 1e-10


def test_one_step_loss_formula_matches_monte_carlo():
    sampler = sampler_for(sigma={"kind": "rotated", "eigenvalues": PAPER_EIGENVALUES, "seed": 2},
                          w_prior="identity", noise_std=0.5)
    gamma = torch.randn(5, 5, generator=torch.Generator().manual_seed(4), dtype=DOUBLE) * 0.3
    batch = prompts(sampler, 200_000, seed=3)
    errors = (theory.preconditioned_gd(batch, gamma[None]) - batch.query_y).square()
    stderr = float(errors.std()) / math.sqrt(errors.numel())
    exact = theory.one_step_loss(gamma, sampler.sigma.matrix, sampler.w_cov, 20, 0.5)
    assert abs(float(errors.mean()) - exact) < 4 * stderr


def test_regression_finds_the_one_step_optimum_without_training():
    for kind, prior, weighted in [("identity", "identity", False), ("rotated", "identity", True)]:
        sampler = sampler_for(sigma={"kind": kind, "eigenvalues": PAPER_EIGENVALUES}, w_prior=prior)
        sigma = sampler.sigma.matrix
        estimate = theory.regression_optimum(sampler, 400_000, torch.Generator().manual_seed(0))
        optimum = theory.optimal_preconditioner(sigma, sampler.w_cov, 20)
        error = (theory.sigma_weighted_error(estimate, optimum, sigma) if weighted
                 else theory.relative_error(estimate, optimum))
        assert error < 0.02, (kind, error)



def test_the_baselines_job_depends_on_the_baseline_keys_only(tmp_path):
    """The baselines rule was given the whole icl block, so a change of how models train (lr, attention)
    reran it; its params are now the baseline keys, and the command given only those writes the same
    table as given the whole block (the keys it leaves out are not read)."""
    from lipflow.plan import Plan

    tiny = {"layers": [1, 2], "n_grid": [5], "test_prompts": 20000, "theory_samples": 1000, "regression_prompts": 1000}
    trained = {**tiny, "lr": 0.5, "attention": "softmax", "parametrization": "full", "train_steps": 7, "seed": 3}
    plans = {name: Plan.from_config({"icl": block}) for name, block in
             (("tiny", {**tiny, "seed": 3}), ("trained", trained), ("more prompts", {**trained, "test_prompts": 20001}))}
    assert plans["tiny"].icl_baselines_params() == plans["trained"].icl_baselines_params()
    assert plans["tiny"].icl_params() != plans["trained"].icl_params()
    assert plans["more prompts"].icl_baselines_params() != plans["trained"].icl_baselines_params()
    tables = []
    for name, block in (("whole", trained), ("params", json.loads(plans["trained"].icl_baselines_params()))):
        study.run_baselines(load_config(block), str(tmp_path / f"{name}.parquet"))
        tables.append(pq.read_table(tmp_path / f"{name}.parquet"))
    assert tables[0].equals(tables[1]) and tables[0].schema.metadata == tables[1].schema.metadata


def test_baselines_refuse_fewer_regression_prompts_than_coefficients(tmp_path):
    """Γ̂ regresses on d² features: with d = 40 the schema's minimum of 1,000 prompts left its normal
    equations singular, and the `regression` row came out with a loss near 10⁶ (Γ⋆'s: 27), silently."""
    cfg = load_config({"d": 40, "sigma": {"kind": "identity"}, "layers": [1], "n_grid": [20],
                       "regression_prompts": 1000, "theory_samples": 1000})
    out = tmp_path / "baselines.parquet"
    with pytest.raises(ConfigError, match=r"^icl.regression_prompts: 1000 is fewer than the d² = 1600"):
        study.run_baselines(cfg, str(out))
    assert not out.exists()


def test_baselines_name_the_fields_when_the_step_size_problem_overflows():
    """With λ = 10¹⁰⁰ plain GD's moments E tr(S^j Σ S^k) overflow float64: the baselines command failed
    with numpy's "Array must not contain infs or NaNs" (λ = 10³⁰⁰: "min() arg is an empty sequence")."""
    cfg = load_config({"sigma": {"kind": "diagonal", "eigenvalues": [1e100, 1, 1, 1, 1]}, "layers": [1, 2],
                       "n_grid": [20], "theory_samples": 1000})
    with pytest.raises(ValueError, match=r"^icl: the GD step-size problem at n=20, L ≤ 2 overflows float64; "
                                         r"bring icl.sigma.eigenvalues closer to 1 or use fewer icl.layers$"):
        study.theory_context(cfg, 20, 2)

# ---------------------------------------------------------------- multi-step theory


@pytest.mark.parametrize("preconditioner", ["sigma_inverse", "identity"])
def test_step_size_quadratic_form_matches_monte_carlo(preconditioner):
    """cᵀHc + σ² against the plain empirical loss of L-step GD, with noise, rotated Σ, w ~ N(0,I).
    Small steps keep the per-prompt loss light-tailed so 200k prompts pin it to ≈0.4%."""
    sampler = sampler_for(sigma={"kind": "rotated", "eigenvalues": PAPER_EIGENVALUES, "seed": 1},
                          w_prior="identity", noise_std=1.5)
    m = sampler.sigma.inverse if preconditioner == "sigma_inverse" else torch.eye(5, dtype=DOUBLE)
    steps = torch.tensor([0.05, 0.2, 0.4], dtype=DOUBLE) * (1.0 if preconditioner == "identity" else 0.8)
    problem = theory.StepSizeProblem.estimate(sampler, m, 3, 100_000, torch.Generator().manual_seed(7))
    batch = prompts(sampler, 200_000, seed=8)
    errors = (theory.preconditioned_gd(batch, steps[:, None, None] * m) - batch.query_y).square()
    stderr = float(errors.std()) / math.sqrt(errors.numel())
    assert abs(float(problem.loss(steps)) - float(errors.mean())) < 3 * stderr  # noise part of H ≈ 9·stderr


def test_optimal_step_sizes_are_global_minima_and_match_the_paper():
    sampler = sampler_for(sigma={"kind": "rotated", "eigenvalues": PAPER_EIGENVALUES})
    pgd = theory.StepSizeProblem.estimate(
        sampler, sampler.sigma.inverse, 4, 100_000, torch.Generator().manual_seed(0)
    )
    # L = 1: the one-step optimum n/(n+d+1) and loss d(d+1)/(n+d+1)
    assert float(pgd.optimal_per_step(1)) == pytest.approx(20 / 26, rel=5e-3)
    assert float(pgd.loss(pgd.optimal_per_step(1))) == pytest.approx(30 / 26, rel=5e-3)
    generator = torch.Generator().manual_seed(1)
    for layers in (2, 3, 4):
        best = pgd.optimal_per_step(layers)
        best_loss = float(pgd.loss(best))
        # brute force: L-BFGS on cᵀHc from many random starts never beats the kernel polynomial
        for _ in range(12):
            start = torch.rand(layers, generator=generator, dtype=DOUBLE) * 2.5 + 0.05
            found = theory.lbfgs_minimum(pgd.loss, start, max_iter=300, tolerance_grad=1e-7)  # torch's default
            assert float(pgd.loss(found)) >= best_loss - 1e-9
        # the constant step is worse than per-step sizes, and its η is a grid minimum
        eta = pgd.optimal_constant(layers)
        grid = torch.linspace(0.05, 2.0, 400, dtype=DOUBLE)
        grid_losses = [float(pgd.loss(torch.full((layers,), float(e), dtype=DOUBLE))) for e in grid]
        assert float(pgd.loss(eta)) <= min(grid_losses) + 1e-12
        assert float(pgd.loss(eta)) > best_loss
    # Ahn et al. App. D / research notes (20k-prompt Nelder–Mead): a = {0.435, 0.697, 1.724}, 0.129
    steps = pgd.optimal_per_step(3)
    assert torch.allclose(steps, torch.tensor([0.435, 0.697, 1.724], dtype=DOUBLE), rtol=0.04)
    assert float(pgd.loss(steps)) == pytest.approx(0.129, rel=0.05)
    assert float(pgd.loss(pgd.optimal_per_step(2))) == pytest.approx(0.346, rel=0.06)


# ---------------------------------------------------------------- training


def trained_one_layer(overrides):
    cfg = load_config({"layers": [1], "lr": 0.01, "lr_halve_every": 200, "train_steps": 1200,
                       **overrides})
    model = train_model(cfg, 1, 20, progress=False).model.double()
    sampler = PromptSampler(cfg, 20)
    test = prompts(sampler, 100_000, seed=11)
    with torch.no_grad():
        loss = query_loss(model(test.tokens()), test)
    sigma, w_cov = sampler.sigma.matrix, sampler.w_cov
    optimum = theory.optimal_preconditioner(sigma, w_cov, 20)
    return model.preconditioners()[0], optimum, sigma, w_cov, loss


def test_one_layer_learns_the_optimal_preconditioner_isotropic():
    gamma, optimum, sigma, w_cov, loss = trained_one_layer(
        {"sigma": {"kind": "identity"}, "w_prior": "identity"}
    )
    assert theory.relative_error(gamma, optimum) < 0.03
    assert loss == pytest.approx(1.1538, rel=0.02)
    assert theory.one_step_loss(gamma, sigma, w_cov, 20) == pytest.approx(1.1538, rel=0.02)


def test_one_layer_learns_the_optimal_preconditioner_anisotropic():
    gamma, optimum, sigma, w_cov, loss = trained_one_layer(
        {"sigma": {"kind": "diagonal", "eigenvalues": PAPER_EIGENVALUES}, "w_prior": "identity",
         "lr": 0.02}
    )
    assert torch.allclose(torch.diagonal(optimum), torch.tensor(
        [0.823, 0.823, 2.336, 4.324, 0.823], dtype=DOUBLE), atol=1e-3)
    assert theory.sigma_weighted_error(gamma, optimum, sigma) < 0.03
    assert loss == pytest.approx(0.6818, rel=0.02)


def test_training_is_deterministic_and_softmax_learns():
    cfg = load_config({"train_steps": 15, "batch_size": 256})
    first, second = (train_model(cfg, 2, 10, progress=False) for _ in range(2))
    assert torch.equal(first.model.q, second.model.q) and first.losses == second.losses
    other = train_model(load_config({"train_steps": 15, "batch_size": 256, "seed": 1}), 2, 10,
                        progress=False)
    assert not torch.equal(first.model.q, other.model.q)
    softmax = train_model(load_config({"train_steps": 150, "batch_size": 1000, "attention": "softmax",
                                       "sigma": {"kind": "identity"}}), 1, 20, progress=False)
    assert sum(softmax.losses[-3:]) / 3 < 0.8 * softmax.losses[0]


def test_three_layers_match_optimal_pgd_with_the_default_config(tmp_path):
    """The README headline: default study, L=3, n=20, sparse, w ~ N(0, Σ⁻¹), rotated Σ."""
    cfg = load_config({"layers": [3], "n_grid": [20]})
    assert (cfg.d, cfg.n, cfg.parametrization, cfg.w_prior) == (5, 20, "sparse", "sigma_inverse")
    run, baselines = tmp_path / "L3_n20.safetensors", tmp_path / "baselines.parquet"
    study.run_train(cfg, 3, 20, str(run), progress=False)
    study.run_baselines(cfg, str(baselines))
    study.run_collect(cfg, str(baselines), [str(run)], str(tmp_path / "icl"))
    summary = study.summarize(cfg, str(tmp_path / "icl"), loss_tol=0.10, step_tol=0.05)
    assert summary["passed"], summary
    assert summary["loss_ratio"] < 1.10
    assert summary["max_step_rel_error"] < 0.05
    assert summary["pgd_loss"] == pytest.approx(0.13, rel=0.06)
    # the learned preconditioners are multiples of Σ⁻¹ (Thm 3), not of I
    rows = pq.read_table(tmp_path / "icl/preconditioner_error.parquet").to_pylist()
    assert len(rows) == 3
    assert all(r["dist_whitened"] < 0.05 and r["dist_identity"] > 0.75 for r in rows)
    assert all(r["sigma_weighted_error"] < 0.05 for r in rows)
    (agreement,) = pq.read_table(tmp_path / "icl/agreement.parquet").to_pylist()
    assert agreement["relative_prediction_mse"] < 0.01
    assert agreement["prediction_correlation"] > 0.995


# ---------------------------------------------------------------- workflow


@pytest.mark.skipif(shutil.which("snakemake") is None, reason="snakemake not installed")
def test_snakemake_rules_build_every_table_figure_and_the_view(tmp_path):
    (tmp_path / "Snakefile").write_text(
        f'configfile: "config.yaml"\ninclude: "{REPO}/workflow/rules/common.smk"\n'
        f'include: "{REPO}/workflow/rules/icl.smk"\n'
    )
    (tmp_path / "config.yaml").write_text(textwrap.dedent("""\
        icl:
          enabled: true
          d: 3
          n: 8
          layers: [1, 2]
          n_grid: [8]
          sigma: {kind: diagonal, eigenvalues: [1.0, 0.5, 0.25]}
          train_steps: 30
          batch_size: 500
          theory_samples: 5000
          regression_prompts: 5000
        """))
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(tmp_path / "Snakefile"), "-c2",
         "--directory", str(tmp_path), "icl_all"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "results/icl/runs").glob("*.safetensors")) == [
        "L1_n8.safetensors", "L2_n8.safetensors"
    ]
    for figure in ("loss_vs_layers", "loss_vs_n"):
        assert (tmp_path / f"results/figures/icl_{figure}.png").read_bytes()[:4] == b"\x89PNG"
        assert "<svg" in (tmp_path / f"results/figures/icl_{figure}.svg").read_text()[:500]
    assert (tmp_path / "results/logs/icl/train_L2_n8.log").exists()
    db = duckdb.connect()
    files = [tmp_path / "results" / "icl" / f"{table}.parquet" for table in tables.TABLE_SCHEMAS]
    assert set(load_study_tables(db, files)) == {f"icl_{table}" for table in tables.TABLE_SCHEMAS}
    assert create_views(db, {"icl_vs_pgd": ICL_VS_PGD}, log=io.StringIO()) == {"icl_vs_pgd": ""}
    rows = db.execute("SELECT sweep, n_layers, n, ratio_to_pgd, gd_loss, least_squares_loss, "
                      "max_step_size_rel_error FROM icl_vs_pgd ORDER BY ALL").fetchall()
    assert [r[:3] for r in rows] == [("layers", 1, 8), ("layers", 2, 8), ("n", 2, 8)]
    assert all(r[3] > 0.98 and r[4] > 0 and r[5] < 1e-12 and r[6] >= 0 for r in rows)
    methods = {r[0] for r in db.execute("SELECT DISTINCT method FROM icl_loss_by_layers").fetchall()}
    assert methods == {"transformer", "pgd", "pgd_constant", "gd", "least_squares", "one_step_optimal"}
    summary = json.loads((tmp_path / "results/icl/summary.json").read_text())
    assert summary["n_layers"] == 2 and "one_layer" in summary and not summary["passed"]
    tiny = {"d": 3, "n": 8, "layers": [1, 2], "sigma": {"kind": "identity"}}
    strict = ["check", "--config-json", json.dumps(tiny),
              "--results-dir", str(tmp_path / "results/icl"), "--out", str(tmp_path / "s.json")]
    assert icl_main(strict) == 0 and icl_main(strict + ["--strict"]) == 1  # 30 steps: too few
    # a new n_grid entry trains only the new model (the others are cached)
    config = (tmp_path / "config.yaml").read_text().replace("n_grid: [8]", "n_grid: [6, 8]")
    (tmp_path / "config.yaml").write_text(config)
    again = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(tmp_path / "Snakefile"), "-c1", "-n",
         "--directory", str(tmp_path), "icl_all"],
        capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"^icl_train\s+1$", again.stdout, re.MULTILINE), again.stdout[-3000:]
    assert "results/icl/runs/L2_n6.safetensors" in again.stdout


def test_one_step_optimum_is_stationary_for_a_prior_that_does_not_commute_with_sigma():
    """Γ⋆ = ΩΣK⁻¹ (not ΣΩK⁻¹, the same only when Ω and Σ commute, as for Ω = I or Σ⁻¹): for random
    SPD Σ and Ω, ∇f(Γ⋆) = 2ΣΓ⋆K − 2ΣΩΣ = 0 (autograd through ``one_step_loss``) and f grows around it."""
    gen = torch.Generator().manual_seed(0)
    d, n = 4, 10
    a, b = (torch.randn(d, d, generator=gen, dtype=DOUBLE) for _ in range(2))
    sigma, w_cov = a @ a.T + 0.5 * torch.eye(d, dtype=DOUBLE), b @ b.T + 0.5 * torch.eye(d, dtype=DOUBLE)
    assert not torch.allclose(sigma @ w_cov, w_cov @ sigma)
    gamma = theory.optimal_preconditioner(sigma, w_cov, n, 0.3).requires_grad_(True)
    k = theory.one_step_moment(sigma, w_cov, n, 0.3)
    f = torch.trace(sigma @ gamma @ k @ gamma.T) - 2 * torch.trace(sigma @ gamma @ sigma @ w_cov)
    f.backward()
    assert gamma.grad.abs().max() < 1e-9 * float(f.detach().abs())
    best = theory.one_step_loss(gamma.detach(), sigma, w_cov, n, 0.3)
    bump = 0.01 * torch.randn(d, d, generator=gen, dtype=DOUBLE)
    assert theory.one_step_loss(gamma.detach() + bump, sigma, w_cov, n, 0.3) > best




# ---------------------------------------------------------------- collect and summarize on hand-made files
# (mutation round 4: every number below is written by hand or recomputed here independently)


def write_icl_tables(directory: Path, **table_rows) -> None:
    for name, rows in table_rows.items():
        tables.write_table(rows, tables.TABLE_SCHEMAS[name], directory / f"{name}.parquet")


def test_summarize_reads_the_headline_cell_sorts_step_sizes_by_rank_and_needs_both_criteria(tmp_path):
    cfg = load_config({"layers": [1, 3], "n_grid": [20]})
    assert cfg.n == 20
    agreement = [{"n_layers": L, "n": 20, "reference": ref, "transformer_loss": t, "reference_loss": r,
                  "loss_ratio": t / r} for L, ref, t, r in [(3, "pgd", 0.15, 0.125), (3, "one_step_optimal", 0.9, 0.1),
                                                             (1, "pgd", 0.5, 0.25)]]
    steps = [{"n_layers": 3, "n": 20, "rank": rank, "learned": a, "optimal_pgd": b, "rel_error": abs(a - b) / b}
             for rank, a, b in [(2, 3.0, 2.5), (0, 1.0, 1.0), (1, 2.1, 2.0)]]
    steps.append({"n_layers": 1, "n": 20, "rank": 0, "learned": 9.0, "optimal_pgd": 1.0, "rel_error": 8.0})
    errors = [{"source": s, "n_layers": 1, "n": 20, "layer": 0, "reference": "one_step_optimal",
               "rel_frobenius_error": e, "sigma_weighted_error": 2 * e} for s, e in [("transformer", 0.1),
                                                                                   ("regression", 0.7)]]
    losses = [{"method": m, "n_layers": 1, "n": 20, "loss": v, "expected_loss": e}
              for m, v, e in [("one_step_optimal", 0.5, 0.45), ("transformer", 0.48, None)]]
    tmp_path = tmp_path / "results" / "icl"  # write_table makes the folders
    write_icl_tables(tmp_path, agreement=agreement, step_sizes=steps, preconditioner_error=errors,
                     loss_by_layers=losses)
    summary = study.summarize(cfg, str(tmp_path), loss_tol=0.3, step_tol=0.25)
    assert summary == {"n_layers": 3, "n": 20, "transformer_loss": 0.15, "pgd_loss": 0.125,
                       "loss_ratio": pytest.approx(1.2), "learned_step_sizes": [1.0, 2.1, 3.0],
                       "optimal_step_sizes": [1.0, 2.0, 2.5], "max_step_rel_error": pytest.approx(0.2),
                       "passed": True,
                       "one_layer": {"rel_frobenius_error": 0.1, "sigma_weighted_error": 0.2,
                                     "transformer_loss": 0.48, "optimal_loss": 0.45}}
    # loss within 30% but a step size 20% off (> 10%); step sizes fine but the loss 20% above (> 10%)
    assert not study.summarize(cfg, str(tmp_path), loss_tol=0.3, step_tol=0.1)["passed"]
    assert not study.summarize(cfg, str(tmp_path), loss_tol=0.1, step_tol=0.25)["passed"]


def baseline_rows(cfg, cells: list[tuple[str, int, int]]) -> list[dict]:
    """Baselines-file rows: method, L, n with identity preconditioners and loss 0.1·L + 0.001·n."""
    eye = torch.eye(cfg.d, dtype=DOUBLE).flatten().tolist()
    return [{"method": m, "n_layers": L, "n": n, "loss": 0.1 * L + 0.001 * n, "loss_stderr": 0.0,
             "expected_loss": None, "step_sizes": [1.0] * L, "preconditioners": [eye] * L} for m, L, n in cells]


@pytest.mark.parametrize("layers, loss_by_layers, loss_by_n", [
    ([1, 3], [("gd", 3, 20), ("one_step_optimal", 1, 20), ("pgd", 1, 20), ("pgd", 3, 20)],
     [("gd", 3, 20), ("pgd", 3, 10), ("pgd", 3, 20)]),
    ([1], [("one_step_optimal", 1, 20), ("pgd", 1, 20)], [("pgd", 1, 10), ("pgd", 1, 20)]),
])
def test_collect_splits_baseline_losses_into_the_layer_and_n_sweeps(tmp_path, layers, loss_by_layers, loss_by_n):
    """loss_by_layers: each L of icl.layers at n; loss_by_n: max(layers) at each n of n_grid, without the
    one-step optimum; both sorted by (method, L, n). Methods outside the loss tables are left out."""
    cfg = load_config({"layers": layers, "n_grid": [10, 20]})
    cells = [("pgd", L, n) for L in (1, 3) for n in (10, 20)] + [("gd", 3, 20), ("one_step_optimal", 1, 20),
                                                                    ("one_step_optimal", 1, 10), ("unlisted", 1, 20)]
    tables.write_table(baseline_rows(cfg, cells), tables.BASELINE_SCHEMA, tmp_path / "baselines.parquet")
    got = study.collect(cfg, str(tmp_path / "baselines.parquet"), [])
    for name, expected in (("loss_by_layers", loss_by_layers), ("loss_by_n", loss_by_n)):
        assert [(r["method"], r["n_layers"], r["n"]) for r in got[name]] == expected, name
        assert all(r["loss"] == pytest.approx(0.1 * r["n_layers"] + 0.001 * r["n"]) for r in got[name])


def test_collect_scores_a_hand_made_checkpoint_against_its_pgd_baseline(tmp_path):
    """A two-layer sparse model with Γ₀ = 0.5 Σ⁻¹, Γ₁ = 0.2 Σ⁻¹ (learned step sizes 0.5 and 0.2) against PGD
    steps 0.25 and 0.4: step sizes sorted ascending pair rank by rank (0.2 with 0.25, 0.5 with 0.4), relative
    errors 0.2 and 0.25; loss, its standard error, the loss ratio and the agreement recomputed here from
    preconditioned GD on the same held-out prompts."""
    cfg = load_config({"layers": [2], "n_grid": [20]})
    n = cfg.n
    sampler = PromptSampler(cfg, n)
    inverse = sampler.sigma.inverse
    gammas = torch.stack([0.5 * inverse, 0.2 * inverse])
    run_path = tmp_path / "L2.safetensors"
    meta = {"training_config": study.training_config(cfg), "n_layers": 2, "n": n,
            "curve": {"step": [1, 2], "loss": [1.0, 0.5], "lr": [0.1, 0.1], "seconds": [0.0, 1.0]}}
    study.save_weights(run_path, {"q": -gammas}, meta)
    ref_gammas = torch.stack([0.25 * inverse, 0.4 * inverse])
    pgd = {"method": "pgd", "n_layers": 2, "n": n, "loss": 0.125, "loss_stderr": 0.0, "expected_loss": None,
           "step_sizes": [0.25, 0.4], "preconditioners": [g.flatten().tolist() for g in ref_gammas]}
    tables.write_table([pgd], tables.BASELINE_SCHEMA, tmp_path / "baselines.parquet")
    got = study.collect(cfg, str(tmp_path / "baselines.parquet"), [str(run_path)])

    steps = sorted(got["step_sizes"], key=lambda r: r["rank"])
    assert [(r["rank"], r["layer"]) for r in steps] == [(0, 1), (1, 0)]
    assert [r["learned"] for r in steps] == pytest.approx([0.2, 0.5])
    assert [r["rel_error"] for r in steps] == pytest.approx([0.2, 0.25])

    test = study.held_out_prompts(cfg, n)
    mine, ref = theory.preconditioned_gd(test, gammas), theory.preconditioned_gd(test, ref_gammas)
    errors = (mine - test.query_y) ** 2
    loss = errors.mean().item()
    (row,) = [r for r in got["loss_by_layers"] if r["method"] == "transformer"]
    assert row["loss"] == pytest.approx(loss, rel=1e-6)
    assert row["loss_stderr"] == pytest.approx(errors.std().item() / math.sqrt(errors.numel()), rel=1e-6)
    (agreement,) = got["agreement"]
    gap = ((mine - ref) ** 2).mean().item()
    assert agreement["loss_ratio"] == pytest.approx(loss / 0.125, rel=1e-6)
    assert agreement["prediction_mse"] == pytest.approx(gap, rel=1e-6)
    assert agreement["relative_prediction_mse"] == pytest.approx(gap / (ref ** 2).mean().item(), rel=1e-6)
    assert [r["step"] for r in got["training"]] == [1, 2]


def test_collect_refuses_a_checkpoint_given_twice_and_check_names_a_table_without_its_row(tmp_path, capsys):
    """A checkpoint given twice would double every table's rows (and the check then failed with
    "too many values to unpack"); a table without the row the check reads is named with the row."""
    cfg = json.dumps({"layers": [2], "n_grid": [20]})
    run = tmp_path / "L2.safetensors"
    assert icl_main(["collect", "--config-json", cfg, "--baselines", str(tmp_path / "b.parquet"),
                     "--runs", str(run), str(tmp_path / "." / run.name), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lipflow: error: --runs") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    row = {name: [None] for name in tables.TABLE_SCHEMAS["agreement"].names}
    tables.write_table([{**{k: v[0] for k, v in row.items()}, "n_layers": 1, "n": 20, "reference": "pgd"}],
                       tables.TABLE_SCHEMAS["agreement"], tmp_path / "agreement.parquet")
    assert icl_main(["check", "--config-json", cfg, "--results-dir", str(tmp_path), "--out",
                     str(tmp_path / "summary.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"lipflow: error: {tmp_path / 'agreement.parquet'} holds 0 rows at n_layers=2, n=20, "
                   "reference='pgd', not one (collected for another icl config, or twice?)"), err


def test_collect_refuses_two_checkpoints_of_one_layer_count_and_n(tmp_path):
    """A copy of a checkpoint under another name is not the same path, yet it doubled every table's rows
    at its (L, n): two transformer losses, two agreement rows, four step-size rows."""
    cfg = load_config({"layers": [1], "n_grid": [20]})
    meta = {"training_config": study.training_config(cfg), "n_layers": 1, "n": 20,
            "curve": {"step": [1], "loss": [1.0], "lr": [0.1], "seconds": [0.0]}}
    first, copy = tmp_path / "L1_n20.safetensors", tmp_path / "copy.safetensors"
    for path in (first, copy):
        study.save_weights(path, {"q": -0.5 * torch.eye(5, dtype=DOUBLE)[None]}, meta)
    tables.write_table(baseline_rows(cfg, [("pgd", 1, 20), ("one_step_optimal", 1, 20)]), tables.BASELINE_SCHEMA,
                       tmp_path / "baselines.parquet")
    with pytest.raises(ValueError, match=r"copy.safetensors: L=1, n=20 is also the checkpoint .*L1_n20"):
        study.collect(cfg, str(tmp_path / "baselines.parquet"), [str(first), str(copy)])


@pytest.mark.parametrize("meta, q, message", [
    ({"n_layers": 1}, (1, 5, 5), "not an ICL study checkpoint (no training_config, n, curve, curve.step"),
    ({"n_layers": 1, "n": 20, "curve": {}}, (1, 5, 5), "not an ICL study checkpoint (no curve.step, curve.loss"),
    ({"n_layers": 1, "n": 20}, (2, 4, 5), "tensor q has shape (2, 4, 5), not (1, 5, 5)"),
])
def test_collect_names_a_checkpoint_without_the_studys_keys_or_shapes(tmp_path, capsys, meta, q, message):
    """A safetensors file without the metadata the study writes was 'missing key ...' naming no file, and one
    with a block of another shape a torch copy_ traceback."""
    cfg = load_config({"layers": [1], "n_grid": [20]})
    curve = {"curve": {"step": [1], "loss": [1.0], "lr": [0.1], "seconds": [0.0]}}
    full = {"training_config": study.training_config(cfg), **curve, **meta} if "n" in meta else meta
    run = tmp_path / "run.safetensors"
    study.save_weights(run, {"q": torch.zeros(q)}, full)
    tables.write_table(baseline_rows(cfg, [("pgd", 1, 20), ("one_step_optimal", 1, 20)]), tables.BASELINE_SCHEMA,
                       tmp_path / "baselines.parquet")
    code = icl_main(["collect", "--config-json", json.dumps({"layers": [1], "n_grid": [20]}), "--baselines",
                     str(tmp_path / "baselines.parquet"), "--runs", str(run), "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"lipflow: error: {run}: {message}") and "\n" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("threads", ["2147483648", "100000"])
def test_icl_threads_beyond_any_machine_is_one_line(threads, capsys):
    """torch.set_num_threads overflowed (a traceback) or crashed (segfault) on such counts."""
    assert icl_main(["--threads", threads, "plot", "--config-json", "{}", "--results-dir", "x", "--out-dir", "y"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lipflow: error: --threads {threads}: at most 1024", err


def test_icl_plot_with_a_table_missing_writes_no_figure(tmp_path, capsys):
    """plot reads every table before it draws: with loss_by_layers present and loss_by_n missing it
    used to write the first figure and then fail (exit 2 with a half-written output)."""
    rows = [{"method": "transformer", "n_layers": 1, "n": 20, "loss": 0.5, "loss_stderr": 0.01, "expected_loss": None}]
    schema = tables.TABLE_SCHEMAS["loss_by_layers"]
    tables.write_table([{**dict.fromkeys(schema.names), **{k: v for k, v in rows[0].items() if k in schema.names}}],
                       schema, tmp_path / "loss_by_layers.parquet")
    assert icl_main(["plot", "--config-json", "{}", "--results-dir", str(tmp_path),
                     "--out-dir", str(tmp_path / "figures")]) == 2
    err = capsys.readouterr().err.strip()
    assert "loss_by_n.parquet" in err and len(err.splitlines()) == 1, err
    assert not list(tmp_path.glob("figures/*"))


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_the_figures_legend_names_the_configured_attention(tmp_path, monkeypatch, attention):
    """The legend said "trained linear transformer" whatever icl.attention was: plot takes the config
    (--config-json, as the other commands) and each figure's legend names the trained models' attention."""
    from lipflow.studies.icl import plots

    for name in ("loss_by_layers", "loss_by_n"):
        schema = tables.TABLE_SCHEMAS[name]
        rows = [{**dict.fromkeys(schema.names), "method": method, "n_layers": 2, "n": 20, "loss": 0.5, "loss_stderr": 0.01}
                for method in ("transformer", "pgd")]
        tables.write_table(rows, schema, tmp_path / f"{name}.parquet")
    drawn, draw = [], plots.plot_losses
    monkeypatch.setattr(plots, "plot_losses", lambda *args: drawn.append(draw(*args)) or drawn[-1])
    assert icl_main(["plot", "--config-json", json.dumps({"attention": attention}), "--results-dir", str(tmp_path),
                     "--out-dir", str(tmp_path / "figures")]) == 0
    legends = [[text.get_text() for text in fig.axes[0].get_legend().get_texts()] for fig in drawn]
    assert legends == [[f"trained {attention}-attention transformer", plots.LABELS["pgd"]]] * 2, legends


def test_collect_refuses_baselines_computed_under_another_icl_config(tmp_path, capsys):
    """The baselines file records the keys it depends on; collect under another Σ (or prior, noise, n …)
    is one line naming the keys and writes no table, instead of silently pairing the models with the
    other config's PGD, GD and least-squares losses (a noisy config got least-squares loss 0)."""
    small = {"d": 2, "n": 4, "layers": [1], "n_grid": [4], "theory_samples": 1000, "regression_prompts": 1000,
             "sigma": {"kind": "diagonal", "eigenvalues": [1.0, 0.5]}}
    baselines = tmp_path / "baselines.parquet"
    assert icl_main(["baselines", "--config-json", json.dumps(small), "--out", str(baselines)]) == 0
    assert study.collect(load_config(small), str(baselines), [])["loss_by_layers"]  # same config: read
    other = {**small, "sigma": {"kind": "diagonal", "eigenvalues": [1.0, 0.01]}, "noise_std": 1.0}
    code = icl_main(["collect", "--config-json", json.dumps(other), "--baselines", str(baselines),
                     "--runs", str(tmp_path / "unused.safetensors"), "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (f"lipflow: error: {baselines}: computed with different icl.noise_std, icl.sigma; "
                   "rerun the baselines command"), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("enabled, experiments", [(True, []), (False, ["icl"])])
def test_the_plan_refuses_fewer_regression_prompts_than_coefficients(enabled, experiments):
    """The same rule refuses the config before any job starts: it passed the plan, so `snakemake` trained
    every model and only then failed in the baselines job."""
    from lipflow.plan import Plan

    block = {"enabled": enabled, "d": 40, "sigma": {"kind": "identity"}, "regression_prompts": 1000}
    with pytest.raises(ConfigError, match=r"^config error: icl.regression_prompts: 1000 is fewer than the d² = 1600"):
        Plan.from_config({"icl": block, "experiments": experiments})
    Plan.from_config({"icl": {**block, "layers": [2, 3]}, "experiments": experiments})  # no Γ̂ without L = 1


@pytest.mark.parametrize("sigma, message", [
    ({"kind": "diagonal", "eigenvalues": [1.0]}, r"icl.sigma.eigenvalues: has 1 entries but icl.d = 5"),
    ({"kind": "diagonal", "eigenvalues": [1.0, 1e-320, 1.0, 1.0, 1.0]}, r"icl.sigma.eigenvalues.1: 1e-320 has no finite"),
])
def test_the_plans_icl_errors_carry_the_config_error_prefix(sigma, message):
    """Under Snakemake every config error reads `lipflow: config error: <key>: ...`; the icl block's own
    cross-key rules (Σ's eigenvalues, Γ̂'s prompts) came out without the prefix."""
    from lipflow.plan import Plan

    with pytest.raises(ConfigError, match=rf"^config error: {message}"):
        Plan.from_config({"icl": {"sigma": sigma}})


@pytest.mark.parametrize("figure, states", [
    ("loss_vs_layers", ["softmax-attention transformers (full: P and Q learned) with L = 2, 4 layers", "n = 12 in-context"]),
    ("loss_vs_n", ["n = 6, 12 of in-context", "deepest of the trained softmax-attention transformers (full: P and Q learned), with L = 4 layers"])])
def test_the_figure_captions_state_the_configured_models_layers_and_n(figure, states):
    """The report captions said "linear transformers with L = 1, 2, 3 layers" whatever icl.layers, icl.attention
    and icl.parametrization were. Rendered as `snakemake --report` renders them (Jinja2, the icl_plots job's
    params), they now state the config's models, layer counts and context lengths."""
    from jinja2 import Environment, StrictUndefined

    from lipflow.plan import Plan

    block = {"enabled": True, "layers": [2, 4], "n": 12, "n_grid": [6, 12], "attention": "softmax",
             "parametrization": "full"}
    job = type("Snakemake", (), {"params": type("Params", (), {"caption": Plan.from_config({"icl": block}).icl_caption()})})
    template = (REPO / "workflow" / "report" / f"figure_icl_{figure}.rst").read_text(encoding="utf-8")
    caption = " ".join(Environment(undefined=StrictUndefined).from_string(template).render(snakemake=job).split())
    assert all(words in caption for words in states), caption
    assert "1, 2, 3" not in caption and "linear-attention" not in caption, caption
    plots_rule = (REPO / "workflow" / "rules" / "icl.smk").read_text().split("rule icl_plots:")[1].split("\nrule ")[0]
    assert re.search(r"^ +caption=icl_caption,", plots_rule, re.MULTILINE), plots_rule


@pytest.mark.parametrize("flag, value", [("--loss-tol", "nan"), ("--step-tol", "-1"), ("--step-tol", "x")])
def test_check_refuses_a_tolerance_that_is_no_number_at_least_zero(tmp_path, capsys, flag, value):
    """`check --loss-tol nan` (or a negative tolerance) was taken: every comparison with it is false, so the
    summary said passed: false (and --strict exited 1) for any model; now it is a one-line usage error, exit 2,
    before anything is read or written."""
    out = tmp_path / "summary.json"
    with pytest.raises(SystemExit) as caught:
        icl_main(["check", "--config-json", "{}", "--results-dir", str(tmp_path), "--out", str(out), flag, value])
    assert caught.value.code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err, err


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_a_one_layer_full_model_trains(attention):
    """With the full parametrization a one-layer model's P updates only the x-rows, which no later layer
    reads, so P gets no gradient: the L = 1 job (in the default icl.layers) crashed with an AttributeError
    traceback in the per-layer clipping. Now it trains Q and leaves P at its initialisation."""
    cfg = load_config({"d": 2, "sigma": {"kind": "identity"}, "parametrization": "full", "attention": attention,
                       "train_steps": 3, "batch_size": 10, "device": "cpu"})
    initial = InContextTransformer(2, 1, "full", attention, cfg.init_std,
                                   torch.Generator().manual_seed(study.stream_seed(cfg.seed, "init", 1, 5)))
    result = train_model(cfg, 1, 5, progress=False)
    assert torch.equal(result.model.p, initial.p) and not torch.equal(result.model.q, initial.q)
    assert all(math.isfinite(loss) for loss in result.losses)


def test_a_figure_of_one_layer_count_has_integer_ticks():
    """With one value on the x axis (icl.layers: [2], or one n in n_grid) the axis spanned 1.9 … 2.1 and
    its ticks read 1.900, 1.925, …: fractional layer counts. Every tick in view is now a whole number."""
    from lipflow.studies.icl import plots

    rows = [{"method": "transformer", "n_layers": 2, "n": 5, "loss": 0.5, "loss_stderr": 0.01},
            {"method": "pgd", "n_layers": 2, "n": 5, "loss": 0.4, "loss_stderr": 0.01}]
    fig = plots.plot_losses(rows, "n_layers", "number of layers L", "t", "linear")
    fig.canvas.draw()
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    plots.plt.close(fig)
    assert 2 in ticks and all(float(t).is_integer() for t in ticks), ticks


def test_a_non_finite_start_names_init_std(tmp_path):
    """An init_std so large that the first step's loss is inf (1e30) was refused with advice naming only
    icl.lr and icl.sigma.eigenvalues, neither of which is the cause; the message names icl.init_std too,
    and no checkpoint is written."""
    cfg = load_config({"d": 2, "sigma": {"kind": "identity"}, "init_std": 1e30, "train_steps": 2, "batch_size": 4,
                       "device": "cpu"})
    out = tmp_path / "L1_n5.safetensors"
    with pytest.raises(ValueError, match=r"by step 0\).*icl\.init_std"):
        study.run_train(cfg, 1, 5, str(out), progress=False)
    assert not out.exists()
