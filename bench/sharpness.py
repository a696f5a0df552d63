"""Lanczos λ_max (training's sharpness) against power iteration: cost, accuracy and rare misses.

    python bench/sharpness.py [--quick] [--seeds N] [--train-steps S] [--rounds R] [--threads T] [--device D]

Cases, each a Hessian with a reference for its extreme eigenvalues:

- ``cluster``: ½θᵀAθ, A = Q diag(λ) Qᵀ with Q a fixed random orthogonal basis and λ a top cluster 10, 9.9, …,
  9.1 over a bulk N(0, 0.05²) and −30 (tests/test_sharpness.py's cluster test has 10, 9.9, 9.8 on a diagonal):
  λ_max = 10 and the largest |λ| = 30, exactly;
- ``tiny_gpt``: a gpt of 816 parameters at init on one random batch, its Hessian formed exactly in float64
  (``exact_hessian``); also checks the long-Lanczos reference the real models use;
- config.yaml's ``baseline`` (gpt + AdamW) and ``lipschitz`` (lipschitz_gpt + Muon + soft cap) at the default
  shape after ``--train-steps`` steps, on the batch training's sharpness uses, and for AdamW also P⁻¹H (Adam's
  preconditioner, ``baseline_preconditioned``) as training logs it: reference = the extreme Ritz values of a
  ``REFERENCE_STEPS``-step Lanczos run (the top one's residual bounds its error, Parlett Thm 4.5.1);
- ``sc_sp_w128_preconditioned``: P⁻¹H of the cpu super_consistency preset's SP width-128 run at step 20, whose
  negative end is as large as its top (the case that moved training's sharpness from power iteration to Lanczos).

Per case, side by side: ``largest_eigenvalue`` at training's settings (at most ``sharpness_iters`` = 10, the cpu
super_consistency preset's, and 20, the default; tol ``TRAINING_SHARPNESS_TOL``) and ``power_iteration`` at the
sharpness evaluation's defaults (iters, tol): Hessian-vector products, wall time (median of ``--rounds``
alternating runs, each building its operator), relative error |θ − λ_max|/|λ_max|, and whether power
iteration returned the other end of the spectrum (its answer nearer λ_min than λ_max). Over ``--seeds`` start
vectors (seeds 0, 1, …): how often Lanczos misses, returning θ < λ_max − tol·|λ_max|, how many of those misses
were stopped by the residual rule rather than by running all ``sharpness_iters`` steps (capped), and the mean
and most products. Memory: the Lanczos basis (steps × parameters × 4 bytes, allocated at the start) against
the parameters' bytes. --quick: n = 200, a 20-step reference, 2 training steps on 4 windows, 2 seeds, one
timed round without warmup. Rows go to results/bench/sharpness.parquet (--quick: results/bench/quick/).
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's directory would come first on sys.path, where bench/tokenize.py
# shadows the standard library's ``tokenize`` (imported by torch): put the repo root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterator, Sequence  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from bench.common import (REPO, add_out_argument, add_torch_arguments, add_train_steps_argument,  # noqa: E402
                          alternating_timings, default_shards, parse_bench_args, print_table, row, run_configs,
                          save_rows, torch_setup, trained_default_runs)
from lipflow.config import evaluation_params, load_config_file, run_defaults  # noqa: E402
from lipflow.errors import count_argument, summary_of  # noqa: E402
from lipflow.evaluation.sharpness import (HessianOperator, LossFn, adam_preconditioner,  # noqa: E402
                                          lanczos_ritz_pairs, language_model_loss_fn, largest_eigenvalue,
                                          power_iteration)
from lipflow.model import build_model  # noqa: E402
from lipflow.train.telemetry import TRAINING_SHARPNESS_TOL  # noqa: E402
from lipflow.train.trainer import Trainer  # noqa: E402

BENCH = "sharpness"
LANCZOS_ITERS = (10, 20)  # sharpness_iters of the cpu super_consistency preset and the schema's default
REFERENCE_STEPS = {"default": 100, "quick": 20}  # Lanczos steps of the real models' reference
CLUSTER_DIM = {"default": 2000, "quick": 200}
CLUSTER_TOP = [10.0 - 0.1 * k for k in range(10)]  # 10, 9.9, …, 9.1
CLUSTER_BOTTOM = -30.0
TINY_GPT = {"model": "gpt", "d_model": 8, "n_layers": 1, "n_heads": 2, "context": 8, "mlp_ratio": 2}
TINY_VOCAB, TINY_BATCH = 12, 4
QUICK_SHAPE = {"batch_size": 4}  # --quick's trained models see 4 windows, not config.yaml's 16
SUPER_CONSISTENCY = "sc_sp_w128"  # at step 20 its P⁻¹H spans [−279, 273]: power iteration's wrong end (README)


@dataclass
class Case:
    """A Hessian (of ``loss_fn`` w.r.t. ``params``, or of D^{½}HD^{½} with ``precondition`` = diag(D)) and the
    reference for its extreme eigenvalues; ``reference_residual`` = 0 where they are exact."""

    name: str
    loss_fn: LossFn
    params: list[torch.Tensor]
    precondition: torch.Tensor | None
    lambda_max: float
    lambda_min: float
    reference_residual: float = 0.0

    @property
    def dim(self) -> int:
        return sum(p.numel() for p in self.params)


def exact_hessian(loss_of_flat, theta: torch.Tensor) -> torch.Tensor:
    """The full Hessian ∂²L/∂θ² of ``loss_of_flat`` at the flat float64 ``theta``, one autograd row per
    coordinate (torch.autograd.functional.hessian), symmetrised; attention on SDPA's math backend, the
    one that is twice differentiable."""
    with sdpa_kernel([SDPBackend.MATH]):
        hessian = torch.autograd.functional.hessian(loss_of_flat, theta.double())
    return (hessian + hessian.T) / 2


def count_misses(estimates: Sequence[float], lambda_max: float, tol: float) -> int:
    """How many ``estimates`` lie below λ_max by more than ``tol``·|λ_max|."""
    return sum(1 for value in estimates if value < lambda_max - tol * abs(lambda_max))


def relative_error(value: float, reference: float) -> float:
    """|value − reference| / |reference|."""
    return abs(value - reference) / abs(reference)


@contextlib.contextmanager
def counting_products() -> Iterator[list[int]]:
    """Counts the Hessian-vector products (``HessianOperator`` calls) made inside the block in the yielded
    one-item list."""
    count, original = [0], HessianOperator.__call__

    def counted(self, v):
        count[0] += 1
        return original(self, v)

    HessianOperator.__call__ = counted
    try:
        yield count
    finally:
        HessianOperator.__call__ = original


def cluster_case(dim: int) -> Case:
    """½θᵀAθ with A = Q diag(λ) Qᵀ, λ = ``CLUSTER_TOP``, a bulk N(0, 0.05²) and ``CLUSTER_BOTTOM``: its Hessian
    is A, whose extreme eigenvalues are exactly 10 and −30."""
    g = torch.Generator().manual_seed(0)
    spectrum = torch.cat([torch.tensor(CLUSTER_TOP, dtype=torch.float64),
                          torch.randn(dim - len(CLUSTER_TOP) - 1, generator=g, dtype=torch.float64) * 0.05,
                          torch.tensor([CLUSTER_BOTTOM], dtype=torch.float64)])
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    a = ((basis * spectrum) @ basis.T).float()
    theta = torch.nn.Parameter(torch.randn(dim, generator=g))
    return Case("cluster", lambda: 0.5 * theta @ a @ theta, [theta], None, float(spectrum.max()),
                float(spectrum.min()))


def tiny_gpt_case() -> Case:
    """``TINY_GPT`` at init on ``TINY_BATCH`` random windows; the reference is its exact float64 Hessian's
    spectrum (the float32 model's parameters, cast)."""
    torch.manual_seed(0)
    model = build_model(run_defaults(**TINY_GPT), TINY_VOCAB).eval()
    windows = torch.randint(0, TINY_VOCAB, (TINY_BATCH, TINY_GPT["context"] + 1),
                            generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    model64 = build_model(run_defaults(**TINY_GPT), TINY_VOCAB).double().eval()
    model64.load_state_dict(model.state_dict())
    x, y = windows[:, :-1], windows[:, 1:]

    def loss_of_flat(theta: torch.Tensor) -> torch.Tensor:
        pieces = dict(zip(names, (chunk.view_as(p) for chunk, p in
                                  zip(theta.split([p.numel() for p in params]), params))))
        logits = torch.func.functional_call(model64, pieces, (x,))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    eigenvalues = torch.linalg.eigvalsh(exact_hessian(loss_of_flat, torch.cat([p.detach().reshape(-1)
                                                                                for p in params])))
    return Case("tiny_gpt", language_model_loss_fn(model, windows), params, None, float(eigenvalues[-1]),
                float(eigenvalues[0]))


def lanczos_reference(name: str, loss_fn: LossFn, params: list[torch.Tensor], precondition: torch.Tensor | None,
                      steps: int) -> Case:
    """The extreme Ritz values of a ``steps``-step Lanczos run (start seed 12345, none of the measured ones)
    as the reference, with the top one's residual: an eigenvalue lies within it of the top Ritz value."""
    op = HessianOperator(loss_fn, params, precondition)
    *_, ritz = lanczos_ritz_pairs(op, min(steps, op.dim), torch.Generator().manual_seed(12345))
    return Case(name, loss_fn, params, precondition, float(ritz.values[-1]), float(ritz.values[0]),
                float(ritz.residuals[-1]))


def super_consistency_run(**overrides) -> dict[str, dict]:
    """The cpu super_consistency preset's SP width-128 run (lipflow/experiments/super_consistency.yaml: AdamW,
    lr 0.01, depth 2) without its own sharpness measurements, ``overrides`` on top."""
    preset = load_config_file(REPO / "lipflow" / "experiments" / "super_consistency.yaml")["cpu"]
    grid = preset["grid"][0]
    return {SUPER_CONSISTENCY: {**preset["base"], **grid["param"]["sp"], **grid["width"]["w128"],
                                "n_layers": grid["n_layers"][-1], "sharpness_every": 0, **overrides}}


def trained_cases(configs: dict[str, dict], reference_steps: int, work: Path) -> list[Case]:
    """Each run config trained to its end, on the batch training's sharpness uses
    (``EvalStepTelemetry.sharpness``): its Hessian and, for Adam, P⁻¹H; of ``SUPER_CONSISTENCY`` P⁻¹H only."""
    data, cases = default_shards(work), []
    for name, cfg in configs.items():
        trainer = Trainer(name, cfg, data, work / "runs" / name, progress=False)
        trainer.run()
        model = trainer.model.eval()
        x, y = trainer.train_data.sample_windows(cfg["batch_size"], cfg["context"],
                                                 torch.Generator().manual_seed(cfg["seed"] + 2))
        loss_fn = language_model_loss_fn(model, torch.cat([x, y[:, -1:]], dim=1).to(trainer.device))
        params = [p for p in model.parameters() if p.requires_grad]
        if name != SUPER_CONSISTENCY:
            cases.append(lanczos_reference(name, loss_fn, params, None, reference_steps))
        precondition = adam_preconditioner(trainer.optimizer, params)
        if precondition is not None:
            cases.append(lanczos_reference(f"{name}_preconditioned", loss_fn, params, precondition, reference_steps))
    return cases


def measure(case: Case, seeds: int, rounds: int, warmup: int, device: str, dev: str) -> tuple[list[dict], list[list]]:
    """The rows and table lines of one case (see the module docstring)."""
    power_params = evaluation_params("sharpness")
    tol = TRAINING_SHARPNESS_TOL

    def lanczos(iters: int, seed: int) -> float:
        return largest_eigenvalue(case.loss_fn, case.params, iters=iters, tol=tol, precondition=case.precondition,
                                  generator=torch.Generator().manual_seed(seed)).value

    def power():
        return power_iteration(case.loss_fn, case.params, iters=power_params["iters"], tol=power_params["tol"],
                               precondition=case.precondition, generator=torch.Generator().manual_seed(0))

    p = f"{case.name}."
    param_bytes = sum(t.numel() * t.element_size() for t in case.params)
    rows = [row(BENCH, p + "parameters", case.dim, "parameters", dev),
            row(BENCH, p + "parameter_bytes", param_bytes, "bytes", dev),
            row(BENCH, p + "lambda_max", case.lambda_max, "eigenvalue", dev),
            row(BENCH, p + "lambda_min", case.lambda_min, "eigenvalue", dev),
            row(BENCH, p + "reference_relative_residual", case.reference_residual / abs(case.lambda_max),
                "relative", dev)]
    fns = {f"lanczos{iters}": (lambda iters=iters: lanczos(iters, 0)) for iters in LANCZOS_ITERS}
    times = {name: statistics.median(t) for name, t in
             alternating_timings({**fns, "power": power}, rounds, warmup, device).items()}
    result = power()
    power_error = relative_error(result.eigenvalue, case.lambda_max)
    found_min = abs(result.eigenvalue - case.lambda_min) < abs(result.eigenvalue - case.lambda_max)
    rows += [row(BENCH, p + "power.hvps", result.iterations, "HVPs", dev),
             row(BENCH, p + "power.time", times["power"], "s", dev),
             row(BENCH, p + "power.eigenvalue", result.eigenvalue, "eigenvalue", dev),
             row(BENCH, p + "power.relative_error", power_error, "relative", dev),
             row(BENCH, p + "power.nearer_lambda_min", float(found_min), "count", dev)]
    table = [[case.name, "power", str(result.iterations), times["power"] * 1e3, result.eigenvalue, case.lambda_max,
              power_error, "found λ_min" if found_min else ""]]
    for iters in LANCZOS_ITERS:
        estimates, hvps = [], []
        for seed in range(seeds):
            with counting_products() as products:
                estimates.append(lanczos(iters, seed))
            hvps.append(products[0])
        steps = min(iters, case.dim)
        capped = [n == steps for n in hvps]  # ran every step allowed: stopped by the cap, not the residual
        misses = count_misses(estimates, case.lambda_max, tol)
        stopped_misses = count_misses([v for v, c in zip(estimates, capped) if not c], case.lambda_max, tol)
        errors = [relative_error(value, case.lambda_max) for value in estimates]
        name = f"lanczos{iters}"
        rows += [row(BENCH, f"{p}{name}.hvps_mean", statistics.mean(hvps), "HVPs", dev),
                 row(BENCH, f"{p}{name}.hvps_max", max(hvps), "HVPs", dev),
                 row(BENCH, f"{p}{name}.time", times[name], "s", dev),
                 row(BENCH, f"{p}{name}.power_over_lanczos_time", times["power"] / times[name], "x", dev),
                 row(BENCH, f"{p}{name}.relative_error_median", statistics.median(errors), "relative", dev),
                 row(BENCH, f"{p}{name}.relative_error_max", max(errors), "relative", dev),
                 row(BENCH, f"{p}{name}.seeds", seeds, "count", dev),
                 row(BENCH, f"{p}{name}.capped", sum(capped), "count", dev),
                 row(BENCH, f"{p}{name}.misses", misses, "count", dev),
                 row(BENCH, f"{p}{name}.misses_after_residual_stop", stopped_misses, "count", dev),
                 row(BENCH, f"{p}{name}.basis_bytes", steps * case.dim * 4, "bytes", dev),
                 row(BENCH, f"{p}{name}.basis_over_parameter_bytes", steps * case.dim * 4 / param_bytes, "x", dev)]
        table.append([case.name, name, f"{statistics.mean(hvps):.1f} (≤{max(hvps)})", times[name] * 1e3,
                      min(estimates), case.lambda_max, max(errors),
                      f"{misses}/{seeds} missed ({stopped_misses} after a residual stop), {sum(capped)} capped"])
    return rows, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=summary_of(__doc__))
    parser.add_argument("--quick", action="store_true",
                        help="smaller cases, 2 training steps, 2 seeds, 1 round (seconds)")
    parser.add_argument("--seeds", type=count_argument(1), default=100, help="Lanczos start vectors per case")
    add_train_steps_argument(parser)
    parser.add_argument("--rounds", type=count_argument(1), default=5, help="timed runs of each method (median kept)")
    add_torch_arguments(parser)
    add_out_argument(parser)
    args = parse_bench_args(parser, BENCH, argv)
    device, dev = torch_setup(args)
    size = "quick" if args.quick else "default"
    seeds, rounds, warmup, train_steps = (2, 1, 0, 2) if args.quick else (args.seeds, args.rounds, 1, args.train_steps)
    rows, table = [row(BENCH, "torch_threads", torch.get_num_threads(), "threads", dev)], []
    tiny = tiny_gpt_case()
    shape = QUICK_SHAPE if args.quick else {}
    configs = trained_default_runs(train_steps, args.device, **shape)
    sc_steps = 2 if args.quick else 20
    configs |= run_configs({"device": args.device}, super_consistency_run(**shape, steps=sc_steps, eval_every=sc_steps))
    tiny_reference = lanczos_reference("tiny_gpt", tiny.loss_fn, tiny.params, None, REFERENCE_STEPS[size])
    rows += [row(BENCH, "tiny_gpt.long_lanczos_relative_error",
                 relative_error(tiny_reference.lambda_max, tiny.lambda_max), "relative", dev),
             row(BENCH, "tiny_gpt.long_lanczos_relative_residual",
                 tiny_reference.reference_residual / abs(tiny_reference.lambda_max), "relative", dev)]
    with tempfile.TemporaryDirectory() as tmp:
        cases = [cluster_case(CLUSTER_DIM[size]), tiny,
                 *trained_cases(configs, REFERENCE_STEPS[size], Path(tmp))]
        for case in cases:
            case_rows, case_table = measure(case, seeds, rounds, warmup, str(device), dev)
            rows += case_rows
            table += case_table
    print(f"Lanczos tol {TRAINING_SHARPNESS_TOL:g}; power iteration at the sharpness evaluation's defaults; "
          f"{seeds} Lanczos start vectors per case; tiny_gpt's {REFERENCE_STEPS[size]}-step Lanczos reference is "
          f"{relative_error(tiny_reference.lambda_max, tiny.lambda_max):.2g} from its exact λ_max")
    print_table(["case", "method", "HVPs", "ms", "θ (lowest)", "λ_max", "rel. error (max)", "misses"], table)
    save_rows(args, BENCH, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
