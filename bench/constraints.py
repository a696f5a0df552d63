"""Newton–Schulz against the exact polar factor, and the soft cap against the SVD clamp, per matrix size.

    python bench/constraints.py [--quick] [--sizes N ...] [--rounds R] [--device auto|cpu|cuda] [--threads N]

For each n (default 256 … 4096; --quick: 256, 512), on one seeded Gaussian n×n matrix G:

- **Muon's orthogonalization**: ``lipflow.optimizers.newton_schulz(G, 5)`` (Keller Jordan's quintic,
  in the dtype Muon uses: fp32 on CPU, bf16 on CUDA) against ``lipflow.constraints.msign(G)`` = UVᵀ
  by SVD. Relative error ‖NS(G) − UVᵀ‖_F / ‖UVᵀ‖_F. NS maps each singular value σ to p⁵(σ/‖G‖_F)
  with unchanged singular vectors, so in exact arithmetic that error is
  √(Σᵢ (p⁵(σᵢ/‖G‖_F) − 1)²) / √n (msign's numerically-zero directions, σ ≤ n·eps·σ₁, have target 0
  instead of 1): reported beside the measurement as ``predicted``, from G's singular values. The
  documented band (σ ≥ 0.00151‖G‖_F ↦ [0.6818, 1.2024]) bounds it by max(1 − 0.6818, 0.2024) = 0.318
  when every σᵢ is in range; a Gaussian's few smallest σᵢ are not (they map to ≈ 0).
- **The weight constraint**: ``spectral_soft_cap`` (σ ↦ p₂(p₁(σ)) through the Gram matrix) against
  ``spectral_hard_cap`` (U min(Σ, σmax) Vᵀ by SVD) at σmax = 1, on X = G·k/σ₁(G): the spectrum a
  capped matrix can have right after a Muon step at lr 0.05 (k = σmax + u, u = 0.05·1.2024, the
  soft cap's own worst case). Relative error ‖soft − hard‖_F / ‖hard‖_F, its exact-arithmetic
  prediction √(Σ (p₂(p₁(σᵢ)) − min(σᵢ, 1))²) / √(Σ min(σᵢ, 1)²), and σ₁ after the soft cap (≤ σmax
  is the guarantee). Also the soft cap with its matmuls at torch's "high" float32 precision: TF32
  tensor cores on CUDA (inputs rounded to a 10-bit mantissa, fp32 accumulation; JAX's default on
  Ampere and later GPUs, so the reference implementation's), its time and σ₁ after it, which is
  what a TF32 soft cap would cost in overshoot. On CPU that setting changes no matmul.

Timings: the two methods of each pair alternate (``--rounds`` rounds after one warmup; sizes ≥ 2048
on CPU take seconds per call and run one round, no warmup), median kept; speedup = SVD time / other
time. Rows go to results/bench/constraints.parquet (--quick: results/bench/quick/).
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's directory would come first on sys.path, where bench/tokenize.py
# shadows the standard library's ``tokenize`` (imported by torch): put the repo root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import statistics  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import (add_out_argument, add_torch_arguments, alternating_timings,  # noqa: E402
                          parse_bench_args, print_table, row, save_rows, torch_setup)
from lipflow.constraints import StepContext, msign, soft_cap_alpha, spectral_hard_cap, spectral_soft_cap  # noqa: E402
from lipflow.errors import count_argument, summary_of  # noqa: E402
from lipflow.optimizers import MUON_NS_COEFFICIENTS, newton_schulz, newton_schulz_peak  # noqa: E402

BENCH = "constraints"
NS_STEPS = 5
SIGMA_MAX = 1.0
MUON_LR = 0.05
LARGE_ON_CPU = 2048  # from this n on, CPU calls take seconds: one round, no warmup


def relative_error(a: torch.Tensor, reference: torch.Tensor) -> float:
    return float((a.double() - reference.double()).norm() / reference.double().norm())


def predicted_ns_error(singular_values: np.ndarray, steps: int = NS_STEPS) -> float:
    """‖p^steps(Σ/‖Σ‖_F) − D‖_F/‖D‖_F: NS's error against msign(G) = U D Vᵀ in exact arithmetic, where
    D = 1 on the directions msign keeps (σ > n·eps_fp32·σ₁) and 0 on those it zeroes."""
    a, b, c = MUON_NS_COEFFICIENTS
    x = singular_values / np.linalg.norm(singular_values)
    target = (singular_values > singular_values[0] * len(x) * np.finfo(np.float32).eps).astype(np.float64)
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return float(np.linalg.norm(x - target) / np.linalg.norm(target))


def predicted_soft_cap_error(singular_values: np.ndarray, alpha: float, sigma_max: float) -> float:
    """‖p₂(p₁(Σ)) − min(Σ, σmax)‖_F / ‖min(Σ, σmax)‖_F with p₁(x) = x − αx³, p₂(y) = y + αy³."""
    y = singular_values - alpha * singular_values**3
    soft = y + alpha * y**3
    hard = np.minimum(singular_values, sigma_max)
    return float(np.linalg.norm(soft - hard) / np.linalg.norm(hard))


def under_tf32(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``fn()`` with float32 matmuls at torch's "high" precision (TF32 on CUDA), then the previous one."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        return fn()
    finally:
        torch.set_float32_matmul_precision(previous)


def keeping_results(fns: dict[str, Callable[[], torch.Tensor]], results: dict[str, torch.Tensor]) -> dict:
    """The same functions, each also storing its latest output in ``results`` (no recomputation)."""
    return {name: (lambda name=name, fn=fn: results.__setitem__(name, fn())) for name, fn in fns.items()}


def measure(n: int, device: torch.device, rounds: int, warmup: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(n)
    g = torch.randn(n, n, generator=gen, dtype=torch.float32).to(device)
    singular_values = torch.linalg.svdvals(g).double().cpu().numpy()
    ns_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as Muon runs it
    dev, out = str(device), {}
    polar_times = alternating_timings(keeping_results(
        {"ns": lambda: newton_schulz(g, NS_STEPS, ns_dtype), "svd": lambda: msign(g)}, out), rounds, warmup, dev)

    u = MUON_LR * newton_schulz_peak(NS_STEPS)
    k = SIGMA_MAX + u
    x = g * (k / float(singular_values[0]))
    step = StepContext(lr=MUON_LR, update_norm=u)
    cap_times = alternating_timings(keeping_results(
        {"soft": lambda: spectral_soft_cap(x, SIGMA_MAX, step=step),
         "soft_tf32": lambda: under_tf32(lambda: spectral_soft_cap(x, SIGMA_MAX, step=step)),
         "clamp": lambda: spectral_hard_cap(x, SIGMA_MAX, step=step)}, out), rounds, warmup, dev)
    median = {name: statistics.median(t) for times in (polar_times, cap_times) for name, t in times.items()}
    return {
        **median,
        "ns_error": relative_error(out["ns"], out["svd"]),
        "ns_error_predicted": predicted_ns_error(singular_values),
        "soft_error": relative_error(out["soft"], out["clamp"]),
        "soft_error_predicted": predicted_soft_cap_error(singular_values * (k / singular_values[0]),
                                                         soft_cap_alpha(SIGMA_MAX, k), SIGMA_MAX),
        "soft_top_sigma": float(torch.linalg.svdvals(out["soft"].double())[0]),
        "soft_tf32_top_sigma": float(torch.linalg.svdvals(out["soft_tf32"].double())[0]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=summary_of(__doc__))
    parser.add_argument("--quick", action="store_true",
                        help="one round, no warmup, and sizes 256 and 512 unless --sizes is given (seconds)")
    parser.add_argument("--sizes", type=count_argument(1), nargs="+", help="matrix sizes (default 256 512 1024 2048 4096)")
    parser.add_argument("--rounds", type=count_argument(1), default=5, help="alternating rounds per pair (median kept)")
    add_torch_arguments(parser)
    add_out_argument(parser)
    args = parse_bench_args(parser, BENCH, argv)
    device, dev = torch_setup(args)
    sizes = args.sizes or ([256, 512] if args.quick else [256, 512, 1024, 2048, 4096])
    rounds = 1 if args.quick else args.rounds
    rows, table = [row(BENCH, "torch_threads", torch.get_num_threads(), "threads", dev)], []
    for n in sizes:
        large = device.type == "cpu" and n >= LARGE_ON_CPU
        r = measure(n, device, 1 if large else rounds, 0 if large or args.quick else 1)
        metric = f"n{n}"
        rows += [row(BENCH, f"{metric}.newton_schulz5_time", r["ns"], "s", dev),
                 row(BENCH, f"{metric}.svd_polar_time", r["svd"], "s", dev),
                 row(BENCH, f"{metric}.svd_polar_over_newton_schulz5", r["svd"] / r["ns"], "x", dev),
                 row(BENCH, f"{metric}.newton_schulz5_rel_error", r["ns_error"], "fraction", dev),
                 row(BENCH, f"{metric}.newton_schulz5_rel_error_predicted", r["ns_error_predicted"], "fraction", dev),
                 row(BENCH, f"{metric}.soft_cap_time", r["soft"], "s", dev),
                 row(BENCH, f"{metric}.svd_clamp_time", r["clamp"], "s", dev),
                 row(BENCH, f"{metric}.svd_clamp_over_soft_cap", r["clamp"] / r["soft"], "x", dev),
                 row(BENCH, f"{metric}.soft_cap_rel_error", r["soft_error"], "fraction", dev),
                 row(BENCH, f"{metric}.soft_cap_rel_error_predicted", r["soft_error_predicted"], "fraction", dev),
                 row(BENCH, f"{metric}.soft_cap_top_sigma", r["soft_top_sigma"], "sigma_max", dev),
                 row(BENCH, f"{metric}.soft_cap_tf32_time", r["soft_tf32"], "s", dev),
                 row(BENCH, f"{metric}.soft_cap_over_soft_cap_tf32", r["soft"] / r["soft_tf32"], "x", dev),
                 row(BENCH, f"{metric}.soft_cap_tf32_top_sigma", r["soft_tf32_top_sigma"], "sigma_max", dev)]
        table.append([n, r["ns"] * 1e3, r["svd"] * 1e3, r["svd"] / r["ns"], r["ns_error"],
                      r["ns_error_predicted"], r["soft"] * 1e3, r["clamp"] * 1e3, r["clamp"] / r["soft"],
                      r["soft_error"], r["soft_error_predicted"], r["soft_top_sigma"], r["soft_tf32"] * 1e3,
                      r["soft_tf32_top_sigma"]])
        print(f"n={n} done", flush=True)
    print_table(["n", "NS5 ms", "SVD polar ms", "speedup", "NS err", "(predicted)", "soft cap ms", "SVD clamp ms",
                 "speedup", "cap err", "(predicted)", "σ₁ after cap", "TF32 cap ms", "σ₁ after TF32 cap"], table)
    save_rows(args, BENCH, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
