"""The ICL study's jobs: train one (L, n), score the baselines, collect the result tables
(their schemas: :mod:`lipflow.studies.icl.tables`), check the headline.

Every method is scored on the same fixed test prompts of its n (``cfg.test_prompts`` prompts,
float64 on the CPU, drawn from stream ("test", n) of ``cfg.seed``), so losses of different
methods are paired and their ratios are far more precise than each loss alone.
"""

from __future__ import annotations

import json
import math
import operator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from lipflow.errors import check_distinct_paths, parse_json
from lipflow.provenance import stream_seed
from lipflow.train.checkpoint import load_weights, read_header, save_weights
from lipflow.studies.icl import theory
from lipflow.studies.icl.config import (ICLConfig, baselines_config, check_regression_prompts, training_config,
                                        training_jobs)
from lipflow.studies.icl.data import Prompts, PromptSampler, spd_power
from lipflow.studies.icl.model import InContextTransformer
from lipflow.studies.icl.tables import BASELINE_SCHEMA, LOSS_SCHEMA, LOSS_TABLE_METHODS, TABLE_SCHEMAS, write_table
from lipflow.studies.icl.train import train_model
from lipflow.data.parquet import read_table_parquet


def held_out_prompts(cfg: ICLConfig, n: int) -> Prompts:
    """The fixed held-out test set of context length n (CPU, float64)."""
    sampler = PromptSampler(cfg, n)
    generator = torch.Generator().manual_seed(stream_seed(cfg.seed, "test", n))
    return sampler.sample(cfg.test_prompts, generator, torch.float64)


def loss_stats(predictions: torch.Tensor, prompts: Prompts) -> tuple[float, float]:
    """Mean squared error on the query and its standard error."""
    errors = (predictions - prompts.query_y).square()
    return float(errors.mean()), float(errors.std() / errors.numel() ** 0.5)


# ---------------------------------------------------------------- train job


# What a training checkpoint holds: the blocks Q (and P, without the sparse parametrization) and, in
# its lipflow metadata, these keys (what the train command may replace: :func:`is_checkpoint`)
CHECKPOINT_TENSORS = ("q", "p")
CHECKPOINT_KEYS = ("training_config", "n_layers", "n", "curve")
CURVE_KEYS = ("step", "loss", "lr", "seconds")


def run_train(cfg: ICLConfig, n_layers: int, n: int, out: str, progress: bool = True) -> None:
    """Train one model and save its blocks, training curve and training config."""
    result = train_model(cfg, n_layers, n, progress=progress)
    model = result.model
    blocks = [p for p in (model.q, model.p) if p is not None]
    if not all(bool(torch.isfinite(p).all()) for p in blocks) or not all(map(math.isfinite, result.losses)):
        # a float32 overflow (Σ's eigenvalues far from 1, w ~ N(0, I); a huge init_std) or a blow-up: no checkpoint of NaNs
        step = next((s for s, v in zip(result.steps, result.losses) if not math.isfinite(v)), result.steps[-1])
        raise ValueError(f"icl train L={n_layers} n={n}: the training loss or the weights became non-finite "
                         f"(by step {step}); lower icl.lr or icl.init_std, or bring icl.sigma.eigenvalues closer to 1")
    tensors = {"q": model.q.detach()}
    if model.p is not None:
        tensors["p"] = model.p.detach()
    meta = {"training_config": training_config(cfg), "n_layers": n_layers, "n": n,
            "curve": {"step": list(result.steps), "loss": [float(v) for v in result.losses],
                      "lr": [float(v) for v in result.lrs], "seconds": [float(v) for v in result.seconds]}}
    save_weights(Path(out), tensors, meta)  # safetensors + JSON: nothing here unpickles


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a safetensors file as :func:`run_train` writes it: tensor ``q`` (and ``p``)
    only, and lipflow metadata with exactly :data:`CHECKPOINT_KEYS` (a run's weights are not one)."""
    try:
        names, meta = read_header(path)
    except (OSError, ValueError, SafetensorError):  # not a safetensors file, or no JSON metadata
        return False
    return ("q" in names and names <= set(CHECKPOINT_TENSORS) and isinstance(meta, dict)
            and sorted(meta) == sorted(CHECKPOINT_KEYS))


def load_run(path: str, cfg: ICLConfig) -> tuple[dict[str, Any], InContextTransformer]:
    """A checkpoint and its model (float64); refuses one trained under another config."""
    tensors, checkpoint = load_weights(Path(path))
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint] + [
        f"curve.{key}" for key in CURVE_KEYS if key not in (checkpoint.get("curve") or {})]
    if missing or "q" not in tensors:
        raise ValueError(f"{path}: not an ICL study checkpoint (no {', '.join(missing or ['tensor q'])})")
    checkpoint = {**checkpoint, "q": tensors["q"], "p": tensors.get("p")}
    expected = training_config(cfg)
    changed = sorted(k for k in expected if checkpoint["training_config"].get(k) != expected[k])
    if changed:
        raise ValueError(f"{path}: trained with different icl.{', icl.'.join(changed)}; retrain it")
    model = InContextTransformer(
        cfg.d, checkpoint["n_layers"], cfg.parametrization, cfg.attention
    ).double()
    for name in ("q", "p"):  # a hand-made or damaged file: a one-line error, not torch's copy_ traceback
        block, shape = checkpoint[name], None if getattr(model, name) is None else tuple(getattr(model, name).shape)
        if (None if block is None else tuple(block.shape)) != shape:
            found = "none" if block is None else tuple(block.shape)
            raise ValueError(f"{path}: tensor {name} has shape {found}, not {shape} (L={checkpoint['n_layers']}, "
                             f"icl.d = {cfg.d}, icl.parametrization = {cfg.parametrization})")
    with torch.no_grad():
        model.q.copy_(checkpoint["q"])
        if model.p is not None:
            model.p.copy_(checkpoint["p"])
    return checkpoint, model


# ---------------------------------------------------------------- baselines job


def theory_context(cfg: ICLConfig, n: int, max_layers: int) -> theory.TheoryContext:
    sampler = PromptSampler(cfg, n)
    eye = torch.eye(cfg.d, dtype=torch.float64)

    def problem(preconditioner: torch.Tensor) -> theory.StepSizeProblem:
        generator = torch.Generator().manual_seed(stream_seed(cfg.seed, "theory", n))
        problem = theory.StepSizeProblem.estimate(
            sampler, preconditioner, max_layers, cfg.theory_samples, generator
        )
        if not bool(torch.isfinite(problem.hessian).all()):  # E tr(S^j Σ S^k Ω) grows like λ_max^(2L+1)
            raise ValueError(f"icl: the GD step-size problem at n={n}, L ≤ {max_layers} overflows float64; bring "
                             "icl.sigma.eigenvalues closer to 1 or use fewer icl.layers")
        return problem

    inverse = sampler.sigma.inverse
    return theory.TheoryContext(held_out_prompts(cfg, n), inverse, problem(inverse), problem(eye))


def baseline_layers(cfg: ICLConfig) -> dict[int, list[int]]:
    """n → the layer counts of the training jobs at n (their baselines are needed)."""
    needed: dict[int, list[int]] = {}
    for layers, n in training_jobs(cfg):  # sorted by (L, n)
        needed.setdefault(n, []).append(layers)
    return dict(sorted(needed.items()))


def _baseline_row(method, n_layers, n, predictions, test, expected, steps, preconditioners):
    loss, stderr = loss_stats(predictions, test)
    return {
        "method": method,
        "n_layers": n_layers,
        "n": n,
        "loss": loss,
        "loss_stderr": stderr,
        "expected_loss": expected,
        "step_sizes": steps,
        "preconditioners": [g.flatten().tolist() for g in preconditioners],
    }


# the baselines file records baselines_config in its Parquet metadata under this key, and collect refuses a file
# computed under other values
BASELINES_CONFIG_KEY = b"lipflow_icl_baselines_config"


def check_baselines_config(table, path: str, cfg: ICLConfig) -> None:
    """A ValueError naming the keys when the baselines table records a config other than ``cfg``'s
    (a table without the record, written by hand or before it was kept, is taken as it is)."""
    recorded = (table.schema.metadata or {}).get(BASELINES_CONFIG_KEY)
    if recorded is None:
        return
    recorded = parse_json(recorded.decode())
    expected = baselines_config(cfg)
    changed = sorted(k for k in expected if not isinstance(recorded, dict) or recorded.get(k) != expected[k])
    if changed:
        raise ValueError(f"{path}: computed with different icl.{', icl.'.join(changed)}; rerun the baselines command")


def run_baselines(cfg: ICLConfig, out: str) -> None:
    """Score every registered baseline, Γ⋆ and the regression optimum Γ̂ on the test sets."""
    check_regression_prompts(cfg)
    rows = []
    for n, layer_counts in baseline_layers(cfg).items():
        ctx = theory_context(cfg, n, max(layer_counts))
        sampler = PromptSampler(cfg, n)
        sigma, w_cov = sampler.sigma.matrix, sampler.w_cov
        for n_layers in layer_counts:
            for method in theory.BASELINES:
                result = theory.BASELINES.get(method)(ctx, n_layers)
                rows.append(
                    _baseline_row(
                        method, n_layers, n, result.predictions, ctx.test,
                        result.expected_loss, result.step_sizes, result.preconditioners,
                    )
                )
        if 1 not in layer_counts:
            continue
        generator = torch.Generator().manual_seed(stream_seed(cfg.seed, "regression", n))
        one_step = {
            "one_step_optimal": theory.optimal_preconditioner(sigma, w_cov, n, cfg.noise_std),
            "regression": theory.regression_optimum(sampler, cfg.regression_prompts, generator),
        }
        for method, gamma in one_step.items():
            rows.append(
                _baseline_row(
                    method, 1, n, theory.preconditioned_gd(ctx.test, gamma[None]), ctx.test,
                    theory.one_step_loss(gamma, sigma, w_cov, n, cfg.noise_std),
                    [theory.step_size(gamma, sigma)], [gamma],
                )
            )
    metadata = {BASELINES_CONFIG_KEY: json.dumps(baselines_config(cfg), sort_keys=True).encode()}
    write_table(rows, BASELINE_SCHEMA.with_metadata(metadata), out)


# ---------------------------------------------------------------- collect job


def _matrix(flat: list[float], d: int) -> torch.Tensor:
    return torch.tensor(flat, dtype=torch.float64).reshape(d, d)


def _error_row(source, n_layers, n, layer, reference, gamma, ref, sigma):
    whiten = spd_power(sigma, 0.5)
    return {
        "source": source,
        "n_layers": n_layers,
        "n": n,
        "layer": layer,
        "reference": reference,
        "rel_frobenius_error": theory.relative_error(gamma, ref),
        "sigma_weighted_error": theory.sigma_weighted_error(gamma, ref, sigma),
        "dist_whitened": theory.distance_to_identity(whiten @ gamma @ whiten),
        "dist_identity": theory.distance_to_identity(gamma),
        "step_size": theory.step_size(gamma, sigma),
        "reference_step_size": theory.step_size(ref, sigma),
    }


def _matrix_rows(source, block, n_layers, n, matrices):
    return [
        {"source": source, "block": block, "n_layers": n_layers, "n": n, "layer": layer,
         "row": i, "col": j, "value": float(m[i, j])}
        for layer, m in enumerate(matrices)
        for i in range(m.shape[0])
        for j in range(m.shape[1])
    ]


def _add_run(tables, cfg: ICLConfig, baselines: dict, checkpoint: dict, model, test, sigma):
    """Rows of one trained model: loss, blocks, step sizes, errors, agreement, training curve."""
    n_layers, n = checkpoint["n_layers"], checkpoint["n"]
    with torch.no_grad():
        predictions = model(test.tokens())
    loss, stderr = loss_stats(predictions, test)
    tables["losses"].append({"method": "transformer", "n_layers": n_layers, "n": n, "loss": loss,
                             "loss_stderr": stderr, "expected_loss": None})
    gammas = model.preconditioners()
    tables["preconditioner"] += _matrix_rows("transformer", "gamma", n_layers, n, gammas)
    if model.p is not None:
        tables["preconditioner"] += _matrix_rows("transformer", "p", n_layers, n, model.p.detach())

    pgd = baselines[("pgd", n_layers, n)]
    learned = [theory.step_size(g, sigma) for g in gammas]
    for rank, layer in enumerate(sorted(range(n_layers), key=lambda layer: learned[layer])):
        optimal = pgd["step_sizes"][rank]
        tables["step_sizes"].append(
            {"n_layers": n_layers, "n": n, "rank": rank, "layer": layer, "learned": learned[layer],
             "optimal_pgd": optimal, "rel_error": abs(learned[layer] - optimal) / abs(optimal)}
        )
        if n_layers == 1:  # Thm 1: the one-layer optimum Γ⋆ (≠ a Σ⁻¹ when w ~ N(0, I))
            reference = "one_step_optimal"
            ref = _matrix(baselines[(reference, 1, n)]["preconditioners"][0], cfg.d)
        else:  # Thm 3: the rank-matched PGD step a_(rank) Σ⁻¹
            reference, ref = "pgd", _matrix(pgd["preconditioners"][rank], cfg.d)
        tables["preconditioner_error"].append(
            _error_row("transformer", n_layers, n, layer, reference, gammas[layer], ref, sigma)
        )

    for reference in ["pgd"] + (["one_step_optimal"] if n_layers == 1 else []):
        ref_row = baselines[(reference, n_layers, n)]
        ref_gammas = torch.stack([_matrix(flat, cfg.d) for flat in ref_row["preconditioners"]])
        ref_pred = theory.preconditioned_gd(test, ref_gammas)
        gap = float((predictions - ref_pred).square().mean())
        pair = torch.stack([predictions, ref_pred])
        tables["agreement"].append(
            {"n_layers": n_layers, "n": n, "reference": reference, "transformer_loss": loss,
             "reference_loss": ref_row["loss"], "loss_ratio": loss / ref_row["loss"],
             "prediction_mse": gap, "relative_prediction_mse": gap / float(ref_pred.square().mean()),
             "prediction_correlation": float(torch.corrcoef(pair)[0, 1])}
        )
    curve = checkpoint["curve"]
    tables["training"] += [
        {"n_layers": n_layers, "n": n, "step": step, "loss": value, "lr": lr, "seconds": seconds}
        for step, value, lr, seconds in zip(curve["step"], curve["loss"], curve["lr"], curve["seconds"])
    ]


def collect(cfg: ICLConfig, baselines_path: str, run_paths: list[str]) -> dict[str, list[dict]]:
    """Rows of every result table from the baselines file and the training checkpoints."""
    sigma = PromptSampler(cfg, cfg.n).sigma.matrix
    table = read_table_parquet(baselines_path)
    check_baselines_config(table, baselines_path, cfg)
    rows = table.to_pylist()
    baselines = {(r["method"], r["n_layers"], r["n"]): r for r in rows}
    tables: dict[str, list[dict]] = {name: [] for name in TABLE_SCHEMAS}
    tables["losses"] = [
        {k: r[k] for k in LOSS_SCHEMA.names} for r in rows if r["method"] in LOSS_TABLE_METHODS
    ]
    for r in rows:
        matrices = [_matrix(flat, cfg.d) for flat in r["preconditioners"]]
        tables["preconditioner"] += _matrix_rows(r["method"], "gamma", r["n_layers"], r["n"], matrices)
        if r["method"] == "regression":
            optimum = baselines[("one_step_optimal", 1, r["n"])]["preconditioners"][0]
            tables["preconditioner_error"].append(_error_row(
                "regression", 1, r["n"], 0, "one_step_optimal", matrices[0],
                _matrix(optimum, cfg.d), sigma,
            ))
    tests: dict[int, Prompts] = {}
    seen: dict[tuple[int, int], str] = {}
    for path in run_paths:
        checkpoint, model = load_run(path, cfg)
        n_layers, n = checkpoint["n_layers"], checkpoint["n"]
        if ("pgd", n_layers, n) not in baselines:
            raise ValueError(f"{path}: L={n_layers}, n={n} is not in icl.layers × n / n_grid")
        if (n_layers, n) in seen:  # two files of one job would put two rows in every table at (L, n)
            raise ValueError(f"{path}: L={n_layers}, n={n} is also the checkpoint {seen[n_layers, n]}; give one")
        seen[n_layers, n] = path
        if n not in tests:
            tests[n] = held_out_prompts(cfg, n)
        _add_run(tables, cfg, baselines, checkpoint, model, tests[n], sigma)

    losses = tables.pop("losses")
    by_layers = {(layers, cfg.n) for layers in cfg.layers}
    by_n = {(max(cfg.layers), n) for n in cfg.n_grid}
    order = operator.itemgetter("method", "n_layers", "n")
    tables["loss_by_layers"] = sorted(
        (r for r in losses if (r["n_layers"], r["n"]) in by_layers), key=order
    )
    tables["loss_by_n"] = sorted(
        (r for r in losses
         if (r["n_layers"], r["n"]) in by_n and r["method"] != "one_step_optimal"),
        key=order,
    )
    return tables


def run_collect(cfg: ICLConfig, baselines_path: str, run_paths: list[str], out_dir: str) -> list[Path]:
    """Write the study's tables into ``out_dir`` and return them."""
    check_distinct_paths(run_paths, "--runs")  # a checkpoint given twice would count its rows twice
    written = []
    for name, rows in collect(cfg, baselines_path, run_paths).items():
        written.append(Path(out_dir) / f"{name}.parquet")
        write_table(rows, TABLE_SCHEMAS[name], written[-1])
    return written


# ---------------------------------------------------------------- headline check


# The keys of the check summary (``one_layer`` too when 1 is in icl.layers): what the check command may replace
SUMMARY_KEYS = ("n_layers", "n", "transformer_loss", "pgd_loss", "loss_ratio", "learned_step_sizes",
                "optimal_step_sizes", "max_step_rel_error", "passed")
SUMMARY_OPTIONAL_KEYS = ("one_layer",)


def summarize(cfg: ICLConfig, results_dir: str, loss_tol: float, step_tol: float) -> dict:
    """The headline comparison at (max(layers), n): trained model vs optimal PGD, with pass flags.

    Passing means loss ≤ (1 + loss_tol)·PGD loss on the same test prompts and every sorted
    learned step size within step_tol (relative) of the optimal PGD step sizes.
    """
    n_layers, n = max(cfg.layers), cfg.n

    def rows(table: str, **where) -> list[dict]:
        found = read_table_parquet(Path(results_dir) / f"{table}.parquet").to_pylist()
        return [r for r in found if all(r.get(k) == v for k, v in where.items())]

    def one_row(table: str, **where) -> dict:
        matching = rows(table, **where)
        if len(matching) != 1:
            at = ", ".join(f"{k}={v!r}" for k, v in where.items())
            raise ValueError(f"{Path(results_dir) / f'{table}.parquet'} holds {len(matching)} rows at {at}, not one "
                             "(collected for another icl config, or twice?)")
        return matching[0]

    agreement = one_row("agreement", n_layers=n_layers, n=n, reference="pgd")
    steps = sorted(rows("step_sizes", n_layers=n_layers, n=n), key=lambda r: r["rank"])
    if not steps:
        raise ValueError(f"{Path(results_dir) / 'step_sizes.parquet'} holds no rows at n_layers={n_layers}, n={n} "
                         "(collected for another icl config?)")
    summary: dict[str, Any] = {
        "n_layers": n_layers,
        "n": n,
        "transformer_loss": agreement["transformer_loss"],
        "pgd_loss": agreement["reference_loss"],
        "loss_ratio": agreement["loss_ratio"],
        "learned_step_sizes": [r["learned"] for r in steps],
        "optimal_step_sizes": [r["optimal_pgd"] for r in steps],
        "max_step_rel_error": max(r["rel_error"] for r in steps),
    }
    summary["passed"] = (
        summary["loss_ratio"] <= 1 + loss_tol and summary["max_step_rel_error"] <= step_tol
    )
    if 1 in cfg.layers:
        error = one_row("preconditioner_error", source="transformer", n_layers=1, n=n)
        optimal = one_row("loss_by_layers", method="one_step_optimal", n_layers=1, n=n)
        trained = one_row("loss_by_layers", method="transformer", n_layers=1, n=n)
        summary["one_layer"] = {
            "rel_frobenius_error": error["rel_frobenius_error"],
            "sigma_weighted_error": error["sigma_weighted_error"],
            "transformer_loss": trained["loss"],
            "optimal_loss": optimal["expected_loss"],
        }
    return summary
